"""replace_gt and dual_supervision on tiny hand-made tensors, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from mask_teacher_helpers import box_mask, hand_batch, hand_predictions, logits_of, step_context

from maskteacher.train.supervision.criterion import MaskCriterion, PairBatch, weighted_total
from maskteacher.train.supervision.gt import GTSupervision
from maskteacher.train.supervision.losses import SOFT_LOSSES, soft_kl, soft_kl_teacher, soft_l2
from maskteacher.train.supervision.mask_teacher import (
    DualSupervision,
    ReplaceGTSupervision,
    improved_teacher_sets,
)
from maskteacher.train.supervision.matcher import MatchSettings

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def bernoulli_kl(s: float, t: float) -> float:
    """KL(sigmoid(s) || sigmoid(t)) written out with the math module."""
    p = 1 / (1 + math.exp(-s))
    return p * (logsigmoid(s) - logsigmoid(t)) + (1 - p) * (logsigmoid(-s) - logsigmoid(-t))


# ------------------------------------------------------------------------- soft loss functions


def test_soft_l2_and_kl_hand_values():
    s = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [0.0, 4.0]])
    assert soft_l2(s, t).tolist() == pytest.approx([2.5, 8.0])
    want = [
        (bernoulli_kl(1, 0) + bernoulli_kl(2, 0)) / 2,
        (bernoulli_kl(0, 0) + bernoulli_kl(0, 4)) / 2,
    ]
    assert soft_kl(s, t).tolist() == pytest.approx(want, rel=1e-6)
    assert soft_kl(t, t).abs().max() < 1e-7  # KL of a distribution with itself


def test_soft_kl_is_finite_and_exact_for_saturated_logits():
    s = torch.tensor([[50.0, -50.0, 30.0]], requires_grad=True)
    t = torch.tensor([[-12.0, 12.0, 30.0]])
    kl = soft_kl(s, t)
    want = (bernoulli_kl(50, -12) + bernoulli_kl(-50, 12) + 0.0) / 3
    assert math.isfinite(float(kl.detach())) and float(kl.detach()) == pytest.approx(want, rel=1e-5)
    kl.sum().backward()
    assert torch.isfinite(s.grad).all()


def test_soft_kl_teacher_hand_values_is_the_other_direction():
    s = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [0.0, 4.0]])
    want = [
        (bernoulli_kl(0, 1) + bernoulli_kl(0, 2)) / 2,
        (bernoulli_kl(0, 0) + bernoulli_kl(4, 0)) / 2,
    ]
    assert soft_kl_teacher(s, t).tolist() == pytest.approx(want, rel=1e-6)
    assert soft_kl_teacher(s, t).tolist() == pytest.approx(soft_kl(t, s).tolist(), rel=1e-6)
    assert soft_kl_teacher(t, t).abs().max() < 1e-7
    # the two directions differ: KL is not symmetric
    assert soft_kl_teacher(s, t).tolist() != pytest.approx(soft_kl(s, t).tolist(), rel=1e-3)
    # it is the BCE of the student against the soft target q minus the teacher's entropy
    q = torch.sigmoid(t)
    entropy = -(q * q.log() + (1 - q) * (1 - q).log()).mean(-1)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(s, q, reduction="none").mean(-1)
    assert soft_kl_teacher(s, t).tolist() == pytest.approx((bce - entropy).tolist(), rel=1e-5)


def test_kl_gradients_where_the_student_is_confidently_wrong():
    """The issue's figures: student logit -8, teacher +8 (one pixel)."""
    for fn, want in ((soft_kl, -0.005363), (soft_kl_teacher, -0.999329)):
        s = torch.tensor([[-8.0]], requires_grad=True)
        fn(s, torch.tensor([[8.0]])).sum().backward()
        assert float(s.grad) == pytest.approx(want, rel=1e-3)
    # by hand: d KL(p||q)/ds = p (1 - p) (s - t); d KL(q||p)/ds = p - q
    p, q = 1 / (1 + math.exp(8)), 1 / (1 + math.exp(-8))
    assert p * (1 - p) * -16 == pytest.approx(-0.005363, rel=1e-3)
    assert p - q == pytest.approx(-0.999329, rel=1e-5)


