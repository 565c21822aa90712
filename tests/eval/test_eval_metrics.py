"""Everything-mode metrics against hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from maskteacher.eval.metrics import (
    ImageResult,
    average_recall,
    best_match_iou,
    boundary_iou,
    evaluate,
    mask_iou,
)


def rect(hw, y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros(hw, bool)
    m[y0:y1, x0:x1] = True
    return m


def stack(*masks) -> np.ndarray:
    return np.stack(masks) if masks else np.zeros((0, 100, 100), bool)


def test_perfect_prediction_scores_one() -> None:
    hw = (100, 120)
    gt = stack(rect(hw, 10, 40, 10, 50), rect(hw, 50, 90, 60, 110), rect(hw, 0, 100, 0, 5))
    result = ImageResult(
        "a", pred_masks=gt.copy(), pred_scores=np.array([0.9, 0.8, 0.7]), gt_masks=gt
    )
    m = evaluate([result])
    assert m.mean_best_iou == pytest.approx(1.0)
    assert m.ar10 == pytest.approx(1.0) and m.ar100 == pytest.approx(1.0)
    assert m.boundary_iou == pytest.approx(1.0)
    assert m.masks_per_image == 3
    assert m.teacher_agreement is None


def test_mask_iou_matches_hand_counts() -> None:
    hw = (20, 20)
    a = rect(hw, 0, 10, 0, 10)  # 100 px
    b = rect(hw, 5, 15, 5, 15)  # 100 px, overlap 25
    ious = mask_iou(stack(a), stack(a, b))
    assert ious.shape == (1, 2)
    assert ious[0, 0] == pytest.approx(1.0)
    assert ious[0, 1] == pytest.approx(25 / 175)
    assert best_match_iou(stack(), stack(a)).tolist() == [0.0]
    assert mask_iou(stack(), stack()).shape == (0, 0)


def test_shifted_square_gives_the_known_boundary_iou_drop() -> None:
    hw = (100, 100)  # diagonal 141.4 -> d = round(0.02 * 141.4) = 3 px
    gt = rect(hw, 30, 70, 30, 70)
    pred = rect(hw, 30, 70, 32, 72)  # shifted 2 px right
    # independent oracle: a rectangle's boundary band of width 3 is the rectangle minus its inner rectangle
    gt_band = gt & ~rect(hw, 33, 67, 33, 67)
    pred_band = pred & ~rect(hw, 33, 67, 35, 69)
    expected = (gt_band & pred_band).sum() / (gt_band | pred_band).sum()
    assert boundary_iou(pred, gt) == pytest.approx(expected)
    # the mask IoU hardly moves while boundary IoU drops a lot: that is what the metric is for
    mask_level = mask_iou(stack(pred), stack(gt))[0, 0]
    assert mask_level == pytest.approx(38 * 40 / (42 * 40))
    assert boundary_iou(pred, gt) < mask_level - 0.3


def test_boundary_iou_edge_cases() -> None:
    hw = (50, 50)
    empty = np.zeros(hw, bool)
    assert boundary_iou(empty, empty) == 1.0
    assert boundary_iou(rect(hw, 10, 20, 10, 20), empty) == 0.0
    # a mask touching the image border has a boundary along the border too
    full = np.ones(hw, bool)
    assert boundary_iou(full, full) == 1.0


def test_average_recall_on_a_known_set() -> None:
    hw = (60, 60)
    gt1 = rect(hw, 0, 20, 0, 20)
    gt2 = rect(hw, 40, 50, 40, 50)  # 100 px
    pred2 = gt2.copy()
    pred2[40:50, 40:50] = False
    pred2.flat[np.flatnonzero(gt2)[:62]] = (
        True  # covers 62 of gt2's 100 pixels, nothing else: IoU 0.62
    )
    assert mask_iou(stack(pred2), stack(gt2))[0, 0] == pytest.approx(0.62)
    result = ImageResult(
        "k",
        pred_masks=stack(gt1, pred2),
        pred_scores=np.array([0.9, 0.8]),
        gt_masks=stack(gt1, gt2),
    )
    ar = average_recall([result], max_dets=(1, 10, 100))
    # gt1 found at all 10 IoU thresholds, gt2 at 0.50 / 0.55 / 0.60 only: (10 + 3) / 20
    assert ar[10] == pytest.approx(0.65)
    assert ar[100] == pytest.approx(0.65)
    # with only the top-scoring detection, gt2 is never found
    assert ar[1] == pytest.approx(0.5)


def test_ar_without_predictions_or_gt() -> None:
    hw = (30, 30)
    gt = stack(rect(hw, 0, 10, 0, 10))
    none = ImageResult(
        "n", pred_masks=np.zeros((0, 30, 30), bool), pred_scores=np.zeros(0), gt_masks=gt
    )
    assert average_recall([none]) == {10: 0.0, 100: 0.0}
    no_gt = ImageResult(
        "g", pred_masks=gt, pred_scores=np.ones(1), gt_masks=np.zeros((0, 30, 30), bool)
    )
    assert all(math.isnan(v) for v in average_recall([no_gt]).values())


def test_teacher_agreement_and_per_image_rows() -> None:
    hw = (40, 40)
    a, b = rect(hw, 0, 20, 0, 20), rect(hw, 20, 40, 20, 40)
    half_b = rect(hw, 20, 40, 20, 30)
    r = ImageResult(
        "t",
        pred_masks=stack(a, half_b),
        pred_scores=np.array([1.0, 0.5]),
        gt_masks=stack(a, b),
        seconds=0.25,
        teacher_masks=stack(a, b),
    )
    m = evaluate([r])
    assert m.teacher_agreement == pytest.approx((1.0 + 0.5) / 2)
    assert m.mean_best_iou == pytest.approx(0.75)
    assert m.ms_per_image == pytest.approx(250.0)
    row = m.per_image[0]
    assert (row.image_id, row.num_gt, row.num_pred) == ("t", 2, 2)
    assert set(m.summary()) >= {
        "mean_best_iou",
        "ar10",
        "ar100",
        "boundary_iou",
        "masks_per_image",
        "ms_per_image",
    }
