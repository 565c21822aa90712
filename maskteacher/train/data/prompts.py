"""Prompt sampling for both training modes (pure numpy, seeded by the caller's generator).

Everything mode (``train.prompt_source``) -- a registry of sources, each returning (P, 2)
float32 (x, y) input-frame points, at most ``max_prompts`` (a random subset when there are more):

- ``grid``: the ``dataset.grid_points`` x ``grid_points`` grid over the unpadded image;
- ``gt``: one random interior point per ground-truth mask;
- ``mixed``: GT points get up to half the budget (rounded up), grid points fill the rest;
- ``teacher``: the cached teacher's prompt points (one per teacher mask);
- ``teacher_grid``: teacher points get up to half the budget, grid points fill the rest.

Single mode (``dataset.prompt_mode``): one prompt per object for up to ``max_prompts`` objects:
``point`` (1 point), ``points`` (``min_points``..``max_points`` points), ``box`` (the object's box
with each coordinate shifted by up to ``max_bbox_shift`` original-frame pixels) or ``mixed``
(points or box, chosen per object with equal odds).

Interior points come from the low-res ground truth (a random set pixel; the point is that
4 x 4 block's centre in the input frame, clamped inside the unpadded image), so the cache and the
dataset paths sample identically.

The dataset holds one *prompt spec* (:class:`EverythingPromptSpec` or :class:`SinglePromptSpec`)
and calls its ``make`` for every item with the item's own generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from maskteacher.data.transforms import point_grid
from maskteacher.train.data.batch import PAD_LABEL, PromptSet, TeacherTargets


@dataclass(frozen=True)
class PromptInputs:
    """What a prompt source may draw from, for one image.

    grid: (G, 2) float32 input-frame grid points; gt_masks: (M, L, L) bool low-res ground truth;
    teacher_points: (N, 2) float32 input-frame teacher prompt points or None; input_hw: (h, w)
    unpadded input size; image_size: S.
    """

    grid: np.ndarray
    gt_masks: torch.Tensor
    teacher_points: np.ndarray | None
    input_hw: tuple[int, int]
    image_size: int


PromptSource = Callable[[PromptInputs, int, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class SourceSpec:
    """A registered everything-mode prompt source and whether it reads teacher points."""

    fn: PromptSource
    needs_teacher_points: bool = False


def _subset(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """At most k rows of ``points``: a random subset in random order when there are more."""
    if points.shape[0] <= k:
        return points
    return points[np.sort(rng.choice(points.shape[0], size=k, replace=False))]


def interior_points(
    masks: torch.Tensor,
    rng: np.random.Generator,
    *,
    input_hw: tuple[int, int],
    image_size: int,
    per_mask: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Random points inside each low-res mask, in the input frame.

    masks: (M, L, L) bool; per_mask: (M,) number of points per mask (default 1).
    Returns M arrays (n_m, 2) float32 (x, y); an empty mask gets an empty array. Points are drawn
    with replacement among the mask's pixels and placed at the pixel block's centre.
    """
    m = int(masks.shape[0])
    if per_mask is None:
        per_mask = np.ones(m, dtype=np.int64)
    if m == 0:
        return []
    scale = image_size / masks.shape[-1]
    coords = masks.nonzero().numpy()  # (n, 3): mask, row, col; sorted by mask
    counts = np.bincount(coords[:, 0], minlength=m)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    h_in, w_in = input_hw
    out = []
    for i in range(m):
        if counts[i] == 0:
            out.append(np.zeros((0, 2), np.float32))
            continue
        pick = starts[i] + rng.integers(0, counts[i], size=int(per_mask[i]))
        rows, cols = coords[pick, 1], coords[pick, 2]
        x = np.minimum((cols + 0.5) * scale, w_in - 0.5)
        y = np.minimum((rows + 0.5) * scale, h_in - 0.5)
        out.append(np.stack([x, y], axis=1).astype(np.float32))
    return out


def grid_source(inputs: PromptInputs, max_prompts: int, rng: np.random.Generator) -> np.ndarray:
    return _subset(inputs.grid, max_prompts, rng)


def gt_source(inputs: PromptInputs, max_prompts: int, rng: np.random.Generator) -> np.ndarray:
    pts = interior_points(
        inputs.gt_masks, rng, input_hw=inputs.input_hw, image_size=inputs.image_size
    )
    points = np.concatenate(pts) if pts else np.zeros((0, 2), np.float32)
    return _subset(points, max_prompts, rng)