def test_soft_kl_teacher_is_finite_and_exact_for_saturated_logits():
    s = torch.tensor([[50.0, -50.0, 30.0, -90.0]], requires_grad=True)
    t = torch.tensor([[-12.0, 12.0, 30.0, 12.0]])
    kl = soft_kl_teacher(s, t)
    want = (bernoulli_kl(-12, 50) + bernoulli_kl(12, -50) + 0.0 + bernoulli_kl(12, -90)) / 4
    assert math.isfinite(float(kl.detach())) and float(kl.detach()) == pytest.approx(want, rel=1e-5)
    kl.sum().backward()
    # gradient p - q per pixel, divided by the 4 pixels of the mean
    p, q = torch.sigmoid(s.detach()), torch.sigmoid(t)
    assert torch.allclose(s.grad, (p - q) / 4, atol=1e-7)
    assert s.grad[0, 3] == pytest.approx(-1 / 4, rel=1e-4)  # confidently wrong: full gradient


def test_every_soft_loss_type_of_the_config_is_registered():
    from typing import get_args, get_type_hints

    from maskteacher.config import SoftLoss

    assert set(get_args(get_type_hints(SoftLoss)["type"])) == set(SOFT_LOSSES)


# ------------------------------------------------------------------------- dual supervision


def dual_case(teacher_masks_and_values):
    """One 16 x 16 image (L = 4): GT = rows 0-1 x cols 0-1; student s0 = the GT exactly,
    s1 = rows 2-3 x cols 2-3."""
    low = 4
    gt = torch.stack([box_mask(low, 0, 2, 0, 2)])
    s0, s1 = box_mask(low, 0, 2, 0, 2), box_mask(low, 2, 4, 2, 4)
    teacher = torch.stack([logits_of(m, v) for m, v in teacher_masks_and_values])
    batch = hand_batch([gt], [teacher], [torch.tensor([[2.0, 2.0], [14.0, 14.0]])])
    preds = hand_predictions(torch.stack([logits_of(s0), logits_of(s1)]), torch.tensor([0.8, 0.6]))
    return batch, preds


T0 = (box_mask(4, 2, 4, 2, 4), 3.0)  # = s1 (IoU 1)
T1 = (box_mask(4, 0, 1, 0, 4), 3.0)  # row 0: IoU 1/3 with s0, 0 with s1


def dual(threshold: float, kind: str = "l2", weight: float = 0.5) -> DualSupervision:
    return DualSupervision(
        criterion=MaskCriterion(),
        match=MatchSettings(iou_threshold=0.3),
        iou_threshold=threshold,
        soft_type=kind,
        soft_weight=weight,
    )


def test_dual_l2_hand_values_and_gt_terms_unchanged():
    batch, preds = dual_case([T0, T1])
    ctx = step_context()
    # threshold 0.5: only (s1, t0); l2 = (5 - 3)^2 everywhere = 4
    out = dual(0.5)(preds, batch, ctx)
    assert float(out.terms["soft"]) == pytest.approx(4.0)
    assert [(m.pred.tolist(), m.target.tolist()) for m in out.teacher_matches] == [([1], [0])]
    assert out.weights["soft"] == 0.5
    # the GT part is exactly the gt strategy's
    gt_out = GTSupervision(criterion=MaskCriterion(), match=MatchSettings(iou_threshold=0.3))(
        preds, batch, step_context()
    )
    for key, value in gt_out.terms.items():
        assert torch.equal(out.terms[key], value), key
    assert out.stats == gt_out.stats
    # threshold 0.3: also (s0, t1), IoU 1/3: per-pixel squared errors 2x4 + 2x64 + 2x64 + 10x4
    # over 16 pixels = 19; mean over the two pairs = (4 + 19) / 2
    out = dual(0.3)(preds, batch, step_context())
    assert float(out.terms["soft"]) == pytest.approx(11.5)
    assert float(out.terms["teacher_pairs"]) == 2.0
    total = weighted_total(out.terms, out.weights)
    assert float(total) == pytest.approx(float(weighted_total(gt_out.terms, gt_out.weights)) + 5.75)


def test_dual_kl_hand_value():
    batch, preds = dual_case([T0, T1])
    out = dual(0.3, "kl")(preds, batch, step_context())
    pair0 = bernoulli_kl(-5, -3) * 12 / 16 + bernoulli_kl(5, 3) * 4 / 16  # (s1, t0)
    pair1 = (
        2 * bernoulli_kl(5, 3)
        + 2 * bernoulli_kl(-5, 3)
        + 2 * bernoulli_kl(5, -3)
        + 10 * bernoulli_kl(-5, -3)
    ) / 16  # (s0, t1)
    assert float(out.terms["soft"]) == pytest.approx((pair0 + pair1) / 2, rel=1e-5)


