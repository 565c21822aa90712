"""The origin's four distillation recipes train end to end from per-teacher caches (two teachers,
the four blocks), with the teacher's prompt encoder + mask decoder run on the cached embeddings
for the student's prompts; the teachers' image encoders are never built, their decoders never
receive gradients and are not in the optimizer."""

from __future__ import annotations

import math

import pytest
import torch
from origin_helpers import (
    SHORT,
    TEACHERS,
    kd_sum,
    load,
    origin_setup,
    precompute_teachers,
    scalars_by_step,
    task_sum,
    write_recipe,
)
from segment_anything.modeling import ImageEncoderViT

from maskteacher.models.prompt_decoder import PromptDecoder
from maskteacher.models.tiny_vit import TinyViT
from maskteacher.train import train
from maskteacher.train.distributed import DistInfo
from maskteacher.train.run import TrainingRun

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = origin_setup(tmp_path_factory.mktemp("origin"))
    precompute_teachers(out)
    return out


@pytest.fixture
def no_teacher_encoder(monkeypatch):
    """Building a ViT image encoder (the SAM-H stand-in's) raises; TinyViT encoders (the
    student's, and the MobileSAM stand-in's) are counted."""
    built = []

    def refuse(self, *args, **kwargs):
        raise AssertionError("a teacher's image encoder was built at train time")

    original = TinyViT.__init__

    def count(self, *args, **kwargs):
        built.append(kwargs.get("img_size"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(ImageEncoderViT, "__init__", refuse)
    monkeypatch.setattr(TinyViT, "__init__", count)
    return built


def test_distill_then_finetune(setup, no_teacher_encoder):
    result = train(load(write_recipe(setup, "distill_then_finetune")))
    assert no_teacher_encoder == [64]  # the student's encoder only
    assert len(result.losses) == 4 and all(math.isfinite(v) for v in result.losses)
    tags = scalars_by_step(setup["root"] / "distill_then_finetune")
    for step in (1, 2):  # distill_only: the loss is the weighted sum of the enabled blocks
        assert all(tags[f"train/kd/{n}/{b}"][step] > 0 for n in TEACHERS for b in SHORT)
        assert tags["train/task_loss"][step] == pytest.approx(kd_sum(tags, step), rel=1e-5)
    for step in (3, 4):  # finetune: the task losses, no distillation
        assert step not in tags["train/kd/sam_h/prompt_embed"]
        assert tags["train/task_loss"][step] == pytest.approx(task_sum(tags, step), rel=1e-5)


def test_distill_only_stage_changes_the_student(setup):
    path = write_recipe(
        setup, "distill_then_finetune", model={"save_path": str(setup["root"] / "d1")}
    )
    train(load(path), stop_after_steps=2)  # the 2 steps of the distill-only epoch
    after = torch.load(setup["root"] / "d1" / "last.pt", weights_only=True)["model"]
    before = torch.load(setup["student"], weights_only=True)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("image_encoder.") for k in changed)  # encoder_patch
    assert any(k.startswith("mask_decoder.") for k in changed)  # prompt_embed, mask tokens, logits


def test_finetune_then_distill(setup):
    train(load(write_recipe(setup, "finetune_then_distill")))
    tags = scalars_by_step(setup["root"] / "finetune_then_distill")
    for step in (1, 2):
        assert step not in tags["train/kd/sam_h/encoder_patch"]
        assert tags["train/task_loss"][step] == pytest.approx(task_sum(tags, step), rel=1e-5)
    for step in (3, 4):
        assert tags["train/task_loss"][step] == pytest.approx(kd_sum(tags, step), rel=1e-5)


def test_mobilesam_single_mode_joint(setup):
    result = train(load(write_recipe(setup, "mobileSAM")))
    tags = scalars_by_step(setup["root"] / "mobileSAM")
    scale = tags["distill/lambda_scale"]  # one value per validation (after epochs 0 and 1)
    assert sorted(scale) == [2, 4] and len(result.val_scores) == 2
    for step in (1, 2):  # lambda_coef 1.0 in the first epoch, task and distillation together
        want = task_sum(tags, step) + kd_sum(tags, step)
        assert tags["train/task_loss"][step] == pytest.approx(want, rel=1e-5)
    for step in (3, 4):  # the second epoch runs at the scale set by the first validation
        want = task_sum(tags, step) + kd_sum(tags, step, scale[2])
        assert tags["train/task_loss"][step] == pytest.approx(want, rel=1e-5)


def test_mobilesam_se_everything_mode(setup):
    result = train(load(write_recipe(setup, "mobileSAM_se")))
    assert all(math.isfinite(v) for v in result.losses)
    tags = scalars_by_step(setup["root"] / "mobileSAM_se")
    blocks = SHORT - {"dense_mask_logits"}
    assert "train/kd/sam_h/dense_mask_logits" not in tags
    for step in (1, 2, 3, 4):
        kd = sum(
            w * tags[f"train/kd/{n}/{b}"][step] for n, (_, _, w) in TEACHERS.items() for b in blocks
        )
        assert tags["train/task_loss"][step] == pytest.approx(task_sum(tags, step) + kd, rel=1e-5)


def test_teacher_decoders_are_frozen_and_outside_the_optimizer(setup):
    path = write_recipe(setup, "mobileSAM", model={"save_path": str(setup["root"] / "frozen")})
    run = TrainingRun.setup(load(path), DistInfo(), torch.device("cpu"))
    try:
        kd = run.parts.aux_losses[0]
        decoders = [t.decoder.model for t in kd.teachers]
        assert all(
            isinstance(d, PromptDecoder) and not hasattr(d, "image_encoder") for d in decoders
        )
        params = [p for d in decoders for p in d.parameters()]
        before = [p.detach().clone() for p in params]
        in_optimizer = {id(p) for g in run.parts.optimizer.param_groups for p in g["params"]}
        assert params and not any(id(p) in in_optimizer for p in params)
        assert not any(p.requires_grad for p in params) and not any(d.training for d in decoders)
        run.fit()
    finally:
        if run.lock is not None:
            run.lock.release()
    assert all(p.grad is None for p in params)
    assert all(torch.equal(a, b) for a, b in zip(before, params))
