"""The training dataset: images in the model input frame, ground truth in the low-res frame.

:class:`TrainDataset` wraps a dataset reader (``maskteacher.data.open_dataset``) and a target
source: :class:`ReaderTargets` resizes the reader's full-size masks to the low-res frame, the
cache source (:class:`maskteacher.train.data.cache.CacheTargets`) reads the ground truth (and,
when asked, teacher outputs) from the teacher cache, so no annotation is decoded at all.

Loading an item has two halves. :meth:`TrainDataset.fetch` runs in a DataLoader worker: the
image is decoded, resized and flipped, the target source gives the ground truth and teacher
fields, and the prompts are drawn; a target source may leave large teacher fields ``pending``
(the cache passes its logits on compressed), which :meth:`TrainDataset.finish` decodes a batch
at a time in the main process and flips with the image. ``dataset[key]`` does both halves.

Every random choice for an item (flip, prompt subset, interior points, box jitter) comes from a
generator seeded by ``(seed, epoch, index)``: an item is the same whichever worker loads it,
whichever process finishes it, and whether or not the run was resumed. The sampler therefore
yields ``(index, epoch)`` keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from maskteacher.data.dataset import Sample, SegmentationDataset
from maskteacher.data.transforms import (
    hflip_input,
    hflip_lowres,
    hflip_points,
    masks_to_lowres,
    to_model_input,
)
from maskteacher.train.data.batch import TeacherTargets, TrainSample
from maskteacher.train.data.prompts import PromptSpec


@dataclass
class Targets:
    """Ground truth (M, L, L) bool and optional teacher outputs for one image; pending: teacher
    fields the main process adds (the target source's ``finish`` decodes them), or None."""

    gt_masks: torch.Tensor
    teacher: TeacherTargets | None = None
    pending: Any = None


class TargetSource(Protocol):
    """Where an image's low-res ground truth (and teacher outputs) come from.

    ``fetch`` runs in the worker; ``finish`` turns a batch's ``Targets.pending`` into the
    teacher fields they hold (unflipped), in the main process.
    """

    def fetch(self, index: int, sample: Sample, input_hw: tuple[int, int]) -> Targets: ...

    def finish(self, pending: list[Any]) -> list[TeacherTargets]: ...


@dataclass(frozen=True)
class ReaderTargets:
    """Ground truth from the dataset reader's masks, resized to the low-res frame (in the
    worker: the full-size masks are the heavy part)."""

    image_size: int

    def fetch(self, index: int, sample: Sample, input_hw: tuple[int, int]) -> Targets:
        return Targets(masks_to_lowres(sample.masks, sample.orig_hw, self.image_size))

    def finish(self, pending: list[Any]) -> list[TeacherTargets]:
        raise RuntimeError("reader targets leave nothing pending")


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one item's random choices."""
    return np.random.default_rng([seed, epoch, index])


def item_flip(rng: np.random.Generator, hflip: bool) -> bool:
    """An item's flip decision: the first draw of its generator (no draw when flips are off);
    the prompts are drawn from the same generator next."""
    return bool(hflip and rng.random() < 0.5)


def flip_teacher(teacher: TeacherTargets, input_hw: tuple[int, int]) -> TeacherTargets:
    """Mirror teacher outputs with the image (logits, points; boxes are in the original frame
    and are mirrored there by whoever needs them -- embeddings and tokens are not spatially
    flippable and are left alone: feature distillation, which reads them, refuses
    ``train.hflip``)."""
    return TeacherTargets(
        logits=None if teacher.logits is None else hflip_lowres(teacher.logits, input_hw),
        logit_scale=teacher.logit_scale,
        points=None if teacher.points is None else hflip_points(teacher.points, input_hw),
        iou=teacher.iou,
        stability=teacher.stability,
        boxes=teacher.boxes,
        embedding=teacher.embedding,
        tokens=teacher.tokens,
    )


class TrainDataset(Dataset):
    """Yields :class:`~maskteacher.train.data.batch.TrainSample` for keys ``(index, epoch)`` (or
    an int).

    images: a dataset reader; targets: where ground truth comes from (default: the reader's masks);
    prompts: a :class:`~maskteacher.train.data.prompts.PromptSpec`; hflip: flip each item with
    probability 1/2; seed: base of the per-item generators; indices: the reader items used
    (default: all), item ``k`` of this dataset is reader item ``indices[k]``.
    Objects whose low-res mask is empty are dropped from the ground truth.
    """

    def __init__(
        self,
        images: SegmentationDataset,
        *,
        image_size: int,
        prompts: PromptSpec,
        targets: TargetSource | None = None,
        hflip: bool = False,
        seed: int = 0,
        indices: list[int] | None = None,
    ) -> None:
        self.images = images
        self.indices = list(range(len(images))) if indices is None else list(indices)
        self.image_size = image_size
        self.prompts = prompts
        self.targets = targets if targets is not None else ReaderTargets(image_size)
        self.hflip = hflip
        self.seed = seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> TrainSample:
        """A finished item (both halves, see the module docstring)."""
        return self.finish([self.fetch(key)])[0]

    def fetch(self, key: int | tuple[int, int]) -> TrainSample:
        """The worker half of item ``key``: finished but for the target source's ``pending``
        teacher fields (``finish`` adds them)."""
        item, epoch = (key, 0) if isinstance(key, int) else (int(key[0]), int(key[1]))
        index = self.indices[item]
        sample = self.images[index]
        image, input_hw = to_model_input(sample.image, self.image_size)
        found = self.targets.fetch(index, sample, input_hw)
        gt, teacher = found.gt_masks, found.teacher
        gt = gt[gt.flatten(1).any(1)] if gt.shape[0] else gt
        rng = item_rng(self.seed, epoch, index)
        flipped = item_flip(rng, self.hflip)
        if flipped:
            image = hflip_input(image, input_hw)
            gt = hflip_lowres(gt, input_hw)
            teacher = None if teacher is None else flip_teacher(teacher, input_hw)
        prompts = self.prompts.make(
            gt_masks=gt,
            input_hw=input_hw,
            orig_hw=sample.orig_hw,
            image_size=self.image_size,
            teacher=teacher,
            rng=rng,
        )
        return TrainSample(
            image_id=sample.image_id,
            image=image,
            input_hw=input_hw,
            orig_hw=sample.orig_hw,
            gt_masks=gt,
            prompts=prompts,
            flipped=flipped,
            teacher=teacher,
            key=(index, epoch),
            pending=found.pending,
        )

    def finish(self, samples: list[TrainSample]) -> list[TrainSample]:
        """The main-process half: decode the pending teacher fields of a batch (one batched
        call), flip them with their image; finished items pass through."""
        todo = [i for i, s in enumerate(samples) if s.pending is not None]
        if not todo:
            return samples
        added = self.targets.finish([samples[i].pending for i in todo])
        out = list(samples)
        for i, extra in zip(todo, added):
            s = samples[i]
            if s.flipped:
                extra = flip_teacher(extra, s.input_hw)
            fields = {k: getattr(extra, k) for k in ("logits", "embedding", "tokens")}
            teacher = dataclasses.replace(
                s.teacher, **{k: v for k, v in fields.items() if v is not None}
            )
            out[i] = dataclasses.replace(s, teacher=teacher, pending=None)
        return out