def _half_and_grid(
    first: np.ndarray, inputs: PromptInputs, max_prompts: int, rng: np.random.Generator
) -> np.ndarray:
    first = _subset(first, (max_prompts + 1) // 2, rng)
    grid = _subset(inputs.grid, max_prompts - first.shape[0], rng)
    return np.concatenate([first, grid]).astype(np.float32)


def mixed_source(inputs: PromptInputs, max_prompts: int, rng: np.random.Generator) -> np.ndarray:
    pts = interior_points(
        inputs.gt_masks, rng, input_hw=inputs.input_hw, image_size=inputs.image_size
    )
    gt = np.concatenate(pts) if pts else np.zeros((0, 2), np.float32)
    return _half_and_grid(gt, inputs, max_prompts, rng)


def _teacher_points(inputs: PromptInputs) -> np.ndarray:
    if inputs.teacher_points is None:
        raise ValueError("this prompt source needs the teacher's prompt points")
    return np.asarray(inputs.teacher_points, dtype=np.float32).reshape(-1, 2)


def teacher_source(inputs: PromptInputs, max_prompts: int, rng: np.random.Generator) -> np.ndarray:
    return _subset(_teacher_points(inputs), max_prompts, rng)


def teacher_grid_source(
    inputs: PromptInputs, max_prompts: int, rng: np.random.Generator
) -> np.ndarray:
    return _half_and_grid(_teacher_points(inputs), inputs, max_prompts, rng)


PROMPT_SOURCES: dict[str, SourceSpec] = {
    "grid": SourceSpec(grid_source),
    "gt": SourceSpec(gt_source),
    "mixed": SourceSpec(mixed_source),
    "teacher": SourceSpec(teacher_source, needs_teacher_points=True),
    "teacher_grid": SourceSpec(teacher_grid_source, needs_teacher_points=True),
}


def everything_prompts(
    source: str, inputs: PromptInputs, *, max_prompts: int, rng: np.random.Generator
) -> PromptSet:
    """Prompts for one image from the registered ``source`` (see the module docstring)."""
    points = PROMPT_SOURCES[source].fn(inputs, max_prompts, rng)
    return PromptSet.from_points(torch.from_numpy(np.ascontiguousarray(points, np.float32)))


# ---------------------------------------------------------------------------- single mode


@dataclass(frozen=True)
class SingleSettings:
    """Single-mode prompt settings (``dataset.prompt_mode``, ``min/max_points``, ``max_bbox_shift``)."""

    mode: str = "point"
    min_points: int = 1
    max_points: int = 3
    max_bbox_shift: int = 20
    max_prompts: int = 64


def lowres_boxes(masks: torch.Tensor, *, input_hw: tuple[int, int], image_size: int) -> np.ndarray:
    """(M, 4) float32 (x0, y0, x1, y1) input-frame boxes of (M, L, L) bool masks (non-empty)."""
    scale = image_size / masks.shape[-1]
    rows = masks.any(dim=2).numpy()  # (M, L)
    cols = masks.any(dim=1).numpy()
    idx = np.arange(masks.shape[-1])
    big = masks.shape[-1]
    y0 = np.where(rows, idx, big).min(1)
    y1 = np.where(rows, idx, -1).max(1) + 1
    x0 = np.where(cols, idx, big).min(1)
    x1 = np.where(cols, idx, -1).max(1) + 1
    boxes = np.stack([x0, y0, x1, y1], axis=1).astype(np.float32) * scale
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, input_hw[1])
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, input_hw[0])
    return boxes


def jitter_boxes(
    boxes: np.ndarray,
    *,
    max_shift: int,
    orig_hw: tuple[int, int],
    input_hw: tuple[int, int],
    rng: np.random.Generator,
) -> np.ndarray:
    """Shift each coordinate of (M, 4) input-frame boxes by an integer number of original-frame
    pixels in ``[-max_shift, max_shift]`` (mapped to the input frame), clipped to the image,
    keeping every box at least one input pixel wide and high."""
    if max_shift == 0 or boxes.shape[0] == 0:
        return boxes
    scale = input_hw[1] / orig_hw[1] if orig_hw[1] else 1.0
    shift = rng.integers(-max_shift, max_shift + 1, size=boxes.shape) * scale
    out = boxes + shift.astype(np.float32)
    h_in, w_in = input_hw
    out[:, 0] = out[:, 0].clip(0, w_in - 1)
    out[:, 1] = out[:, 1].clip(0, h_in - 1)
    out[:, 2] = np.maximum(out[:, 2].clip(0, w_in), out[:, 0] + 1)
    out[:, 3] = np.maximum(out[:, 3].clip(0, h_in), out[:, 1] + 1)
    return out


_SINGLE_KINDS = {
    "point": ("points",),
    "points": ("points",),
    "box": ("box",),
    "mixed": ("points", "box"),
}


