"""``maskteacher data stats``: what a user checks first about a dataset.

The dataset is opened with ``skip_bad=True`` so every bad item is collected instead of stopping
at the first. By default only the open-time checks run (headers, mask PNG integrity, JSON and RLE
structure; see :mod:`maskteacher.data.dataset`); ``full=True`` also decodes every image and
mask, which finds damage only decoding reveals (a truncated JPEG body, say) at the cost of time.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maskteacher.data._io import progress
from maskteacher.data.readers import open_dataset
from maskteacher.errors import UserError

# Image sizes are listed one by one when there are at most this many distinct ones.
MAX_DISTINCT_SIZES = 8


@dataclass
class MaskCounts:
    """Objects per usable image; min/median/max are None when there are no images."""

    total: int
    min: int | None
    median: float | None
    max: int | None


@dataclass
class SizeStats:
    """Image sizes: ranges of H and W, plus ``distinct`` [(h, w, count)] when few."""

    min_h: int | None
    max_h: int | None
    min_w: int | None
    max_w: int | None
    distinct: list[tuple[int, int, int]] | None


@dataclass
class DatasetStats:
    root: str
    format: str
    images: int
    empty_images: int
    masks: MaskCounts
    sizes: SizeStats
    bad: list[tuple[str, str]] = field(default_factory=list)
    full: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: keys images, masks {total, min, median, max}, bad [{item, reason}],
        plus root, format, empty_images, sizes, full."""
        out = asdict(self)
        out["bad"] = [{"item": item, "reason": reason} for item, reason in self.bad]
        distinct = self.sizes.distinct
        out["sizes"]["distinct"] = (
            None if distinct is None else [{"h": h, "w": w, "count": n} for h, w, n in distinct]
        )
        return out

    def lines(self) -> list[str]:
        """Human-readable summary, one fact per line."""
        out = [
            f"dataset: {self.root} ({self.format})",
            f"images: {self.images} ({self.empty_images} without objects)",
        ]
        m = self.masks
        if self.images:
            out.append(
                f"objects per image: min {m.min}, median {m.median:g}, max {m.max} (total {m.total})"
            )
            s = self.sizes
            if s.distinct is not None:
                listed = ", ".join(f"{h}x{w} ({n})" for h, w, n in s.distinct)
                out.append(f"image sizes (HxW, count): {listed}")
            else:
                out.append(f"image sizes: H {s.min_h}..{s.max_h}, W {s.min_w}..{s.max_w}")
        checked = "decoded every image and mask" if self.full else "header/annotation checks"
        out.append(f"bad items: {len(self.bad)} ({checked})")
        out.extend(f"  {item}: {reason}" for item, reason in self.bad)
        return out


def _size_stats(sizes: list[tuple[int, int]]) -> SizeStats:
    if not sizes:
        return SizeStats(None, None, None, None, None)
    counts = Counter(sizes)
    distinct = (
        [(h, w, n) for (h, w), n in sorted(counts.items())]
        if len(counts) <= MAX_DISTINCT_SIZES
        else None
    )
    hs, ws = [h for h, _ in sizes], [w for _, w in sizes]
    return SizeStats(min(hs), max(hs), min(ws), max(ws), distinct)


def _mask_counts(counts: list[int]) -> MaskCounts:
    if not counts:
        return MaskCounts(0, None, None, None)
    return MaskCounts(sum(counts), min(counts), float(np.median(counts)), max(counts))


def dataset_stats(
    path: str | Path,
    *,
    format: str | None = None,
    full: bool = False,
    image_root: str | Path | None = None,
    include_crowd: bool = False,
) -> DatasetStats:
    """Open the dataset (collecting bad items), optionally decode everything, and summarise."""
    dataset = open_dataset(
        path, format, skip_bad=True, image_root=image_root, include_crowd=include_crowd
    )
    bad = list(dataset.bad_items)
    counts: list[int] = []
    sizes: list[tuple[int, int]] = []
    for index in progress(range(len(dataset)), total=len(dataset), desc="scanning"):
        if full:
            try:
                sample = dataset[index]
                _ = sample.masks
            except UserError as exc:
                bad.append((str(dataset.image_path(index)), str(exc)))
                continue
        counts.append(dataset.mask_count(index))
        sizes.append(dataset.image_hw(index))
    return DatasetStats(
        root=str(dataset.root),
        format=dataset.format,
        images=len(counts),
        empty_images=sum(1 for c in counts if c == 0),
        masks=_mask_counts(counts),
        sizes=_size_stats(sizes),
        bad=bad,
        full=full,
    )
