"""DDP under torchrun on the CPU (gloo, 2 processes) against one process on the same batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from train_helpers import tiny_config

from maskteacher.train.run import train


@pytest.mark.slow  # 15-30 s on 2 busy cores: two extra Python processes import torch
def test_ddp_two_ranks_equal_one_process_with_the_whole_batch(sample_data, tmp_path):
    """One optimizer step with one image per rank must equal one step on both images at once:
    gradients are averaged across ranks and the loss is normalised by the all-reduced pair count.
    Only rank 0 writes checkpoints and logs."""
    common = {
        "model": {"type": "vit_b_tiny"},
        "dataset": {"val_dataset": str(sample_data["val"])},
        "train": {"epochs": 1, "grad_clip": None, "match_iou_threshold": 0.0, "max_prompts": 6},
    }
    ddp_cfg, ddp_path = tiny_config(
        tmp_path,
        sample_data,
        name="ddp.yaml",
        model={**common["model"], "save_path": str(tmp_path / "ddp")},
        dataset=common["dataset"],
        train={**common["train"], "batch_size": 1},
    )
    single_cfg, _ = tiny_config(
        tmp_path,
        sample_data,
        name="single.yaml",
        model={**common["model"], "save_path": str(tmp_path / "single")},
        dataset=common["dataset"],
        train={**common["train"], "batch_size": 2},
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "maskteacher", "train", str(ddp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained 1 epoch(s)") == 1  # only rank 0 reports

    single = train(single_cfg)
    ddp = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    ref = torch.load(tmp_path / "single" / "last.pt", weights_only=True)
    assert ddp["progress"]["step"] == ref["progress"]["step"] == 1
    close = total = 0
    for key, value in ref["model"].items():
        if value.dtype.is_floating_point:
            diff = (ddp["model"][key] - value).abs()
            close += int((diff <= 1e-6).sum())
            total += value.numel()
    # AdamW's first step moves every weight by ~lr * sign(grad): a rank that trained on its own
    # image alone would disagree in most weights
    assert close / total > 0.999, close / total
    assert len(list((tmp_path / "ddp" / "tensorboard").iterdir())) == 1
    assert ddp["progress"]["best_metric"] == pytest.approx(single.best_metric, abs=1e-4)


@pytest.mark.slow  # 30-50 s: two torchrun runs of two processes each
def test_ddp_point_decoding_equals_dense_decoding(sample_data, tmp_path):
    """With train.loss_points the student decodes the sampled pixels after DDP's forward,
    through the upscaling-parameter views the forward returns: under DDP (one image per rank)
    that must give the same all-reduced update as decoding full maps, and no DDP error (a
    parameter used outside the forward would be marked ready twice)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    weights = {}
    for point in (False, True):
        name = f"point_{point}"
        _, path = tiny_config(
            tmp_path,
            sample_data,
            name=f"{name}.yaml",
            model={"type": "vit_b_tiny", "save_path": str(tmp_path / name)},
            train={
                "epochs": 1, "batch_size": 1, "grad_clip": None, "match_iou_threshold": 0.0,
                "max_prompts": 6, "loss_points": 64, "point_decoding": point,
            },
        )  # fmt: skip
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", "-m", "maskteacher", "train", str(path),
        ]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        weights[point] = torch.load(tmp_path / name / "last.pt", weights_only=True)["model"]
    close = total = 0
    for key, value in weights[False].items():
        if value.dtype.is_floating_point:
            close += int(((weights[True][key] - value).abs() <= 1e-6).sum())
            total += value.numel()
        if "output_upscaling" in key:  # reached only through the views
            torch.testing.assert_close(weights[True][key], value, rtol=1e-5, atol=1e-6)
    # AdamW's first step is ~lr * sign(grad): float noise only moves weights whose gradient is
    # ~0 (1 of ~50k measured); a missing or un-reduced gradient would move most of them
    assert close / total > 0.999, close / total
