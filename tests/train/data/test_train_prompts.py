"""Prompt sampling: everything-mode sources and single-mode points / boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskteacher.data import point_grid
from maskteacher.train.data.prompts import (
    PROMPT_SOURCES,
    PromptInputs,
    SingleSettings,
    everything_prompts,
    interior_points,
    jitter_boxes,
    lowres_boxes,
    single_prompts,
)

S = 64
L = 16
INPUT_HW = (48, 64)


def masks() -> torch.Tensor:
    m = torch.zeros(3, L, L, dtype=torch.bool)
    m[0, 0:4, 0:4] = True
    m[1, 8:12, 10:16] = True
    m[2, 11, 3] = True
    return m


def inputs(teacher=None) -> PromptInputs:
    return PromptInputs(
        grid=point_grid(4, INPUT_HW),
        gt_masks=masks(),
        teacher_points=teacher,
        input_hw=INPUT_HW,
        image_size=S,
    )


def inside(points: np.ndarray, mask: torch.Tensor) -> bool:
    cols = (points[:, 0] / 4).astype(int)
    rows = (points[:, 1] / 4).astype(int)
    return bool(mask[rows, cols].all())


def test_interior_points_fall_inside_their_mask():
    rng = np.random.default_rng(0)
    pts = interior_points(
        masks(), rng, input_hw=INPUT_HW, image_size=S, per_mask=np.array([5, 5, 2])
    )
    for p, m in zip(pts, masks()):
        assert p.shape[1] == 2 and inside(p, m)
    assert pts[2].tolist() == [[14.0, 46.0]] * 2  # the single-pixel mask's block centre
    empty = interior_points(
        torch.zeros(1, L, L, dtype=torch.bool), rng, input_hw=INPUT_HW, image_size=S
    )
    assert empty[0].shape == (0, 2)


def test_points_clamped_inside_unpadded_image():
    m = torch.zeros(1, L, L, dtype=torch.bool)
    m[0, 0, 15] = True  # the last column's block covers x 60..64, image is 62 wide
    pts = interior_points(m, np.random.default_rng(0), input_hw=(40, 62), image_size=S)
    assert pts[0][0, 0] <= 61.5


def test_sources_counts_and_caps():
    rng = np.random.default_rng(0)
    grid = everything_prompts("grid", inputs(), max_prompts=100, rng=rng)
    assert len(grid) == 16 and grid.points.shape == (16, 1, 2) and (grid.labels == 1).all()
    assert len(everything_prompts("grid", inputs(), max_prompts=5, rng=rng)) == 5
    gt = everything_prompts("gt", inputs(), max_prompts=100, rng=rng)
    assert len(gt) == 3
    for p, m in zip(gt.points[:, 0, :].numpy(), masks()):
        assert inside(p[None], m)
    mixed = everything_prompts("mixed", inputs(), max_prompts=6, rng=rng)
    assert len(mixed) == 6  # 3 GT points (half the budget) + 3 grid points
    grid_set = {tuple(p) for p in point_grid(4, INPUT_HW).tolist()}
    in_grid = [tuple(p) in grid_set for p in mixed.points[:, 0, :].tolist()]
    assert sum(in_grid) == 3


def test_teacher_sources():
    teacher = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], np.float32)
    rng = np.random.default_rng(0)
    out = everything_prompts("teacher", inputs(teacher), max_prompts=10, rng=rng)
    assert out.points[:, 0, :].tolist() == teacher.tolist()
    both = everything_prompts("teacher_grid", inputs(teacher), max_prompts=8, rng=rng)
    assert len(both) == 8 and both.points[:, 0, :][:2].tolist() == teacher[:2].tolist()
    assert PROMPT_SOURCES["teacher"].needs_teacher_points
    with pytest.raises(ValueError, match="teacher"):
        everything_prompts("teacher", inputs(None), max_prompts=4, rng=rng)


def test_same_seed_same_prompts():
    a = everything_prompts("mixed", inputs(), max_prompts=5, rng=np.random.default_rng(7))
    b = everything_prompts("mixed", inputs(), max_prompts=5, rng=np.random.default_rng(7))
    assert torch.equal(a.points, b.points)


def test_lowres_boxes_and_jitter():
    boxes = lowres_boxes(masks(), input_hw=INPUT_HW, image_size=S)
    assert boxes.tolist() == [[0, 0, 16, 16], [40, 32, 64, 48], [12, 44, 16, 48]]
    rng = np.random.default_rng(0)
    out = jitter_boxes(boxes, max_shift=10, orig_hw=(96, 128), input_hw=INPUT_HW, rng=rng)
    scale = 64 / 128
    assert np.abs(out - boxes).max() <= 10 * scale + 1e-6
    assert (out[:, 2] > out[:, 0]).all() and (out[:, 3] > out[:, 1]).all()
    assert out[:, [0, 2]].min() >= 0 and out[:, [0, 2]].max() <= 64
    assert out[:, [1, 3]].max() <= 48
    assert np.array_equal(
        jitter_boxes(boxes, max_shift=0, orig_hw=(96, 128), input_hw=INPUT_HW, rng=rng), boxes
    )


@pytest.mark.parametrize("mode", ["point", "points", "box", "mixed"])
def test_single_prompts(mode):
    settings = SingleSettings(
        mode=mode, min_points=2, max_points=3, max_bbox_shift=4, max_prompts=2
    )
    rng = np.random.default_rng(1)
    out = single_prompts(
        masks(), settings=settings, input_hw=INPUT_HW, orig_hw=(96, 128), image_size=S, rng=rng
    )
    assert len(out) == 2  # capped at max_prompts objects
    assert len(set(out.target.tolist())) == 2
    for i in range(2):
        n_pos = int((out.labels[i] == 1).sum())
        if out.has_box[i]:
            assert n_pos == 0 and out.boxes is not None
        else:
            expected = (1, 1) if mode == "point" else (2, 3)
            assert expected[0] <= n_pos <= expected[1]
            pts = out.points[i][out.labels[i] == 1].numpy()
            assert inside(pts, masks()[out.target[i]])
    if mode == "box":
        assert out.has_box.all()
    if mode in ("point", "points"):
        assert not out.has_box.any() and out.boxes is None
