"""dual_supervision under torchrun (gloo, 2 processes) against one process on the same batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from mask_teacher_helpers import TEACHER_TYPE, save_teacher, write_teacher_cache
from train_helpers import tiny_config

from maskteacher.train.run import train


def key_bias(name: str, value: torch.Tensor) -> torch.Tensor:
    """Attention key biases: softmax ignores them, their gradient is 0 up to float noise, which
    AdamW's first step (~lr * g / |g|) turns into +-lr either way -- left out of the comparison."""
    mask = torch.zeros_like(value, dtype=torch.bool)
    if name.endswith("k_proj.bias"):
        mask[:] = True
    elif name.endswith("qkv.bias"):
        third = value.numel() // 3
        mask[third : 2 * third] = True
    return mask


@pytest.mark.slow  # 15-30 s on 2 busy cores: two extra Python processes import torch
def test_ddp_dual_supervision_equals_one_process(sample_data, tmp_path):
    """One step with one image per rank equals one step on both images: the soft loss is the sum
    over pairs divided by the all-reduced pair count, like the task terms."""
    cache = write_teacher_cache(tmp_path / "cache", {"train": sample_data["train"]})
    # logits of a few units: saturated ones (x1000) leave many weights with gradients so small
    # that AdamW's first step (~lr * g / |g|) depends on float summation order
    student = save_teacher(tmp_path / "student.pt", 1, model_type="vit_b_tiny", scale=50.0)
    common = {
        "train": {
            "epochs": 1, "grad_clip": None, "match_iou_threshold": 0.0, "max_prompts": 6,
            "prompt_source": "teacher_grid",
        },
        "mask_teacher": {
            "enable": True, "method": "dual_supervision", "teacher_type": TEACHER_TYPE,
            "cache_path": str(cache), "iou_threshold": 0.1,
            "soft_loss": {"type": "kl", "weight": 5.0},
        },
    }  # fmt: skip
    cfgs = {}
    for name, batch in (("ddp", 1), ("single", 2)):
        cfgs[name] = tiny_config(
            tmp_path,
            sample_data,
            name=f"{name}.yaml",
            model={
                "type": "vit_b_tiny",
                "checkpoint_path": str(student),
                "save_path": str(tmp_path / name),
            },
            train={**common["train"], "batch_size": batch},
            mask_teacher=common["mask_teacher"],
        )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "maskteacher", "train", str(cfgs["ddp"][1]),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    single = train(cfgs["single"][0])
    assert len(single.losses) == 1
    ddp = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    ref = torch.load(tmp_path / "single" / "last.pt", weights_only=True)
    close = total = 0
    for key, value in ref["model"].items():
        if value.dtype.is_floating_point:
            diff = (ddp["model"][key] - value).abs()[~key_bias(key, value)]
            close += int((diff <= 1e-6).sum())
            total += diff.numel()
    # AdamW's first step moves every weight by ~lr * sign(grad): wrong pair normalisation on
    # one rank disagrees in several percent of the weights (measured: 96 %)
    assert close / total > 0.9999, close / total