def test_dual_kl_teacher_hand_value():
    batch, preds = dual_case([T0, T1])
    out = dual(0.3, "kl_teacher")(preds, batch, step_context())
    pair0 = bernoulli_kl(-3, -5) * 12 / 16 + bernoulli_kl(3, 5) * 4 / 16  # (s1, t0)
    pair1 = (
        2 * bernoulli_kl(3, 5)
        + 2 * bernoulli_kl(3, -5)
        + 2 * bernoulli_kl(-3, 5)
        + 10 * bernoulli_kl(-3, -5)
    ) / 16  # (s0, t1)
    assert float(out.terms["soft"]) == pytest.approx((pair0 + pair1) / 2, rel=1e-5)


def test_dual_soft_loss_averages_with_the_all_reduced_count():
    batch, preds = dual_case([T0, T1])
    # under DDP reduce_count gives the mean pair count over the ranks; here: 4 per rank
    out = dual(0.3)(preds, batch, step_context(reduce_count=lambda v: 4.0))
    assert float(out.terms["soft"]) == pytest.approx((4 + 19) / 4)
    # one pair here, none on the other rank: mean 0.5 -- not clamped to 1, so that the ranks'
    # averaged gradients equal one process's on the whole batch (sum / 1 pair)
    out = dual(0.5)(preds, batch, step_context(reduce_count=lambda v: 0.5))
    assert float(out.terms["soft"]) == pytest.approx(4 / 0.5)


@pytest.mark.parametrize("kind", ["l2", "kl", "kl_teacher"])
def test_dual_without_pairs_is_exactly_zero_and_finite(kind):
    batch, preds = dual_case([T1])  # IoU 1/3 < 0.5, and t1 does not touch s1
    out = dual(0.5, kind)(preds, batch, step_context())
    assert float(out.terms["soft"]) == 0.0 and float(out.terms["teacher_pairs"]) == 0.0
    total = weighted_total(out.terms, out.weights)
    assert math.isfinite(float(total))
    total.backward()
    assert torch.isfinite(preds.logits.grad).all()
    # no teacher masks at all
    empty = hand_batch(
        batch.gt_masks, [torch.zeros(0, 4, 4)], [torch.tensor([[2.0, 2.0], [14.0, 14.0]])]
    )
    out = dual(0.5, kind)(preds, empty, step_context())
    assert float(out.terms["soft"]) == 0.0


def test_dual_threshold_zero_never_pairs_disjoint_masks():
    batch, preds = dual_case([(box_mask(4, 3, 4, 0, 1), 3.0)])  # touches neither prediction
    out = dual(0.0)(preds, batch, step_context())
    assert float(out.terms["soft"]) == 0.0


# ------------------------------------------------------------------------------- replace_gt

LOW = 8


def replace_case(value: float = 5.0):
    """One 32 x 32 image (L = 8). GT g0 = rows 0-3 x cols 0-3, g1 = rows 5-7 x cols 0-2 (no
    teacher mask finds it). Teacher t0 (IoU 0.75 with g0), t1 (IoU 0.5 with g0), t2 elsewhere.
    Students: s0 = t1, s1 = g0, s2 = t2, s3 = g1."""
    g0, g1 = box_mask(LOW, 0, 4, 0, 4), box_mask(LOW, 5, 8, 0, 3)
    t0, t1, t2 = box_mask(LOW, 0, 4, 0, 3), box_mask(LOW, 0, 4, 0, 2), box_mask(LOW, 5, 8, 5, 8)
    teacher = torch.stack([logits_of(t0, value), logits_of(t1, value), logits_of(t2, value)])
    students = torch.stack([t1, g0, t2, g1])
    points = torch.tensor([[2.0, 2.0], [6.0, 6.0], [26.0, 26.0], [2.0, 26.0]])
    batch = hand_batch([torch.stack([g0, g1])], [teacher], [points], image_size=32)
    preds = hand_predictions(logits_of(students), torch.tensor([0.9, 0.8, 0.7, 0.6]))
    return batch, preds, (g0, g1, t0, t1, t2), teacher