def single_prompts(
    gt_masks: torch.Tensor,
    *,
    settings: SingleSettings,
    input_hw: tuple[int, int],
    orig_hw: tuple[int, int],
    image_size: int,
    rng: np.random.Generator,
) -> PromptSet:
    """One prompt per object for up to ``settings.max_prompts`` objects of (M, L, L) bool masks.

    Returns a :class:`PromptSet` whose ``target`` names the object each prompt came from.
    """
    m = int(gt_masks.shape[0])
    chosen = np.arange(m)
    if m > settings.max_prompts:
        chosen = np.sort(rng.choice(m, size=settings.max_prompts, replace=False))
    n = chosen.shape[0]
    kinds = _SINGLE_KINDS[settings.mode]
    is_box = rng.integers(0, len(kinds), size=n) if len(kinds) > 1 else np.zeros(n, np.int64)
    is_box = np.array([kinds[k] == "box" for k in is_box], dtype=bool)
    low, high = (1, 1) if settings.mode == "point" else (settings.min_points, settings.max_points)
    counts = rng.integers(low, high + 1, size=n)
    counts[is_box] = 0
    width = max(1, int(counts.max()) if n else 1)
    points = np.zeros((n, width, 2), np.float32)
    labels = np.full((n, width), PAD_LABEL, np.int64)
    masks = gt_masks[torch.from_numpy(chosen)]
    drawn = interior_points(masks, rng, input_hw=input_hw, image_size=image_size, per_mask=counts)
    for i, pts in enumerate(drawn):
        points[i, : pts.shape[0]] = pts
        labels[i, : pts.shape[0]] = 1
    boxes = None
    if is_box.any():
        boxes = np.zeros((n, 4), np.float32)
        sel = np.flatnonzero(is_box)
        raw = lowres_boxes(masks[torch.from_numpy(sel)], input_hw=input_hw, image_size=image_size)
        boxes[sel] = jitter_boxes(
            raw, max_shift=settings.max_bbox_shift, orig_hw=orig_hw, input_hw=input_hw, rng=rng
        )
    return PromptSet(
        points=torch.from_numpy(points),
        labels=torch.from_numpy(labels),
        boxes=None if boxes is None else torch.from_numpy(boxes),
        has_box=torch.from_numpy(is_box),
        target=torch.from_numpy(chosen.astype(np.int64)),
    )


# ---------------------------------------------------------------------------- prompt specs


class PromptSpec(Protocol):
    """How the dataset makes one item's prompts (``make``, with the item's generator)."""

    needs_teacher_points: bool

    def make(
        self,
        *,
        gt_masks: torch.Tensor,
        input_hw: tuple[int, int],
        orig_hw: tuple[int, int],
        image_size: int,
        teacher: TeacherTargets | None,
        rng: np.random.Generator,
    ) -> PromptSet: ...


@dataclass(frozen=True)
class EverythingPromptSpec:
    """Everything-mode prompts: ``source`` (a :data:`PROMPT_SOURCES` key), the grid's points per
    side, and the per-image cap (None: no cap, e.g. validation on the full grid).

    defer_teacher_points: the source reads teacher points that are not loaded with the item
    because a batch hook computes them on the device (the online teacher); the item then has no
    prompts and the hook makes them with this spec (``defer_teacher_points`` off) and the
    item's generator replayed from :attr:`~maskteacher.train.data.batch.TrainSample.key`.
    """

    source: str = "grid"
    grid_points: int = 16
    max_prompts: int | None = 64
    defer_teacher_points: bool = False

    @property
    def needs_teacher_points(self) -> bool:
        return PROMPT_SOURCES[self.source].needs_teacher_points

    def make(
        self,
        *,
        gt_masks: torch.Tensor,
        input_hw: tuple[int, int],
        orig_hw: tuple[int, int],
        image_size: int,
        teacher: TeacherTargets | None,
        rng: np.random.Generator,
    ) -> PromptSet:
        teacher_points = None
        if teacher is not None and teacher.points is not None:
            teacher_points = teacher.points.numpy()
        elif self.defer_teacher_points and self.needs_teacher_points:
            return PromptSet.from_points(torch.zeros((0, 2), dtype=torch.float32))
        inputs = PromptInputs(
            grid=point_grid(self.grid_points, input_hw),
            gt_masks=gt_masks,
            teacher_points=teacher_points,
            input_hw=input_hw,
            image_size=image_size,
        )
        cap = self.max_prompts if self.max_prompts is not None else 1 << 30
        return everything_prompts(self.source, inputs, max_prompts=cap, rng=rng)


@dataclass(frozen=True)
class SinglePromptSpec:
    """Single-mode prompts (one per object), see :func:`single_prompts`."""

    settings: SingleSettings

    needs_teacher_points = False

    def make(
        self,
        *,
        gt_masks: torch.Tensor,
        input_hw: tuple[int, int],
        orig_hw: tuple[int, int],
        image_size: int,
        teacher: TeacherTargets | None,
        rng: np.random.Generator,
    ) -> PromptSet:
        return single_prompts(
            gt_masks,
            settings=self.settings,
            input_hw=input_hw,
            orig_hw=orig_hw,
            image_size=image_size,
            rng=rng,
        )
