"""Fixtures for the trainer tests (helpers live in ``train_helpers`` and
``mask_teacher_helpers``, beside this file).

The tests below this folder (``data/``, ``supervision/``, ``distill/``) import those helpers by
their bare module names: this folder goes on ``sys.path`` here, whatever pytest's import mode.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import pytest  # noqa: E402
import torch  # noqa: E402
from mask_teacher_helpers import save_teacher  # noqa: E402
from train_helpers import make_data  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """Two threads on two shared, busy cores spin far slower than one: keep tests on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> dict[str, Path]:
    """A 2-image training set and a 2-image validation set (folder layout)."""
    root = tmp_path_factory.mktemp("train_data")
    return {
        "train": make_data(root / "train", images=2, seed=0),
        "val": make_data(root / "val", images=2, seed=1),
    }


@pytest.fixture(scope="module")
def student_ckpt(tmp_path_factory) -> Path:
    """A vit_t_tiny start that predicts blobs (a random init predicts nothing that matches)."""
    return save_teacher(tmp_path_factory.mktemp("st") / "student.pt", 1, model_type="vit_t_tiny")