def test_one_gt_replaces_only_one_of_two_matching_teacher_masks():
    _, _, (g0, g1, t0, t1, t2), _ = replace_case()
    improved, kept = improved_teacher_sets(
        [torch.stack([t0, t1, t2])], [torch.stack([g0, g1])], iou_threshold=0.4
    )
    # both t0 (0.75) and t1 (0.5) pass 0.4, but g0 replaces only t0 (Hungarian)
    assert kept[0].pred.tolist() == [0] and kept[0].target.tolist() == [0]
    assert kept[0].iou.tolist() == pytest.approx([0.75])
    assert torch.equal(improved[0], torch.stack([g0, t1, t2]))
    # above the threshold nothing is replaced
    improved, kept = improved_teacher_sets(
        [torch.stack([t0, t1, t2])], [torch.stack([g0, g1])], iou_threshold=0.8
    )
    assert len(kept[0]) == 0 and torch.equal(improved[0], torch.stack([t0, t1, t2]))
    # threshold 0 never pairs masks without overlap (g1 and t2 are disjoint)
    _, kept = improved_teacher_sets([t2[None]], [g1[None]], iou_threshold=0.0)
    assert len(kept[0]) == 0


def test_replace_gt_targets_are_the_improved_set_only():
    batch, preds, (g0, g1, t0, t1, t2), _ = replace_case()
    strategy = ReplaceGTSupervision(
        criterion=MaskCriterion(), match=MatchSettings(iou_threshold=0.3), iou_threshold=0.4
    )
    out = strategy(preds, batch, step_context(image_size=32))
    # students s0 -> t1 (kept), s1 -> g0 (replaced t0), s2 -> t2; s3 = g1 matches nothing: the
    # GT object no teacher mask found is no target
    m = out.matches[0]
    assert m.pred.tolist() == [0, 1, 2] and m.target.tolist() == [1, 0, 2]
    assert float(out.terms["replaced"]) == 1.0
    want = MaskCriterion()(
        PairBatch(
            logits=preds.logits[:3, 0],
            iou_pred=preds.iou_pred[:3, 0],
            targets=torch.stack([t1, g0, t2]),
            unmatched_iou_pred=preds.iou_pred[3:, 0],
        ),
        pair_count=3,
        unmatched_count=1,
    )
    for key, value in want.items():
        assert float(out.terms[key]) == pytest.approx(float(value)), key
    assert float(out.terms["cls"]) == pytest.approx(0.6**2)


def test_replace_gt_without_override_trains_on_soft_teacher_masks():
    batch, preds, (g0, g1, t0, t1, t2), teacher = replace_case(value=1.5)
    strategy = ReplaceGTSupervision(
        criterion=MaskCriterion(),
        match=MatchSettings(iou_threshold=0.3),
        iou_threshold=0.4,
        gt_override=False,
    )
    out = strategy(preds, batch, step_context(image_size=32))
    # student <-> teacher on binarised masks: s0 -> t1, s1 -> t0 (IoU 0.75), s2 -> t2
    m = out.matches[0]
    assert m.pred.tolist() == [0, 1, 2] and m.target.tolist() == [1, 0, 2]
    assert float(out.terms["replaced"]) == 0.0
    soft = torch.sigmoid(teacher)
    want = MaskCriterion()(
        PairBatch(
            logits=preds.logits[:3, 0],
            iou_pred=preds.iou_pred[:3, 0],
            targets=soft[[1, 0, 2]],
            unmatched_iou_pred=preds.iou_pred[3:, 0],
        ),
        pair_count=3,
        unmatched_count=1,
    )
    for key, value in want.items():
        assert float(out.terms[key]) == pytest.approx(float(value)), key
    # the soft targets are not the binary ones: BCE differs from training on hard masks
    hard = ReplaceGTSupervision(
        criterion=MaskCriterion(), match=MatchSettings(iou_threshold=0.3), iou_threshold=1.0
    )(preds, batch, step_context(image_size=32))
    assert float(out.terms["bce"]) > float(hard.terms["bce"]) + 0.1


def test_teacher_masks_are_cleared_in_the_padding():
    """Teacher logits in the padding (beyond the unpadded image) do not make targets."""
    from maskteacher.train.supervision.teacher_match import teacher_masks

    logits = torch.full((1, 8, 8), 4.0)
    masks = teacher_masks(logits, torch.tensor([32, 20]))  # w_in 20 -> 5 low-res columns
    assert masks[0, :, :5].all() and not masks[0, :, 5:].any()
