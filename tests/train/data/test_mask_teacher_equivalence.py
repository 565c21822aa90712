"""Cached and online teachers are the same teacher: for the same images, flips, student weights
and prompts, a cache written by the real precompute job and the online teacher hook give the
same teacher masks and points, the same prompts, the same matched pairs and the same losses
within the codec's bound -- a frame, flip or ordering mistake anywhere between precompute and
train breaks it."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from mask_teacher_helpers import TEACHER_TYPE, save_teacher, step_context
from train_helpers import IMAGE_SIZE, make_data

from maskteacher.config import config_from_dict
from maskteacher.models import build_sam
from maskteacher.precompute import PrecomputeJob, run_precompute
from maskteacher.train import assemble, builders
from maskteacher.train.data.batch import collate
from maskteacher.train.distill.blocks import DecoderMatching, EncoderMatching
from maskteacher.train.distill.feature_kd import FeatureDistillation, KDTeacher
from maskteacher.train.distributed import DistInfo
from maskteacher.train.student import StudentForward, run_forward
from maskteacher.train.supervision.criterion import MaskCriterion
from maskteacher.train.supervision.mask_teacher import DualSupervision, ReplaceGTSupervision
from maskteacher.train.supervision.matcher import MatchSettings

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

CLIP = 12.0
FP16_REL = 2.0**-11  # float16 rounding: |error| <= 2^-11 |x|


def codec_bound(codec: str, logits: torch.Tensor) -> torch.Tensor:
    """Largest logit error per pixel of each codec (docs/cache_format.md): int8 C / 254 (the
    online teacher is clipped to +-C like the codec), fp16 2^-11 |x|."""
    if codec == "int8":
        return torch.full_like(logits, CLIP / 254)
    return FP16_REL * logits.abs()


def as_precompute_batches(hook, online, epoch: int, batch_size: int) -> dict:
    """image id -> the online teacher's outputs with the precompute job's batch composition
    (``batch_size`` images per batch, in dataset order), in float32 with no codec involved."""
    out = {}
    n = len(online)
    for start in range(0, n, batch_size):
        items = [online[(k, epoch)] for k in range(start, min(start + batch_size, n))]
        batch = hook(collate(items))
        out.update(zip(batch.image_ids, batch.teacher))
    return out


def float32_noise(reference, logits: torch.Tensor) -> float:
    """Largest logit difference between the same teacher on the same image batched two ways.

    The test teacher's mask head is scaled x1000 (:func:`mask_teacher_helpers.tiny_teacher`): its
    logits are sums of large cancelling terms, whose float32 rounding depends on which images
    share a batch. The cache was written from batches of ``precompute.batch_size`` (2), the
    online teacher here sees one batch of 3; the fp16 codec's bound (2^-11 |x|) is tight
    enough for that difference to show (measured: ~6e-5 against a bound of ~3e-2 at the
    largest logits, a few pixels over by ~1e-5)."""
    noise = float((reference.logits - logits).abs().max())
    # a float32 effect, far below the codec's own error: an image, frame or order mix-up
    # between the two batchings would be orders of magnitude larger
    assert noise <= 0.1 * FP16_REL * float(logits.abs().max()), noise
    return noise


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("equivalence")
    return {
        "root": root,
        "data": make_data(root / "train", images=3, seed=2),
        "teacher": save_teacher(root / "teacher.pt", 0),
        "student": save_teacher(root / "student.pt", 1, model_type="vit_t_tiny"),
    }


def config(setup, codec: str, cache_path):
    return config_from_dict(
        {
            "dataset": {
                "train_dataset": str(setup["data"]),
                "format": "folder",
                "mode": "everything",
                "grid_points": 4,
                "num_workers": 0,
            },
            "model": {"type": "vit_t_tiny", "image_size": IMAGE_SIZE},
            "train": {
                "batch_size": 3,
                "max_prompts": 10,
                "device": "cpu",
                "seed": 3,
                "hflip": False,  # turned on in the plan (flipping_plan)
                "prompt_source": "teacher_grid",
            },
            "mask_teacher": {
                "enable": True,
                "method": "dual_supervision",
                "teacher_type": TEACHER_TYPE,
                "checkpoint_path": str(setup["teacher"]),
                "iou_threshold": 0.1,
                "cache_path": cache_path,
            },
            # embeddings and tokens are part of the comparison (the blocks are built below)
            "distillation": {
                "enable": True,
                "encoder_matching": {"enable": True},
                "decoder_matching": {"enable": True},
            },
            "precompute": {
                "points_per_side": 5,
                "pred_iou_thresh": 0.0,
                "stability_score_thresh": 0.3,
                "box_nms_thresh": 0.9,
                "max_masks_per_image": 24,
                "batch_size": 2,
                "num_workers": 0,
                "device": "cpu",
                "codec": codec,
                "clip": CLIP,
                "store": {"teacher": True, "gt": True, "embedding": True, "tokens": True},
            },
        }
    )


def flipping_plan(cfg):
    """The run plan of ``cfg`` with flips on. The comparison needs both the teacher outputs
    feature distillation reads (embeddings, tokens) and flipped images, a combination ``bind``
    refuses for training (a cached embedding describes the unflipped image), so the config is
    bound without flips and the plan's data spec turns them on."""
    plan = builders.bind(cfg)
    return dataclasses.replace(plan, data=dataclasses.replace(plan.data, hflip=True))


def close(a: float, b: float, rel: float) -> bool:
    return math.isfinite(a) and abs(a - b) <= rel * max(1.0, abs(a))


