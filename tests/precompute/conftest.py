"""Fixtures for the precompute tests (helpers live in ``precompute_helpers``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from precompute_helpers import make_teacher, one_thread, run_cli, write_config


@pytest.fixture(scope="module", autouse=True)
def _one_thread_per_module():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A tiny teacher checkpoint (random weights, SAM-like logit scale)."""
    path = tmp_path_factory.mktemp("teacher") / "teacher_a.pt"
    torch.save(make_teacher(0).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def other_ckpt(tmp_path_factory) -> Path:
    """Another checkpoint of the same architecture (different weights)."""
    path = tmp_path_factory.mktemp("teacher") / "teacher_b.pt"
    torch.save(make_teacher(1).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """A 6-image folder dataset (small images)."""
    from maskteacher.data import make_sample

    return make_sample(
        tmp_path_factory.mktemp("data") / "train", images=6, seed=0, size_range=(64, 120)
    )


@pytest.fixture(scope="session")
def val_root(tmp_path_factory) -> Path:
    from maskteacher.data import make_sample

    return make_sample(
        tmp_path_factory.mktemp("data") / "val", images=3, seed=1, size_range=(64, 120)
    )


@pytest.fixture(scope="session")
def reference_cache(tmp_path_factory, sample_root, val_root, teacher_ckpt) -> Path:
    """One uninterrupted single-process run over train (6 images) + val (3 images)."""
    folder = tmp_path_factory.mktemp("reference")
    config = write_config(folder, train=sample_root, val=val_root, checkpoint=teacher_ckpt)
    with one_thread():
        assert run_cli(config) == 0
    return folder / "cache"


# Generation settings under which the tiny teacher keeps a handful of masks per image.
