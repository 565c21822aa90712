"""Image decoding and resizing in DataLoader workers, so the teacher never waits on JPEGs.

:class:`ImageLoader` maps a :class:`~maskteacher.precompute.plan.WorkItem` to a
:class:`LoadedImage`: the padded model-input image, its sizes, the ground truth in the low-res
frame (when the cache stores it) and the file's path relative to the split's root. A file that
cannot be read becomes a LoadedImage with ``error`` set instead of an exception, so one bad
image is recorded as a failure and the job goes on. :func:`shard_batches` groups the items into
batches that never cross a planned shard, so every shard is computed the same way whichever
worker writes it and however often it is redone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from maskteacher.data import masks_to_lowres, to_model_input
from maskteacher.data.dataset import SegmentationDataset
from maskteacher.precompute.plan import WorkItem


@dataclass
class LoadedImage:
    """One work item after decoding (``error`` set and the arrays None when it failed).

    image: (3, S, S) uint8 model input frame, zero-padded. input_hw / orig_hw: (h, w) / (H, W).
    gt: (M, L, L) bool ground truth, low-res frame, or None when not stored.
    source: the image file relative to the split's root (None if it lies elsewhere).
    """

    item: WorkItem
    image: torch.Tensor | None = None
    input_hw: tuple[int, int] | None = None
    orig_hw: tuple[int, int] | None = None
    gt: np.ndarray | None = None
    source: str | None = None
    error: str | None = None


def source_root(dataset: SegmentationDataset) -> Path:
    """The folder that per-image ``source`` paths are relative to (COCO: the image folder)."""
    return Path(getattr(dataset, "image_dir", dataset.root))


def relative_source(path: Path, root: Path) -> str | None:
    """``path`` relative to ``root`` with '/' separators, or None if it is not inside root."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    if rel.startswith(os.pardir) or os.path.isabs(rel):
        return None
    return Path(rel).as_posix()


class ImageLoader(Dataset):
    """Map-style dataset over work items (see the module docstring)."""

    def __init__(
        self,
        datasets: Mapping[str, SegmentationDataset],
        items: list[WorkItem],
        *,
        image_size: int,
        with_gt: bool,
    ) -> None:
        self.datasets = dict(datasets)
        self.items = list(items)
        self.image_size = image_size
        self.with_gt = with_gt
        self.roots = {split: source_root(ds) for split, ds in self.datasets.items()}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> LoadedImage:
        item = self.items[i]
        dataset = self.datasets[item.split]
        try:
            source = relative_source(dataset.image_path(item.index), self.roots[item.split])
            sample = dataset[item.index]
            if sample.image_id != item.image_id:  # the dataset changed under the plan
                raise RuntimeError(
                    f"dataset index {item.index} is {sample.image_id!r}, planned {item.image_id!r}"
                )
            image, input_hw = to_model_input(sample.image, self.image_size)
            gt = None
            if self.with_gt:
                gt = masks_to_lowres(sample.masks, sample.orig_hw, self.image_size).numpy()
        except Exception as exc:  # one unreadable image must not stop a week-long job
            return LoadedImage(item=item, error=_reason(exc))
        return LoadedImage(
            item=item,
            image=image,
            input_hw=input_hw,
            orig_hw=sample.orig_hw,
            gt=gt,
            source=source,
        )


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text if text else type(exc).__name__


def _keep_list(batch: list[LoadedImage]) -> list[LoadedImage]:
    return batch


def shard_batches(items: list[WorkItem], batch_size: int) -> list[list[int]]:
    """Indices into ``items`` in batches of at most ``batch_size`` that never span two planned
    shards (items of one shard are consecutive)."""
    batches: list[list[int]] = []
    current: list[int] = []
    for i, item in enumerate(items):
        if current and (
            len(current) == batch_size
            or (items[current[0]].split, items[current[0]].shard) != (item.split, item.shard)
        ):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def make_loader(loader: ImageLoader, *, batch_size: int, num_workers: int) -> DataLoader:
    """A DataLoader yielding lists of LoadedImage, one planned shard at a time, in order."""
    return DataLoader(
        loader,
        batch_sampler=shard_batches(loader.items, batch_size),
        num_workers=num_workers,
        collate_fn=_keep_list,
        prefetch_factor=4 if num_workers > 0 else None,
    )
