"""A SAM-HQ teacher, cached and online, is the same teacher (the spec's block: a SAM teacher type
with a SAM-HQ checkpoint on both sides), and the online SAM-HQ teacher never receives gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from mask_teacher_helpers import save_teacher, step_context
from test_mask_teacher_equivalence import (
    FP16_REL,
    as_precompute_batches,
    codec_bound,
    config,
    flipping_plan,
    float32_noise,
)
from train_helpers import IMAGE_SIZE, make_data, tiny_config

from maskteacher.cache_format import open_cache
from maskteacher.cli import main
from maskteacher.models import build_sam, is_hq_model
from maskteacher.precompute import PrecomputeJob, run_precompute
from maskteacher.train import assemble, builders
from maskteacher.train.data.batch import collate
from maskteacher.train.distributed import DistInfo
from maskteacher.train.student import StudentForward, run_forward
from maskteacher.train.supervision.criterion import MaskCriterion
from maskteacher.train.supervision.mask_teacher import DualSupervision
from maskteacher.train.supervision.matcher import MatchSettings

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hq_equivalence")
    return {
        "root": root,
        "data": make_data(root / "train", images=3, seed=2),
        # a SAM-HQ file; the configs name its SAM type (mask_teacher_helpers.TEACHER_TYPE)
        "teacher": save_teacher(root / "sam_hq.pt", 0, model_type="vit_b_tiny_hq"),
        "student": save_teacher(root / "student.pt", 1, model_type="vit_t_tiny"),
    }


@pytest.mark.parametrize("codec", ["int8", "fp16"])
def test_cached_and_online_hq_teacher_agree(codec, setup):
    cache = str(setup["root"] / f"cache_{codec}")
    cached_cfg = config(setup, codec, cache)
    assert cached_cfg.mask_teacher.teacher_type == "vit_b_tiny"  # a SAM type + a SAM-HQ file
    summary = run_precompute(PrecomputeJob.from_config(cached_cfg, progress=False))
    assert summary.exit_code == 0 and summary.masks > 0
    assert open_cache(cache).header.teacher_type == "vit_b_tiny_hq"

    cpu = torch.device("cpu")
    cached = assemble.open_data(flipping_plan(cached_cfg), DistInfo(), cpu).train_set
    online_plan = flipping_plan(config(setup, codec, None))
    hook = assemble.online_teacher(online_plan, cpu)
    assert is_hq_model(hook.model) and hook.model.model_type == "vit_b_tiny_hq"
    online = assemble.open_data(online_plan, DistInfo(), cpu).train_set

    flips = set()
    for epoch in range(2):
        keys = [(k, epoch) for k in (2, 0, 1)]
        a = collate([cached[k] for k in keys])
        b = hook(collate([online[k] for k in keys]))
        assert torch.equal(a.flipped, b.flipped)
        flips.update(a.flipped.tolist())
        reference = as_precompute_batches(hook, online, epoch, cached_cfg.precompute.batch_size)
        for i, (x, y) in enumerate(zip(a.teacher, b.teacher)):
            assert x.points.shape[0] > 0, a.image_ids[i]
            assert torch.equal(x.points, y.points), a.image_ids[i]
            err = (x.float_logits() - y.float_logits()).abs()
            bound = codec_bound(codec, y.logits) + 1e-6
            if codec == "fp16":  # as in test_mask_teacher_equivalence: batching noise
                bound = bound + 2 * float32_noise(reference[a.image_ids[i]], y.logits)
            assert (err <= bound).all(), a.image_ids[i]
            for name in ("embedding", "tokens"):
                cached_v, online_v = getattr(x, name).float(), getattr(y, name)
                assert ((cached_v - online_v).abs() <= FP16_REL * online_v.abs() + 1e-6).all()
        assert torch.equal(a.points, b.points)
    assert flips == {True, False}


def test_online_hq_teacher_never_receives_gradients(setup):
    plan = builders.bind(config(setup, "int8", None))
    hook = assemble.online_teacher(plan, torch.device("cpu"))
    teacher = hook.model
    assert not any(p.requires_grad for p in teacher.parameters())
    online = assemble.open_data(plan, DistInfo(), torch.device("cpu")).train_set
    batch = hook(collate([online[(k, 0)] for k in range(3)]))
    assert not any(t.logits.requires_grad for t in batch.teacher)

    torch.manual_seed(0)
    student = build_sam("vit_t_tiny", str(setup["student"]), image_size=IMAGE_SIZE).train()
    preds = run_forward(StudentForward(student), batch)
    dual = DualSupervision(
        criterion=MaskCriterion(),
        match=MatchSettings(iou_threshold=0.1),
        iou_threshold=0.1,
        soft_type="kl",
    )
    out = dual(preds, batch, step_context(image_size=IMAGE_SIZE))
    sum(out.terms.values()).backward()
    assert sum(len(m) for m in out.teacher_matches) > 0  # the soft loss had pairs
    assert any(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training


def test_sam_hq_student_is_refused_in_one_line(sample_data, tmp_path, capsys):
    _, path = tiny_config(tmp_path, sample_data, load=False, model={"type": "vit_t_tiny_hq"})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "maskteacher: error: model.type: vit_t_tiny_hq is a SAM-HQ model, a teacher "
        "(mask_teacher.teacher_type) or a model to evaluate, not a student; train one of "
        "vit_h, vit_l, vit_b, vit_t, vit_t_tiny, vit_b_tiny"
    ]


def _identity(teacher_type: str, checkpoint, generation: dict):
    from maskteacher.train.data.teacher_cache import TeacherIdentity

    return TeacherIdentity(
        where="mask_teacher.cache_path",
        teacher_type=teacher_type,
        type_key="mask_teacher.teacher_type",
        checkpoint=None if checkpoint is None else str(checkpoint),
        checkpoint_key="mask_teacher.checkpoint_path",
        image_size=IMAGE_SIZE,
        generation=generation,
    )


def test_hq_cache_identity_checks(setup, tmp_path, caplog):
    """The spec's SAM type matches a SAM-HQ cache when its file is SAM-HQ (or absent: the file
    would tell); a plain SAM file, another backbone or another hq_token_only is refused."""
    import logging

    from mask_teacher_helpers import write_teacher_cache

    from maskteacher.config import PrecomputeConfig
    from maskteacher.errors import UserError
    from maskteacher.models.everything import GenerationParams
    from maskteacher.train.data.teacher_cache import check_cache_identity

    generation = GenerationParams.from_config(PrecomputeConfig())
    cache = write_teacher_cache(
        tmp_path / "cache",
        {"train": setup["data"]},
        teacher_type="vit_b_tiny_hq",
        checkpoint=setup["teacher"],
        params={"hq_token_only": False},
    )
    check_cache_identity(str(cache), _identity("vit_b_tiny", setup["teacher"], generation))
    with caplog.at_level(logging.INFO):
        check_cache_identity(str(cache), _identity("vit_b_tiny", tmp_path / "gone.pt", generation))
    assert "the SAM-HQ variant of mask_teacher.teacher_type = vit_b_tiny" in caplog.text
    plain = save_teacher(tmp_path / "plain.pt", 0, model_type="vit_b_tiny")
    with pytest.raises(UserError, match="teacher_type 'vit_b_tiny_hq'"):
        check_cache_identity(str(cache), _identity("vit_b_tiny", plain, generation))
    with pytest.raises(UserError, match="teacher_type 'vit_b_tiny_hq'"):
        check_cache_identity(str(cache), _identity("vit_t_tiny", None, generation))
    other = dataclasses.replace(generation, hq_token_only=True)
    with pytest.raises(UserError, match="hq_token_only = False"):
        check_cache_identity(str(cache), _identity("vit_b_tiny", setup["teacher"], other))
