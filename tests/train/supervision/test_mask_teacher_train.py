"""Mask-teacher training end to end on sample data: each method from a cache, the online
teacher, the switch-off paths, and that a cache-fed run never builds the teacher."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from mask_teacher_helpers import (
    TEACHER_TYPE,
    save_teacher,
    tensorboard_scalars,
    write_teacher_cache,
)
from train_helpers import tiny_config

from maskteacher.train import assemble
from maskteacher.train.data import online_teacher
from maskteacher.train.run import train

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


@pytest.fixture(scope="module")
def teacher_cache(sample_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mt")
    return write_teacher_cache(root / "cache", {"train": sample_data["train"]})


def mask_teacher_block(cache: Path | None, tmp_path: Path, **extra) -> dict:
    return {
        "enable": True,
        "teacher_type": TEACHER_TYPE,
        "checkpoint_path": str(tmp_path / "no_such_teacher.pt"),
        "cache_path": None if cache is None else str(cache),
        **extra,
    }


METHODS = {
    "gt": None,
    "replace_gt": {"method": "replace_gt", "iou_threshold": 0.5},
    "replace_gt_soft": {"method": "replace_gt", "gt_override": False},
    "dual_l2": {
        "method": "dual_supervision",
        "iou_threshold": 0.1,
        "soft_loss": {"type": "l2", "weight": 0.5},
    },
    "dual_kl": {
        "method": "dual_supervision",
        "iou_threshold": 0.1,
        "soft_loss": {"type": "kl", "weight": 0.3},
    },
    "dual_kl_teacher": {
        "method": "dual_supervision",
        "iou_threshold": 0.1,
        "soft_loss": {"type": "kl_teacher", "weight": 0.3},
    },
}


@pytest.mark.parametrize("method", list(METHODS))
def test_method_end_to_end(method, sample_data, teacher_cache, student_ckpt, tmp_path, capsys):
    extra = METHODS[method]
    sections = {
        "train": {"epochs": 1, "prompt_source": "teacher_grid", "max_prompts": 8},
        "model": {"checkpoint_path": str(student_ckpt)},
    }
    sections["mask_teacher"] = (
        {"cache_path": str(teacher_cache)}
        if extra is None
        else mask_teacher_block(teacher_cache, tmp_path, **extra)
    )
    cfg, _ = tiny_config(tmp_path, sample_data, **sections)
    result = train(cfg)
    run = tmp_path / "run"
    assert len(result.losses) == 1 and all(math.isfinite(v) for v in result.losses)
    assert (run / "last.pt").is_file() and (run / "student_official.pth").is_file()
    tags = tensorboard_scalars(run)
    assert {"train/task_loss", "train/bce", "train/dice", "train/cls"} <= set(tags)
    assert all(math.isfinite(v) for values in tags.values() for v in values)
    weights = {"bce": 1.0, "focal": 15.0, "dice": 1.0, "iou": 1.0, "cls": 1.0}
    if method.startswith("dual"):
        assert "train/soft" in tags and "train/teacher_pairs" in tags
        weights["soft"] = extra["soft_loss"]["weight"]
        assert tags["train/teacher_pairs"][0] > 0  # the soft loss had pairs to act on
        assert "soft=" in capsys.readouterr().err  # the progress bar shows it
    else:
        assert "train/soft" not in tags
    if method.startswith("replace"):
        assert "train/replaced" in tags
    # train/task_loss is the weighted sum of the logged terms (soft included)
    total = sum(w * tags[f"train/{k}"][0] for k, w in weights.items())
    assert tags["train/task_loss"][0] == pytest.approx(total, rel=1e-5)


def test_disabled_block_trains_exactly_as_before(sample_data, tmp_path):
    """No block, enable: false (with every other key set), distillation block off: same losses."""
    runs = {
        "none": {},
        "disabled": {
            "mask_teacher": {
                "enable": False,
                "method": "dual_supervision",
                "teacher_type": "vit_h",
                "checkpoint_path": "/nowhere/sam_vit_h.pth",
                "soft_loss": {"type": "kl", "weight": 0.3},
            },
            "distillation": {"enable": False, "encoder_matching": {"enable": True}},
        },
    }
    losses = {}
    for name, sections in runs.items():
        (tmp_path / name).mkdir()
        cfg, _ = tiny_config(
            tmp_path / name, sample_data, train={"epochs": 2, "hflip": True}, **sections
        )
        losses[name] = train(cfg).losses
    assert len(losses["none"]) == 2
    assert losses["disabled"] == losses["none"]


def test_cache_run_never_builds_the_teacher(sample_data, teacher_cache, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the teacher model was built although a cache is configured")

    monkeypatch.setattr(assemble, "build_online_teacher", refuse)
    monkeypatch.setattr(online_teacher, "build_online_teacher", refuse)
    monkeypatch.setattr(online_teacher, "build_sam", refuse)
    cfg, _ = tiny_config(
        tmp_path,
        sample_data,
        train={"epochs": 1, "prompt_source": "teacher"},
        mask_teacher=mask_teacher_block(teacher_cache, tmp_path, method="dual_supervision"),
    )
    assert not Path(cfg.mask_teacher.checkpoint_path).exists()
    result = train(cfg)
    assert math.isfinite(result.losses[0])


def test_online_teacher_end_to_end(sample_data, student_ckpt, tmp_path, monkeypatch):
    """No cache: the teacher runs on every batch (flips, teacher prompts made after it ran)."""
    ckpt = save_teacher(tmp_path / "teacher.pt")
    seen = []
    original = online_teacher.OnlineTeacher.with_teacher_prompts

    def spy(self, batch):
        assert batch.num_prompts == 0  # the dataset left the prompts to the teacher
        out = original(self, batch)
        seen.append((out.num_prompts, out.flipped.tolist()))
        return out

    monkeypatch.setattr(online_teacher.OnlineTeacher, "with_teacher_prompts", spy)
    cfg, _ = tiny_config(
        tmp_path,
        sample_data,
        train={"epochs": 2, "prompt_source": "teacher_grid", "hflip": True},
        model={"checkpoint_path": str(student_ckpt)},
        mask_teacher={
            "enable": True,
            "method": "dual_supervision",
            "teacher_type": TEACHER_TYPE,
            "checkpoint_path": str(ckpt),
            "iou_threshold": 0.1,
        },
        precompute={
            "points_per_side": 4,
            "pred_iou_thresh": 0.0,
            "stability_score_thresh": 0.3,
            "box_nms_thresh": 1.0,
        },
    )
    result = train(cfg)
    assert len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses)
    tags = tensorboard_scalars(tmp_path / "run")
    assert "train/soft" in tags and all(math.isfinite(v) for v in tags["train/soft"])
    assert len(seen) == 2 and all(n > 0 for n, _ in seen)
    assert any(any(flips) for _, flips in seen)  # a flipped image went through the teacher
    assert sum(tags["train/teacher_pairs"]) > 0
