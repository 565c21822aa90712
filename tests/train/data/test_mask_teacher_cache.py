"""The teacher source: a cache that does not match the config, caches lacking a stored field,
distillation configuration errors, and a missing teacher -- one clear line each."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mask_teacher_helpers import TEACHER_TYPE, save_teacher, write_teacher_cache
from train_helpers import IMAGE_SIZE, tiny_config

from maskteacher.cli import main as cli_main
from maskteacher.config import TeacherEntry
from maskteacher.errors import UserError
from maskteacher.train import assemble, builders
from maskteacher.train.distributed import DistInfo
from maskteacher.train.run import train
from maskteacher.train.supervision.mask_teacher import DualSupervision


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt")


def dual_config(tmp_path, data, cache, **sections):
    block = {
        "enable": True,
        "method": "dual_supervision",
        "teacher_type": TEACHER_TYPE,
        "checkpoint_path": str(tmp_path / "absent.pt"),
        "cache_path": str(cache),
    }
    block.update(sections.pop("mask_teacher", {}))
    teachers = sections.pop("teachers", [])
    cfg, path = tiny_config(tmp_path, data, mask_teacher=block, **sections)
    cfg.teachers = [TeacherEntry(**entry) for entry in teachers]
    return cfg, path


def open_run(cfg):
    """Bind ``cfg`` and open its data as the trainer does (the cache checks happen here)."""
    plan = builders.bind(cfg)
    return plan, assemble.open_data(plan, DistInfo(), torch.device("cpu"))


def test_matching_cache_and_checkpoint_pass(sample_data, teacher_ckpt, tmp_path):
    cache = write_teacher_cache(
        tmp_path / "cache", {"train": sample_data["train"]}, checkpoint=teacher_ckpt,
        params={"points_per_side": 8},
    )  # fmt: skip
    cfg, _ = dual_config(
        tmp_path, sample_data, cache,
        mask_teacher={"checkpoint_path": str(teacher_ckpt)}, precompute={"points_per_side": 8},
    )  # fmt: skip
    plan, data = open_run(cfg)
    assert isinstance(plan.strategy, DualSupervision) and data.cache_id.startswith("sha256:")


@pytest.mark.parametrize(
    "cache_kwargs, sections, expected",
    [
        (
            {"teacher_type": "vit_t_tiny"},
            {},
            ["teacher_type 'vit_t_tiny'", "mask_teacher.teacher_type = 'vit_b_tiny'"],
        ),
        (
            {"params": {"points_per_side": 16}},
            {},
            ["points_per_side = 16", "precompute.points_per_side = 32"],
        ),
        (
            {"params": {"stability_score_thresh": 0.9}},
            {},
            ["stability_score_thresh = 0.9", "precompute.stability_score_thresh = 0.95"],
        ),
        (
            {"params": {"pred_iou_thresh": 0.5}},
            {"precompute": {"pred_iou_thresh": 0.7}},
            ["pred_iou_thresh = 0.5", "precompute.pred_iou_thresh = 0.7"],
        ),
        (
            {"params": {"max_masks_per_image": 50}},
            {},
            ["max_masks_per_image = 50", "precompute.max_masks_per_image = None"],
        ),
        (
            {"image_size": 128},
            {},
            ["image_size = 128", "model.image_size = 64"],
        ),
    ],
)
def test_cache_config_mismatch_is_one_line(
    cache_kwargs, sections, expected, sample_data, tmp_path, capsys
):
    cache = write_teacher_cache(tmp_path / "cache", {"train": sample_data["train"]}, **cache_kwargs)
    cfg, path = dual_config(tmp_path, sample_data, cache, **sections)
    with pytest.raises(UserError) as info:
        open_run(cfg)
    message = str(info.value)
    assert "\n" not in message and message.startswith("mask_teacher.cache_path")
    for part in expected:
        assert part in message, (part, message)
    assert cli_main(["train", str(path)]) == 2  # the CLI prints it and exits 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected[0] in err[0]


def test_checkpoint_sha_checked_when_the_file_is_present(sample_data, teacher_ckpt, tmp_path):
    other = save_teacher(tmp_path / "other.pt", seed=1)
    cache = write_teacher_cache(
        tmp_path / "cache", {"train": sample_data["train"]}, checkpoint=teacher_ckpt
    )
    cfg, _ = dual_config(tmp_path, sample_data, cache, mask_teacher={"checkpoint_path": str(other)})
    with pytest.raises(UserError, match=r"mask_teacher.checkpoint_path .*other.pt has sha256"):
        open_run(cfg)
    # absent file: training from the cache needs no weights, nothing to compare
    cfg.mask_teacher.checkpoint_path = str(tmp_path / "gone.pt")
    plan, data = open_run(cfg)
    assert isinstance(plan.strategy, DualSupervision) and data.cache_id.startswith("sha256:")


@pytest.mark.parametrize(
    "block, flag",
    [
        ("encoder_matching", "embedding"),
        ("attention_matching", "embedding"),
        ("relational_KD", "embedding"),
        ("decoder_matching", "tokens"),
    ],
)
def test_missing_stored_field_names_the_store_flag(block, flag, sample_data, tmp_path, capsys):
    cache = write_teacher_cache(tmp_path / "cache", {"train": sample_data["train"]})
    _, path = dual_config(
        tmp_path, sample_data, cache, distillation={"enable": True, block: {"enable": True}}
    )
    assert cli_main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"precompute.store.{flag}: true" in err[0] and f"teacher {flag}" in err[0]


def test_extra_teacher_cache_checks(sample_data, tmp_path):
    mask_cache = write_teacher_cache(
        tmp_path / "mask", {"train": sample_data["train"]}, embedding=True
    )
    bare = write_teacher_cache(tmp_path / "bare", {"train": sample_data["train"]})
    entry = {"name": "b", "type": TEACHER_TYPE, "cache_path": str(bare)}
    cfg, _ = dual_config(
        tmp_path, sample_data, mask_cache,
        distillation={"enable": True, "encoder_matching": {"enable": True}}, teachers=[entry],
    )  # fmt: skip
    with pytest.raises(UserError, match=r"teachers\[0\].cache_path .*precompute.store.embedding"):
        train(cfg)
    cfg.teachers[0].type = "vit_h"
    with pytest.raises(UserError, match=r"teacher_type 'vit_b_tiny'.*teachers\[0\].type = 'vit_h'"):
        train(cfg)


def test_distillation_config_errors(sample_data, tmp_path):
    cache = write_teacher_cache(tmp_path / "cache", {"train": sample_data["train"]}, embedding=True)
    kd = {"enable": True, "encoder_matching": {"enable": True}}
    cfg, _ = dual_config(
        tmp_path, sample_data, cache, distillation=kd, teachers=[{"name": "x", "type": "vit_h"}]
    )
    with pytest.raises(UserError, match="teachers 'x': cache_path is not set"):
        train(cfg)
    cfg, _ = dual_config(tmp_path, sample_data, cache, distillation=kd, train={"hflip": True})
    with pytest.raises(UserError, match="train.hflip: true cannot be combined"):
        train(cfg)


def test_no_cache_and_no_checkpoint_is_one_line(sample_data, tmp_path, capsys):
    _, path = tiny_config(
        tmp_path, sample_data, load=False,
        mask_teacher={"enable": True, "method": "replace_gt", "teacher_type": TEACHER_TYPE},
    )  # fmt: skip
    assert cli_main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "mask_teacher.cache_path is not set" in err[0] and "checkpoint_path" in err[0]


def test_online_teacher_is_frozen_and_outside_the_optimizer(sample_data, teacher_ckpt, tmp_path):
    cfg, _ = tiny_config(
        tmp_path, sample_data,
        mask_teacher={
            "enable": True, "method": "dual_supervision", "teacher_type": TEACHER_TYPE,
            "checkpoint_path": str(teacher_ckpt),
        },
    )  # fmt: skip
    plan = builders.bind(cfg)
    hook = assemble.online_teacher(plan, torch.device("cpu"))
    assert not hook.model.training
    assert not any(p.requires_grad for p in hook.model.parameters())
    assert hook.provides >= {"logits", "points"} and "embedding" not in hook.provides
    assert hook.model.image_encoder.img_size == IMAGE_SIZE
    # the hook gives the teacher's outputs, computed without autograd
    parts = assemble.open_data(plan, DistInfo(), torch.device("cpu"))
    batch = hook(next(iter(parts.train_loader)))
    assert batch.teacher is not None and len(batch.teacher) == batch.num_images
    assert all(not t.logits.requires_grad for t in batch.teacher)
