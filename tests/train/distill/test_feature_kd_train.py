"""Feature distillation end to end on sample data: each block from the cache, several teachers
with their own caches and weights, stage switching, the online teacher, shape errors."""

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
from train_helpers import make_data, tiny_config

from maskteacher.config import TeacherEntry
from maskteacher.errors import UserError
from maskteacher.train.run import train

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

BASE_WEIGHTS = {"bce": 1.0, "focal": 15.0, "dice": 1.0, "iou": 1.0, "cls": 1.0}


@pytest.fixture(scope="module")
def data3(tmp_path_factory) -> dict[str, Path]:
    """3 training images: relational KD needs 3 per micro-batch."""
    return {"train": make_data(tmp_path_factory.mktemp("kd") / "train", images=3, seed=4)}


@pytest.fixture(scope="module")
def kd_cache(data3, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kd_cache")
    return write_teacher_cache(root / "cache", data3, embedding=True, tokens=True, seed=1)


def kd_config(tmp_path, data, cache, *, blocks, method="dual_supervision", **sections):
    mask_teacher = {
        "enable": method is not None,
        "method": method or "dual_supervision",
        "teacher_type": TEACHER_TYPE,
        "cache_path": None if cache is None else str(cache),
        "iou_threshold": 0.1,
        **sections.pop("mask_teacher", {}),
    }
    distillation = {"enable": True, **{b: {"enable": True} for b in blocks}}
    distillation.update(sections.pop("distillation", {}))
    train_section = {"epochs": 1, "batch_size": 3, "max_prompts": 8}
    train_section.update(sections.pop("train", {}))
    return tiny_config(
        tmp_path, data, mask_teacher=mask_teacher, distillation=distillation,
        train=train_section, **sections,
    )  # fmt: skip


SHORT = {
    "encoder_matching": "encoder",
    "decoder_matching": "decoder",
    "attention_matching": "attention",
    "relational_KD": "relational",
}


@pytest.mark.parametrize(
    "block, method",
    [
        ("encoder_matching", None),
        ("decoder_matching", "dual_supervision"),
        ("decoder_matching", None),
        ("attention_matching", "replace_gt"),
        ("relational_KD", None),
    ],
)
def test_each_block_end_to_end(block, method, data3, kd_cache, student_ckpt, tmp_path):
    cfg, _ = kd_config(
        tmp_path, data3, kd_cache, blocks=[block], method=method,
        distillation={"lambda_coef": 2.0},
        model={"checkpoint_path": str(student_ckpt)},
        train={"prompt_source": "teacher_grid"},
    )  # fmt: skip
    result = train(cfg)
    run = tmp_path / "run"
    assert len(result.losses) == 1 and math.isfinite(result.losses[0])
    assert (run / "last.pt").is_file() and (run / "student_official.pth").is_file()
    tags = tensorboard_scalars(run)
    key = f"train/kd/mask_teacher/{SHORT[block]}"
    assert key in tags and math.isfinite(tags[key][0])
    assert tags[key][0] > 0  # the block computed something (pairs / a difference)
    weights = dict(BASE_WEIGHTS)
    if method == "dual_supervision":
        weights["soft"] = 0.5
    total = sum(w * tags[f"train/{k}"][0] for k, w in weights.items()) + 2.0 * tags[key][0]
    assert tags["train/task_loss"][0] == pytest.approx(total, rel=1e-5)


def test_several_teachers_with_own_caches_and_weights(data3, kd_cache, tmp_path):
    other = write_teacher_cache(tmp_path / "other", data3, embedding=True, seed=7)
    cfg, _ = kd_config(
        tmp_path, data3, kd_cache, blocks=["encoder_matching"], method=None,
        distillation={"lambda_coef": 2.0, "encoder_matching": {"enable": True, "weight": 3.0}},
    )  # fmt: skip
    cfg.teachers = [
        TeacherEntry(name="a", type=TEACHER_TYPE, cache_path=str(kd_cache), weight=0.25),
        TeacherEntry(name="b", type=TEACHER_TYPE, cache_path=str(other)),  # weight 1/2
    ]
    train(cfg)
    tags = tensorboard_scalars(tmp_path / "run")
    a, b = tags["train/kd/a/encoder"][0], tags["train/kd/b/encoder"][0]
    assert a > 0 and b > 0 and a != pytest.approx(b)  # different teachers, different targets
    base = sum(w * tags[f"train/{k}"][0] for k, w in BASE_WEIGHTS.items())
    want = base + 2.0 * 3.0 * (0.25 * a + 0.5 * b)
    assert tags["train/task_loss"][0] == pytest.approx(want, rel=1e-5)


def test_stage_schedule_switches_distillation(data3, kd_cache, tmp_path):
    cfg, _ = kd_config(
        tmp_path, data3, kd_cache, blocks=["encoder_matching"], method=None,
        distillation={"enable": False},
        train={"epochs": 2},
    )  # fmt: skip
    from maskteacher.config import StageConfig

    cfg.stage_schedule = [StageConfig(name="kd", start_epoch=1, distillation=True, lambda_coef=0.5)]
    result = train(cfg)
    tags = tensorboard_scalars(tmp_path / "run")
    assert len(result.losses) == 2
    assert len(tags["train/task_loss"]) == 2
    assert len(tags["train/kd/mask_teacher/encoder"]) == 1  # only the second epoch


def test_online_teacher_provides_embedding_and_tokens(data3, student_ckpt, tmp_path):
    ckpt = save_teacher(tmp_path / "teacher.pt")
    cfg, _ = kd_config(
        tmp_path, data3, None, blocks=["encoder_matching", "decoder_matching"],
        mask_teacher={"checkpoint_path": str(ckpt)},
        model={"checkpoint_path": str(student_ckpt)},
        precompute={"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.3},
    )  # fmt: skip
    result = train(cfg)
    assert math.isfinite(result.losses[0])
    tags = tensorboard_scalars(tmp_path / "run")
    assert tags["train/kd/mask_teacher/encoder"][0] > 0
    assert math.isfinite(tags["train/kd/mask_teacher/decoder"][0])


def test_embedding_width_mismatch_is_an_error(data3, tmp_path):
    narrow = write_teacher_cache(tmp_path / "narrow", data3, embedding=True, embed_dim=32)
    cfg, _ = kd_config(tmp_path, data3, narrow, blocks=["encoder_matching"], method=None)
    with pytest.raises(UserError, match=r"image embedding is \(64, 4, 4\).*\(32, 4, 4\)"):
        train(cfg)
