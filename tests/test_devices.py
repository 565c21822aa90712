"""Device selection (``train.device``, ``precompute.device``, eval's ``--device``)."""

from __future__ import annotations

import pytest
import torch

from maskteacher.devices import resolve_device
from maskteacher.errors import UserError
from maskteacher.precompute.distributed import resolve_device as precompute_device
from maskteacher.train.distributed import init_distributed

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def test_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize("spec", ["tpu", "gpu0", "mps"])
def test_unknown_device_names_the_key_and_the_choices(spec):
    with pytest.raises(UserError, match=r"train\.device: got .*expected auto, cpu, cuda or cuda:N"):
        resolve_device(spec, key="train.device")


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_a_clear_error_in_every_command(spec, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UserError, match=r"precompute\.device is .* no CUDA device"):
        precompute_device(spec, 0)
    with pytest.raises(UserError, match=r"train\.device is .* no CUDA device"):
        init_distributed(spec)
