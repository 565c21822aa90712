"""Matcher: pairwise IoU, Hungarian assignment, thresholds, eligibility, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from maskteacher.train.supervision.matcher import (
    Match,
    MatchSettings,
    lowres_pixels,
    match_batch,
    pairwise_bce_cost,
    pairwise_dice_cost,
    pairwise_mask_iou,
    unmatched,
)

L = 8


def box_mask(x0, y0, x1, y1, size=L) -> torch.Tensor:
    m = torch.zeros(size, size, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def logits_of(masks: torch.Tensor) -> torch.Tensor:
    return torch.where(masks, 5.0, -5.0)


def match_masks(preds, targets, *, settings, prompt_pixels=None, generator=None) -> Match:
    """One image through :func:`match_batch` (the trainer always matches whole batches)."""
    pixels = None if prompt_pixels is None else [prompt_pixels]
    return match_batch(
        [preds], [targets], settings=settings, prompt_pixels=pixels, generator=generator
    )[0]


def test_pairwise_iou_hand_computed():
    a = box_mask(0, 0, 4, 4)  # 16 px
    b = box_mask(2, 0, 6, 4)  # 16 px, overlap 8
    empty = torch.zeros(L, L, dtype=torch.bool)
    iou = pairwise_mask_iou(logits_of(torch.stack([a, b, empty])), torch.stack([a, b]))
    expected = torch.tensor([[1.0, 8 / 24], [8 / 24, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(iou, expected)


def test_dice_and_bce_costs_hand_computed():
    logits = torch.tensor([[0.0, 0.0]])  # sigmoid 0.5 each
    targets = torch.tensor([[1.0, 0.0]])
    # dice: 1 - (2 * 0.5 + 1) / (1.0 + 1 + 1) = 1/3
    torch.testing.assert_close(pairwise_dice_cost(logits, targets), torch.tensor([[1 / 3]]))
    torch.testing.assert_close(
        pairwise_bce_cost(logits, targets), torch.tensor([[float(np.log(2))]])
    )


def test_match_picks_best_pairs():
    targets = torch.stack([box_mask(0, 0, 4, 4), box_mask(4, 4, 8, 8)])
    preds = logits_of(
        torch.stack([box_mask(4, 4, 8, 7), box_mask(0, 0, 4, 3), box_mask(0, 6, 2, 8)])
    )
    match = match_masks(preds, targets, settings=MatchSettings(iou_threshold=0.3))
    assert match.pred.tolist() == [0, 1]
    assert match.target.tolist() == [1, 0]
    torch.testing.assert_close(match.iou, torch.tensor([0.75, 0.75]))
    assert unmatched(3, match).tolist() == [2]


def test_threshold_drops_weak_pairs():
    targets = torch.stack([box_mask(0, 0, 4, 4)])
    preds = logits_of(torch.stack([box_mask(0, 0, 4, 1)]))  # IoU 4/16
    assert len(match_masks(preds, targets, settings=MatchSettings(iou_threshold=0.3))) == 0
    kept = match_masks(preds, targets, settings=MatchSettings(iou_threshold=0.25))
    assert kept.pred.tolist() == [0] and kept.iou.tolist() == [0.25]


def test_empty_targets_and_empty_predictions():
    s = MatchSettings(iou_threshold=0.0)
    preds = logits_of(torch.stack([box_mask(0, 0, 4, 4)]))
    no_targets = torch.zeros(0, L, L, dtype=torch.bool)
    no_preds = torch.zeros(0, L, L)
    for match in (
        match_masks(preds, no_targets, settings=s),
        match_masks(no_preds, torch.stack([box_mask(0, 0, 2, 2)]), settings=s),
        match_masks(no_preds, no_targets, settings=s),
    ):
        assert len(match) == 0 and match.pred.dtype == torch.long
    assert unmatched(1, match_masks(preds, no_targets, settings=s)).tolist() == [0]


def test_rectangular_more_targets_than_predictions():
    targets = torch.stack([box_mask(0, 0, 2, 2), box_mask(4, 0, 8, 4), box_mask(0, 4, 4, 8)])
    preds = logits_of(torch.stack([box_mask(0, 4, 4, 8), box_mask(4, 0, 8, 3)]))
    match = match_masks(preds, targets, settings=MatchSettings(iou_threshold=0.1))
    assert sorted(zip(match.pred.tolist(), match.target.tolist())) == [(0, 2), (1, 1)]


def test_point_eligibility():
    """With requires_point a prediction may only take a target containing its prompt point."""
    targets = torch.stack([box_mask(0, 0, 4, 4), box_mask(4, 4, 8, 8)])
    preds = logits_of(torch.stack([box_mask(0, 0, 4, 4)]))  # fits target 0 perfectly
    outside = torch.tensor([[6, 6]])  # (col, row) inside target 1 only
    inside = torch.tensor([[1, 1]])
    strict = MatchSettings(iou_threshold=0.1, requires_point=True)
    assert len(match_masks(preds, targets, settings=strict, prompt_pixels=outside)) == 0
    # threshold 0 keeps the only eligible pair, target 1, though its IoU is 0
    zero = MatchSettings(iou_threshold=0.0, requires_point=True)
    assert match_masks(preds, targets, settings=zero, prompt_pixels=outside).target.tolist() == [1]
    ok = match_masks(preds, targets, settings=strict, prompt_pixels=inside)
    assert ok.target.tolist() == [0]
    loose = MatchSettings(iou_threshold=0.0)
    assert match_masks(preds, targets, settings=loose, prompt_pixels=outside).target.tolist() == [0]
    with pytest.raises(ValueError, match="prompt_pixels"):
        match_masks(preds, targets, settings=strict)


def test_lowres_pixels_maps_input_points():
    pts = torch.tensor([[0.5, 0.5], [63.9, 10.0], [200.0, -3.0]])
    px = lowres_pixels(pts, image_size=64, low_res_size=16)
    assert px.tolist() == [[0, 0], [15, 2], [15, 0]]


def test_batch_equals_per_image_and_dice_cost_option():
    gen = torch.Generator().manual_seed(0)
    preds = [
        torch.randn(5, L, L, generator=gen),
        torch.randn(0, L, L),
        torch.randn(3, L, L, generator=gen),
    ]
    targets = [
        torch.rand(4, L, L, generator=gen) > 0.5,
        torch.rand(2, L, L, generator=gen) > 0.5,
        torch.zeros(0, L, L, dtype=torch.bool),
    ]
    s = MatchSettings(iou_threshold=0.0, cost_dice=1.0, cost_bce=0.5)
    batch = match_batch(preds, targets, settings=s)
    singles = [match_masks(p, t, settings=s) for p, t in zip(preds, targets)]
    for a, b in zip(batch, singles):
        assert a.pred.tolist() == b.pred.tolist() and a.target.tolist() == b.target.tolist()
    assert len(batch[0]) == 4 and len(batch[1]) == 0 and len(batch[2]) == 0
    sampled = match_batch(
        preds,
        targets,
        settings=MatchSettings(iou_threshold=0.0, cost_dice=1.0, num_points=16),
        generator=gen,
    )
    assert len(sampled[0]) == 4


@settings(max_examples=30, deadline=None)
@given(p=st.integers(0, 6), m=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_permutation_invariance(p, m, seed):
    """Permuting predictions and targets permutes the matched pairs and changes nothing else."""
    side = 16
    gen = torch.Generator().manual_seed(seed)
    preds = torch.randn(p, side, side, generator=gen)
    targets = torch.rand(m, side, side, generator=gen) > 0.6
    s = MatchSettings(iou_threshold=0.2)
    base = match_masks(preds, targets, settings=s)
    pp = torch.randperm(p, generator=gen)
    pm = torch.randperm(m, generator=gen)
    perm = match_masks(preds[pp], targets[pm], settings=s)
    mapped = {(int(pp[i]), int(pm[j])) for i, j in zip(perm.pred, perm.target)}
    base_pairs = set(zip(base.pred.tolist(), base.target.tolist()))
    iou = pairwise_mask_iou(preds, targets)
    for a, b in base_pairs | mapped:
        assert iou[a, b] >= s.iou_threshold
    nonzero = iou[iou > 0]
    if torch.unique(nonzero).numel() == nonzero.numel():  # no ties: the optimum is unique
        assert mapped == base_pairs
        torch.testing.assert_close(perm.iou.sum(), base.iou.sum())


def test_match_empty_constructor():
    e = Match.empty()
    assert len(e) == 0 and e.iou.dtype == torch.float32