@pytest.mark.parametrize("codec", ["int8", "fp16"])
def test_cached_and_online_teacher_agree(codec, setup):
    cache = str(setup["root"] / f"cache_{codec}")
    cached_cfg = config(setup, codec, cache)
    summary = run_precompute(PrecomputeJob.from_config(cached_cfg, progress=False))
    assert summary.exit_code == 0 and summary.masks > 0
    online_cfg = config(setup, codec, None)

    cpu = torch.device("cpu")
    fields = frozenset({"logits", "points", "embedding", "tokens"})
    cached_plan, online_plan = flipping_plan(cached_cfg), flipping_plan(online_cfg)
    assert cached_plan.teacher_fields == online_plan.teacher_fields == fields
    assert cached_plan.online is None and online_plan.prompts.defer_teacher_points
    cached = assemble.open_data(cached_plan, DistInfo(), cpu).train_set
    hook = assemble.online_teacher(online_plan, cpu)
    assert fields <= hook.provides and hook.hflip
    online = assemble.open_data(online_plan, DistInfo(), cpu).train_set

    torch.manual_seed(0)
    student = build_sam("vit_t_tiny", str(setup["student"]), image_size=IMAGE_SIZE)
    forward = StudentForward(student, return_tokens=True)
    match = MatchSettings(iou_threshold=0.1)
    strategies = {
        "dual_l2": DualSupervision(
            criterion=MaskCriterion(), match=match, iou_threshold=0.1, soft_type="l2"
        ),
        "dual_kl": DualSupervision(
            criterion=MaskCriterion(), match=match, iou_threshold=0.1, soft_type="kl"
        ),
        "replace_gt": ReplaceGTSupervision(
            criterion=MaskCriterion(), match=match, iou_threshold=0.3
        ),
        "replace_gt_soft": ReplaceGTSupervision(
            criterion=MaskCriterion(), match=match, iou_threshold=0.3, gt_override=False
        ),
    }
    kd = FeatureDistillation(
        teachers=[KDTeacher("t", 1.0, source=lambda batch: batch.teacher, from_batch=True)],
        blocks=[
            EncoderMatching(1.0, 1.0, 2.0, 1.0),
            DecoderMatching(1.0, 1.0, 1.0, 1.0, 1.0, iou_threshold=0.1),
        ],
        batch_fields=fields,
    )
    flips, teacher_pairs = set(), 0
    for epoch in range(2):
        keys = [(k, epoch) for k in (2, 0, 1)]  # not the cache's order
        a = collate([cached[k] for k in keys])
        b = hook(collate([online[k] for k in keys]))
        assert a.image_ids == b.image_ids and torch.equal(a.flipped, b.flipped)
        flips.update(a.flipped.tolist())
        reference = as_precompute_batches(hook, online, epoch, cached_cfg.precompute.batch_size)
        assert torch.equal(a.images, b.images)
        assert all(torch.equal(x, y) for x, y in zip(a.gt_masks, b.gt_masks))
        # the same teacher masks, in the same order and frame
        for i, (x, y) in enumerate(zip(a.teacher, b.teacher)):
            assert x.points.shape[0] > 0, a.image_ids[i]
            assert torch.equal(x.points, y.points), a.image_ids[i]
            err = (x.float_logits() - y.float_logits()).abs()
            bound = codec_bound(codec, y.logits) + 1e-6
            if codec == "fp16":  # int8 keeps its bound: a step ~800x the noise, clipped logits
                bound = bound + 2 * float32_noise(reference[a.image_ids[i]], y.logits)
            assert (err <= bound).all(), (a.image_ids[i], float((err - bound).max()))
            for name in ("embedding", "tokens"):
                cached_v, online_v = getattr(x, name).float(), getattr(y, name)
                bound = FP16_REL * online_v.abs() + 1e-6
                assert ((cached_v - online_v).abs() <= bound).all(), name
        # the same prompts, drawn from the same teacher points with the same generators
        assert torch.equal(a.points, b.points) and torch.equal(a.prompt_offsets, b.prompt_offsets)

        preds = run_forward(forward, a)
        for name, strategy in strategies.items():
            out_a = strategy(preds, a, step_context(image_size=IMAGE_SIZE))
            out_b = strategy(preds, b, step_context(image_size=IMAGE_SIZE))
            for ma, mb in zip(out_a.matches, out_b.matches):
                assert torch.equal(ma.pred, mb.pred) and torch.equal(ma.target, mb.target), name
            for ma, mb in zip(out_a.teacher_matches, out_b.teacher_matches):
                assert torch.equal(ma.pred, mb.pred) and torch.equal(ma.target, mb.target), name
            for key, value in out_a.terms.items():
                va, vb = float(value.detach()), float(out_b.terms[key].detach())
                assert close(va, vb, 1e-2 if codec == "int8" else 1e-3), (name, key, va, vb)
            if name.startswith("dual"):
                teacher_pairs += sum(len(m) for m in out_a.teacher_matches)
        kd_a = kd(preds, a, step_context(image_size=IMAGE_SIZE), out_a)
        kd_b = kd(preds, b, step_context(image_size=IMAGE_SIZE), out_b)
        for key, value in kd_a.terms.items():
            va, vb = float(value.detach()), float(kd_b.terms[key].detach())
            assert close(va, vb, 1e-3), (key, va, vb)
    assert flips == {True, False}  # both orientations were compared
    assert teacher_pairs > 0  # the soft losses compared something
