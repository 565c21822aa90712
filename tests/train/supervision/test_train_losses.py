"""Loss functions and the criterion against hand-computed values on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from maskteacher.train.supervision import losses
from maskteacher.train.supervision.criterion import MaskCriterion, PairBatch, weighted_total

LOGITS = torch.tensor([[0.0, 2.0]])
TARGETS = torch.tensor([[1.0, 0.0]])
S2 = 1 / (1 + math.exp(-2.0))  # sigmoid(2)


def test_bce_hand_computed():
    expected = (math.log(2) + math.log(1 + math.exp(2))) / 2
    torch.testing.assert_close(losses.bce_loss(LOGITS, TARGETS), torch.tensor([expected]))


def test_focal_hand_computed():
    # pixel 1: p = 0.5, t = 1 -> alpha * (1 - p)^2 * ln 2; pixel 2: p = s2, t = 0 ->
    # (1 - alpha) * s2^2 * ln(1 + e^2)
    a = 0.25 * 0.25 * math.log(2)
    b = 0.75 * S2**2 * math.log(1 + math.exp(2))
    torch.testing.assert_close(losses.focal_loss(LOGITS, TARGETS), torch.tensor([(a + b) / 2]))


def test_dice_hand_computed():
    expected = 1 - (2 * 0.5 + 1) / (0.5 + S2 + 1 + 1)
    torch.testing.assert_close(losses.dice_loss(LOGITS, TARGETS), torch.tensor([expected]))


def test_iou_cls_and_binary_iou():
    torch.testing.assert_close(
        losses.iou_loss(torch.tensor([0.7, 0.2]), torch.tensor([0.5, 0.2])),
        torch.tensor([0.04, 0.0]),
    )
    torch.testing.assert_close(
        losses.cls_loss(torch.tensor([0.3, -0.1])), torch.tensor([0.09, 0.01])
    )
    iou = losses.binary_mask_iou(
        torch.tensor([[1.0, 1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]]),
        torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool),
    )
    torch.testing.assert_close(iou, torch.tensor([1 / 3, 0.0]))
    soft = losses.binary_mask_iou(torch.tensor([[1.0, -1.0]]), torch.tensor([[0.7, 0.2]]))
    torch.testing.assert_close(soft, torch.tensor([1.0]))


def test_losses_compute_in_fp32_under_bf16_inputs():
    out = losses.bce_loss(LOGITS.bfloat16(), TARGETS.bfloat16())
    assert out.dtype == torch.float32


def _pairs():
    # pair 0: the LOGITS/TARGETS row padded to a 1x2 "mask"; pair 1: a perfect prediction
    logits = torch.tensor([[[0.0, 2.0]], [[20.0, -20.0]]], requires_grad=True)
    targets = torch.tensor([[[True, False]], [[True, False]]])
    return PairBatch(
        logits=logits,
        iou_pred=torch.tensor([0.7, 1.0]),
        targets=targets,
        unmatched_iou_pred=torch.tensor([0.3, 0.1, 0.0]),
    )


def test_criterion_sums_over_pairs_and_divides_by_the_counts():
    pairs = _pairs()
    terms = MaskCriterion()(pairs, pair_count=4.0, unmatched_count=3.0)
    assert set(terms) == {"bce", "focal", "dice", "iou", "cls"}
    bce0 = float(losses.bce_loss(LOGITS, TARGETS))
    bce1 = float(losses.bce_loss(torch.tensor([[20.0, -20.0]]), TARGETS))
    torch.testing.assert_close(terms["bce"], torch.tensor((bce0 + bce1) / 4))
    # actual IoU: pair 0 predicts pixel 2 only (IoU 0), pair 1 is exact (IoU 1)
    torch.testing.assert_close(terms["iou"], torch.tensor((0.7**2 + 0.0) / 4))
    torch.testing.assert_close(terms["cls"], torch.tensor((0.09 + 0.01) / 3))
    terms["bce"].backward()
    assert pairs.logits.grad is not None


def test_criterion_divides_by_a_rank_averaged_count_below_one():
    # under DDP the averaged pair count can be 0.5 (1 pair on one of 2 ranks): no clamp to 1
    pairs = _pairs()
    whole = MaskCriterion()(pairs, pair_count=1.0, unmatched_count=1.0)
    half = MaskCriterion()(pairs, pair_count=0.5, unmatched_count=0.5)
    for name in whole:
        torch.testing.assert_close(half[name], 2 * whole[name])
    # no pair anywhere: divide by 1 (the sums are 0)
    none = MaskCriterion()(pairs, pair_count=0.0, unmatched_count=0.0)
    torch.testing.assert_close(none["bce"], whole["bce"])


def test_criterion_on_sampled_points_and_empty_pairs():
    gen = torch.Generator().manual_seed(0)
    big = PairBatch(
        logits=torch.randn(3, 16, 16),
        iou_pred=torch.rand(3),
        targets=torch.rand(3, 16, 16) > 0.5,
        unmatched_iou_pred=torch.zeros(0),
    )
    sampled = MaskCriterion(loss_points=32)(big, pair_count=3, unmatched_count=0, generator=gen)
    full = MaskCriterion()(big, pair_count=3, unmatched_count=0)
    assert abs(float(sampled["bce"]) - float(full["bce"])) < 0.3  # an estimate of the same mean
    torch.testing.assert_close(sampled["iou"], full["iou"])  # IoU target always uses all pixels
    assert float(full["cls"]) == 0.0
    empty = PairBatch(
        logits=torch.zeros(0, 4, 4, requires_grad=True),
        iou_pred=torch.zeros(0),
        targets=torch.zeros(0, 4, 4, dtype=torch.bool),
        unmatched_iou_pred=torch.zeros(0),
    )
    terms = MaskCriterion()(empty, pair_count=0, unmatched_count=0)
    assert all(float(v.detach()) == 0.0 for v in terms.values())


def test_weighted_total_applies_weights_in_one_place():
    terms = {"bce": torch.tensor(2.0), "dice": torch.tensor(3.0), "extra": torch.tensor(100.0)}
    torch.testing.assert_close(weighted_total(terms, {"bce": 0.5, "dice": 2.0}), torch.tensor(7.0))
    # a zero weight needs no term; a term without weight is not added
    torch.testing.assert_close(weighted_total(terms, {"bce": 1.0, "focal": 0.0}), torch.tensor(2.0))
    with pytest.raises(KeyError, match="focal"):
        weighted_total(terms, {"bce": 1.0, "focal": 1.0})
    assert float(weighted_total(terms, {"bce": 0.0})) == 0.0


def test_sample_pixels_reproducible_from_the_generator_state():
    from maskteacher.train.supervision.losses import sample_pixels

    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    a = sample_pixels(100, 5000, rows=3, generator=g)
    b = sample_pixels(100, 5000, rows=3, generator=g)
    assert a.shape == (3, 5000) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < 100
    assert not torch.equal(a, b)  # the generator advances
    g.set_state(state)  # a resumed run draws the same indices again
    assert torch.equal(sample_pixels(100, 5000, rows=3, generator=g), a)
    # uniform with replacement: every pixel is drawn, none far more often than the others
    counts = torch.bincount(a.flatten(), minlength=100).float()
    assert bool((counts > 0).all()) and float(counts.max() / counts.mean()) < 1.5
