"""Extending the trainer: the supervision strategies and the distillation blocks are plain dicts
(``SUPERVISIONS``, ``BLOCKS``); a new method or block is one class and one entry."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from mask_teacher_helpers import TEACHER_TYPE, tensorboard_scalars, write_teacher_cache
from train_helpers import tiny_config

from maskteacher.cache_format import open_cache
from maskteacher.errors import UserError
from maskteacher.train import builders
from maskteacher.train.distill.blocks import BLOCKS, EncoderMatching
from maskteacher.train.run import train
from maskteacher.train.supervision import SUPERVISIONS, build_strategy, strategy_name
from maskteacher.train.supervision.criterion import MaskCriterion
from maskteacher.train.supervision.gt import GTSupervision, SingleSupervision
from maskteacher.train.supervision.mask_teacher import DualSupervision, ReplaceGTSupervision
from maskteacher.train.supervision.matcher import MatchSettings

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

BASE_WEIGHTS = {"bce": 1.0, "focal": 15.0, "dice": 1.0, "iou": 1.0, "cls": 1.0}


# ------------------------------------------------------------------------------ strategies


def test_shipped_strategies_and_names():
    shipped = {
        "gt": GTSupervision,
        "single": SingleSupervision,
        "replace_gt": ReplaceGTSupervision,
        "dual_supervision": DualSupervision,
    }
    assert shipped.items() <= SUPERVISIONS.items()
    name = strategy_name
    assert name(mode="everything", mask_teacher_enabled=False, method="dual_supervision") == "gt"
    assert name(mode="everything", mask_teacher_enabled=True, method="replace_gt") == "replace_gt"
    assert name(mode="single", mask_teacher_enabled=False, method="replace_gt") == "single"
    with pytest.raises(UserError, match='needs dataset.mode: "everything"'):
        name(mode="single", mask_teacher_enabled=True, method="replace_gt")


class WeightedSingle(SingleSupervision):
    """Single-mode supervision with every loss weight scaled: one constructor argument the
    builders offer (criterion) and one of its own with a default (scale)."""

    def __init__(self, *, criterion: MaskCriterion, scale: float = 2.0) -> None:
        super().__init__(criterion=criterion)
        self.scale = scale

    def __call__(self, preds, batch, ctx):
        out = super().__call__(preds, batch, ctx)
        out.weights = {k: w * self.scale for k, w in out.weights.items()}
        return out


def test_build_strategy_passes_only_the_arguments_a_class_names(monkeypatch):
    monkeypatch.setitem(SUPERVISIONS, "weighted_single", WeightedSingle)
    criterion = MaskCriterion()
    offered = dict(criterion=criterion, match=MatchSettings(), iou_threshold=0.3, soft_type="l2")
    strategy = build_strategy("weighted_single", **offered)
    assert type(strategy) is WeightedSingle
    assert strategy.criterion is criterion and strategy.scale == 2.0
    assert build_strategy("weighted_single", criterion=criterion, scale=5.0).scale == 5.0
    # a required argument the builders do not offer is a programming error naming it
    with pytest.raises(TypeError, match=r"WeightedSingle needs \['criterion'\]"):
        build_strategy("weighted_single", match=MatchSettings())
    with pytest.raises(TypeError, match=r"DualSupervision needs \['iou_threshold'\]"):
        build_strategy("dual_supervision", criterion=criterion, match=MatchSettings())


def test_unknown_strategy_is_one_user_error_line():
    with pytest.raises(UserError) as info:
        build_strategy("dual_supervison", criterion=MaskCriterion())
    message = str(info.value)
    assert "\n" not in message and "'dual_supervison'" in message
    assert all(repr(name) in message for name in SUPERVISIONS)


def test_new_method_is_one_class_and_one_entry(sample_data, tmp_path, monkeypatch):
    """A strategy that also reads the teacher's masks: its teacher_fields reach the data path (the
    cache's logits arrive in the batch) and its extra term is logged, with nothing else to edit."""
    seen = []

    class GTCountingTeacherMasks(GTSupervision):
        teacher_fields = frozenset({"logits"})

        def __call__(self, preds, batch, ctx):
            out = super().__call__(preds, batch, ctx)
            counts = {i: t.logits.shape[0] for i, t in zip(batch.image_ids, batch.teacher)}
            seen.append(counts)
            out.terms["teacher_masks"] = torch.tensor(float(sum(counts.values())))
            return out

    monkeypatch.setitem(SUPERVISIONS, "gt_counting", GTCountingTeacherMasks)
    cache = write_teacher_cache(tmp_path / "cache", {"train": sample_data["train"]})
    cfg, _ = tiny_config(
        tmp_path, sample_data,
        mask_teacher={"enable": True, "teacher_type": TEACHER_TYPE, "cache_path": str(cache)},
    )  # fmt: skip
    cfg.mask_teacher.method = "gt_counting"  # config files name the shipped methods only
    plan = builders.bind(cfg)
    assert type(plan.strategy) is GTCountingTeacherMasks
    assert plan.teacher_fields == {"logits"} and plan.online is None
    result = train(cfg)
    assert len(result.losses) == 1 and math.isfinite(result.losses[0])
    reader = open_cache(str(cache), split="train")
    stored = {image_id: reader[image_id].teacher_logits.shape[0] for image_id in reader.image_ids}
    assert seen == [stored] and all(n > 0 for n in stored.values())
    tags = tensorboard_scalars(tmp_path / "run")
    assert tags["train/teacher_masks"] == [float(sum(stored.values()))]


