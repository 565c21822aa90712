"""Shared helpers for the models tests: random (non-default) weights for any SAM model."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn


def randomize_model(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Give every state-dict tensor a random value in place (BN variances positive).

    Default initialisations leave many tensors at 0 or 1 (biases, BN stats, attention bias
    tables, rel_pos), which would hide loading mistakes; this makes every key count. Returns
    ``model.state_dict()`` (tensors shared with the model: no copy, so big models stay cheap).
    """
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if key.endswith("running_var"):
                value.uniform_(0.5, 1.5, generator=gen)
            elif key.endswith("num_batches_tracked"):
                value.fill_(int(torch.randint(1, 100, (), generator=gen)))
            elif value.dtype.is_floating_point:
                value.normal_(
                    1.0 if key.endswith(("norm.weight", "bn.weight")) else 0.0, 0.1, generator=gen
                )
    return state


@pytest.fixture
def randomize() -> Callable[..., dict[str, torch.Tensor]]:
    return randomize_model


def import_mobile_sam():
    """The MobileSAM reference package (``[ref]`` extra), or skip the test when it is absent."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm deprecation / registry-overwrite warnings
        return pytest.importorskip("mobile_sam", reason="reference package from the [ref] extra")


@pytest.fixture
def mobile_sam():
    return import_mobile_sam()
