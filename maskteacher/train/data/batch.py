"""Typed containers for training samples and batches, and the ragged collate.

Frames (DESIGN.md): S = model.image_size (input frame, square after padding), L = S // 4
(low-res frame). Points are (x, y) in the input frame; masks and logits are in the low-res frame.

Prompts are stored uniformly as point sets plus optional boxes so that both modes share one
path: everything mode has one positive point per prompt (``Kp == 1``); single mode may have
several points per prompt (label ``-1`` pads shorter sets, as segment-anything's prompt encoder
expects) or a box instead of points.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

# Label of a padding point (segment-anything's "not a point").
PAD_LABEL = -1


@dataclass
class PromptSet:
    """Prompts of one image.

    points: (P, Kp, 2) float32 (x, y) input frame; labels: (P, Kp) int64, 1 = positive point,
    -1 = padding; boxes: (P, 4) float32 (x0, y0, x1, y1) input frame or None; has_box: (P,) bool,
    True where the prompt is the box (its points are all padding); target: (P,) int64 index of
    the ground-truth mask the prompt was drawn from (single mode) or -1 (everything mode).
    """

    points: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor | None = None
    has_box: torch.Tensor | None = None
    target: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.points.shape[0])

    @staticmethod
    def from_points(points: torch.Tensor) -> PromptSet:
        """One positive point per prompt from (P, 2) float32 input-frame points."""
        points = points.to(torch.float32).reshape(-1, 2)
        n = points.shape[0]
        return PromptSet(
            points=points[:, None, :],
            labels=torch.ones(n, 1, dtype=torch.int64),
            target=torch.full((n,), -1, dtype=torch.int64),
        )


@dataclass
class TeacherTargets:
    """Mask-teacher outputs for one image (the cache or the online teacher fills them; all optional).

    logits: (N, L, L) teacher low-res logits in the cache's stored dtype (int8 codes or float16;
    float32 from an online teacher) -- :meth:`float_logits` gives float32 logits, dequantised
    with ``logit_scale``; points: (N, 2) float32 input-frame prompt point of each teacher mask;
    iou: (N,) predicted IoU; stability: (N,) stability score; boxes: (N, 4) float32
    (x0, y0, x1, y1) original frame; embedding: (C, E, E) image embedding; tokens: (N, C)
    mask-decoder output token per mask.
    """

    logits: torch.Tensor | None = None
    logit_scale: float = 1.0
    points: torch.Tensor | None = None
    iou: torch.Tensor | None = None
    stability: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    embedding: torch.Tensor | None = None
    tokens: torch.Tensor | None = None

    def float_logits(self) -> torch.Tensor | None:
        """(N, L, L) float32 logits on the tensor's device (None when not loaded)."""
        if self.logits is None:
            return None
        out = self.logits.float()
        return out * self.logit_scale if self.logit_scale != 1.0 else out

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TeacherTargets:
        return TeacherTargets(
            **{
                f.name: _move(getattr(self, f.name), device, non_blocking)
                for f in dataclasses.fields(self)
            }
        )


@dataclass
class TrainSample:
    """What the training dataset yields for one image.

    image: (3, S, S) uint8 input frame (zero padded); input_hw / orig_hw: (h, w) of the unpadded
    input region and of the original file; gt_masks: (M, L, L) bool low-res ground truth (objects
    empty at low resolution are dropped); prompts: the image's prompts; flipped: whether the
    horizontal flip was applied (to image, GT, prompts and teacher outputs alike); key: (reader
    index, epoch) the item was loaded for -- the seed of its random choices
    (:func:`maskteacher.train.data.dataset.item_rng`), so a batch hook that makes the prompts after
    loading (the online teacher with ``train.prompt_source: teacher``) draws exactly what the
    dataset would have drawn. pending: while the item is half loaded (the DataLoader worker's
    half, :meth:`~maskteacher.train.data.dataset.TrainDataset.fetch`), the teacher fields the
    main process still adds (the cache's compressed logits), else None.
    """

    image_id: str
    image: torch.Tensor
    input_hw: tuple[int, int]
    orig_hw: tuple[int, int]
    gt_masks: torch.Tensor
    prompts: PromptSet
    flipped: bool = False
    teacher: TeacherTargets | None = None
    key: tuple[int, int] = (0, 0)
    pending: Any = None