# ---------------------------------------------------------------------------- distillation


@dataclass(frozen=True)
class MeanMatching:
    """A new block: ``lambda_ * (mean student embedding - mean teacher embedding)^2``."""

    lambda_: float
    weight: float

    term = "mean"
    fields = frozenset({"embedding"})
    needs_tokens = False

    def __call__(self, view) -> torch.Tensor:
        diff = view.student_embedding.mean() - view.teacher_embedding.mean()
        return self.lambda_ * diff.pow(2)


@dataclass
class MeanMatchingSection:
    """Its config section (``distillation.mean_matching``)."""

    enable: bool = True
    lambda_: float = 3.0
    weight: float = 0.5


def test_shipped_blocks_in_order():
    assert list(BLOCKS) == [
        "encoder_matching", "attention_matching", "relational_KD", "decoder_matching",
        "encoder_patch", "prompt_embed", "decoder_mask_token", "dense_mask_logits",
    ]  # fmt: skip
    assert BLOCKS["encoder_matching"] is EncoderMatching


def test_new_block_is_one_class_and_one_entry(sample_data, tmp_path, monkeypatch):
    monkeypatch.setitem(BLOCKS, "mean_matching", MeanMatching)
    cache = write_teacher_cache(tmp_path / "cache", {"train": sample_data["train"]}, embedding=True)
    cfg, _ = tiny_config(
        tmp_path, sample_data,
        mask_teacher={"teacher_type": TEACHER_TYPE, "cache_path": str(cache)},
        distillation={"enable": True, "lambda_coef": 2.0},
    )  # fmt: skip
    cfg.distillation.mean_matching = MeanMatchingSection()  # config files know the shipped ones
    plan = builders.bind(cfg)
    # built from the section's keys its fields name (``enable`` is not one of them)
    assert plan.kd_blocks == [MeanMatching(lambda_=3.0, weight=0.5)]
    assert plan.teacher_fields == {"embedding"} and plan.online is None
    train(cfg)
    tags = tensorboard_scalars(tmp_path / "run")
    term = tags["train/kd/mask_teacher/mean"][0]
    assert term > 0  # random cached embeddings: the means differ
    base = sum(w * tags[f"train/{k}"][0] for k, w in BASE_WEIGHTS.items())
    # weight: lambda_coef * teacher weight (1, the mask teacher alone) * block weight
    assert tags["train/task_loss"][0] == pytest.approx(base + 2.0 * 0.5 * term, rel=1e-5)
