"""Checkpoints: weights_only loading, RNG round trip, atomic writes under failure and SIGKILL."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from maskteacher.errors import UserError
from maskteacher.models.checkpoint import atomic_save
from maskteacher.train.checkpoint import (
    Progress,
    build_checkpoint,
    capture_rng,
    load_training_checkpoint,
    restore_rng,
)


def _ckpt(value: float, size: int = 4) -> dict:
    model = torch.nn.Linear(size, size)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, size)).sum().backward()
    opt.step()
    torch.nn.init.constant_(model.weight, value)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return build_checkpoint(
        model_state=model.state_dict(),
        model_type="vit_t_tiny",
        image_size=64,
        optimizer=opt.state_dict(),
        scheduler=sched.state_dict(),
        scaler=torch.amp.GradScaler("cpu", enabled=False).state_dict(),
        progress=Progress(epoch=2, batches_done=1, step=7, best_metric=0.5),
        config_json='{"train": {"lr": 0.001}}',
        cache_id=None,
    )


def test_weights_only_round_trip(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save(_ckpt(0.25), path)
    raw = torch.load(path, weights_only=True)  # no pickled objects anywhere
    assert raw["config"].startswith("{") and raw["progress"]["step"] == 7
    ckpt = load_training_checkpoint(path, model_type="vit_t_tiny", image_size=64)
    assert float(ckpt["model"]["weight"][0, 0]) == 0.25
    assert Progress.from_dict(ckpt["progress"]) == Progress(
        epoch=2, batches_done=1, step=7, best_metric=0.5
    )
    assert not [p for p in tmp_path.iterdir() if p.name != "last.pt"]  # no temp file left


def test_rng_round_trip():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = capture_rng()
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    restore_rng(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first


def test_wrong_backbone_and_bad_files(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save(_ckpt(0.1), path)
    with pytest.raises(UserError, match="vit_t_tiny.*at image_size 64.*'vit_b_tiny' at 64"):
        load_training_checkpoint(path, model_type="vit_b_tiny", image_size=64)
    with pytest.raises(UserError, match="not found"):
        load_training_checkpoint(tmp_path / "nope.pt", model_type="vit_t_tiny", image_size=64)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable training checkpoint"):
        load_training_checkpoint(junk, model_type="vit_t_tiny", image_size=64)
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(1)}, plain)
    with pytest.raises(UserError, match="not a maskteacher training checkpoint"):
        load_training_checkpoint(plain, model_type="vit_t_tiny", image_size=64)


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save(_ckpt(0.5), path)

    def broken_save(obj, f):
        f.write(b"PK partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save(_ckpt(0.9), path)
    monkeypatch.undo()
    ckpt = load_training_checkpoint(path, model_type="vit_t_tiny", image_size=64)
    assert float(ckpt["model"]["weight"][0, 0]) == 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


_WRITER = """
import sys, torch
from maskteacher.models.checkpoint import atomic_save
path = sys.argv[1]
i = 0
while True:
    i += 1
    atomic_save({"i": i, "blob": torch.full((1_000_000,), float(i))}, path)
    print(i, flush=True)
"""


def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    """A writer killed at a random moment mid-save never leaves a torn last.pt."""
    path = tmp_path / "last.pt"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # one complete save exists
        time.sleep(0.05)  # now somewhere inside a later save
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    data = torch.load(path, weights_only=True)
    assert data["i"] >= 1 and float(data["blob"][-1]) == data["i"]