@dataclass
class Batch:
    """A collated mini-batch (B images, P prompts in all).

    images: (B, 3, S, S) uint8; input_hw, orig_hw: (B, 2) int64; image_ids: B strings;
    flipped: (B,) bool; gt_masks: B tensors (M_i, L, L) bool (ragged).
    Prompts, concatenated over images in image order: points (P, Kp, 2) float32, labels (P, Kp)
    int64 (Kp = the batch's widest prompt, -1 padded), boxes (P, 4) float32 or None, has_box (P,)
    bool, prompt_image (P,) int64 image index, prompt_target (P,) int64 GT index or -1,
    prompt_offsets (B + 1,) int64 so image i's prompts are ``[offsets[i], offsets[i + 1])``.
    teacher: B :class:`TeacherTargets` or None when no teacher fields were requested;
    item_keys: B ``(reader index, epoch)`` pairs (:attr:`TrainSample.key`).
    """

    images: torch.Tensor
    input_hw: torch.Tensor
    orig_hw: torch.Tensor
    image_ids: list[str]
    flipped: torch.Tensor
    gt_masks: list[torch.Tensor]
    points: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor | None
    has_box: torch.Tensor
    prompt_image: torch.Tensor
    prompt_target: torch.Tensor
    prompt_offsets: torch.Tensor
    teacher: list[TeacherTargets] | None = field(default=None)
    item_keys: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_prompts(self) -> int:
        return int(self.points.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on ``device`` (host-side offsets stay on the CPU)."""
        moved = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "prompt_offsets":
                moved[f.name] = value
            elif f.name == "teacher":
                moved[f.name] = (
                    None if value is None else [t.to(device, non_blocking) for t in value]
                )
            else:
                moved[f.name] = _move(value, device, non_blocking)
        return Batch(**moved)


def _move(value, device, non_blocking):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, list):
        return [_move(v, device, non_blocking) for v in value]
    return value


def collate(samples: list[TrainSample]) -> Batch:
    """Ragged collate of finished :class:`TrainSample` items into a :class:`Batch`."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    if any(s.pending is not None for s in samples):
        raise ValueError("collate needs finished samples (TrainDataset.finish)")
    width = max((s.prompts.points.shape[1] for s in samples), default=1)
    points, labels, boxes, has_box, image_idx, targets = [], [], [], [], [], []
    counts = []
    any_box = any(s.prompts.boxes is not None for s in samples)
    for i, s in enumerate(samples):
        pr = s.prompts
        n = len(pr)
        counts.append(n)
        pad = width - pr.points.shape[1]
        points.append(torch.nn.functional.pad(pr.points, (0, 0, 0, pad)))
        labels.append(torch.nn.functional.pad(pr.labels, (0, pad), value=PAD_LABEL))
        if any_box:
            boxes.append(pr.boxes if pr.boxes is not None else torch.zeros(n, 4))
        has_box.append(pr.has_box if pr.has_box is not None else torch.zeros(n, dtype=torch.bool))
        image_idx.append(torch.full((n,), i, dtype=torch.int64))
        targets.append(
            pr.target if pr.target is not None else torch.full((n,), -1, dtype=torch.int64)
        )
    offsets = torch.zeros(len(samples) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    teacher = None
    if any(s.teacher is not None for s in samples):
        teacher = [s.teacher if s.teacher is not None else TeacherTargets() for s in samples]
    return Batch(
        images=torch.stack([s.image for s in samples]),
        input_hw=torch.tensor([s.input_hw for s in samples], dtype=torch.int64),
        orig_hw=torch.tensor([s.orig_hw for s in samples], dtype=torch.int64),
        image_ids=[s.image_id for s in samples],
        flipped=torch.tensor([s.flipped for s in samples], dtype=torch.bool),
        gt_masks=[s.gt_masks for s in samples],
        points=torch.cat(points).to(torch.float32),
        labels=torch.cat(labels),
        boxes=torch.cat(boxes).to(torch.float32) if any_box else None,
        has_box=torch.cat(has_box),
        prompt_image=torch.cat(image_idx),
        prompt_target=torch.cat(targets),
        prompt_offsets=offsets,
        teacher=teacher,
        item_keys=[tuple(s.key) for s in samples],
    )


class BatchHook(Protocol):
    """Runs on every device batch before the step (the online teacher filling ``Batch.teacher``);
    ``provides``: the teacher fields it fills."""

    provides: frozenset[str]

    def __call__(self, batch: Batch) -> Batch: ...
