"""``maskteacher data stats``: what a user checks first about a dataset.

The dataset is opened with ``skip_bad=True`` so every bad item is collected instead of stopping
at the first. The open-time checks run (headers, mask PNG integrity, JSON structure, RLE run
lengths and polygon coordinates; see :mod:`maskteacher.data.dataset`), then every image's masks
are measured (``mask_summary``: RLE areas without decoding, mask PNGs decoded) to count masks
that decode **empty** and mask PNGs read with an **inferred** foreground rule
(:mod:`maskteacher.data.masks`). ``full=True`` also decodes every image, which finds damage only
decoding reveals (a truncated JPEG body, say) at the cost of time.
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
    """What ``data stats`` reports (README "Checking a dataset" documents the JSON keys).

    ``empty_masks``: masks with no foreground pixel; ``inferred_rule_masks``: mask PNGs not in
    the ``> 127`` convention (read with an inferred rule); ``exif_oriented_images``: usable
    images whose EXIF orientation tag is not 1 (never applied); ``bad`` holds (item, reason,
    kind) with kind ``image`` or ``annotation``; ``bad_annotations`` counts the latter.
    """

    root: str
    format: str
    images: int
    empty_images: int
    masks: MaskCounts
    sizes: SizeStats
    empty_masks: int = 0
    inferred_rule_masks: int = 0
    exif_oriented_images: int = 0
    bad: list[tuple[str, str, str]] = field(default_factory=list)
    full: bool = False

    @property
    def bad_annotations(self) -> int:
        return sum(1 for *_, kind in self.bad if kind == "annotation")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: keys images, masks {total, min, median, max}, empty_masks,
        inferred_rule_masks, exif_oriented_images, bad_annotations, bad [{item, reason, kind}],
        plus root, format, empty_images, sizes, full."""
        out = asdict(self)
        out["bad"] = [{"item": i, "reason": r, "kind": k} for i, r, k in self.bad]
        out["bad_annotations"] = self.bad_annotations
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
        out.append(
            f"masks that decode empty: {self.empty_masks}; mask files read with an inferred "
            f"foreground rule (not > 127): {self.inferred_rule_masks}"
        )
        out.append(
            f"images with an EXIF orientation tag (ignored: annotations refer to the stored "
            f"pixels): {self.exif_oriented_images}"
        )
        checked = "decoded every image and mask" if self.full else "headers, annotations, masks"
        out.append(
            f"bad items: {len(self.bad)}, {self.bad_annotations} of them annotations ({checked})"
        )
        out.extend(f"  {item}: {reason}" for item, reason, _ in self.bad)
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


@dataclass
class _Tally:
    counts: list[int] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    empty_masks: int = 0
    inferred: int = 0
    oriented: int = 0


def _measure(dataset: Any, index: int, full: bool, tally: _Tally) -> tuple[str, str, str] | None:
    """Add image ``index`` to the tally, or return it as a bad item (item, reason, kind)."""
    if full:
        try:
            _ = dataset[index]
        except UserError as exc:
            return str(dataset.image_path(index)), str(exc), "image"
    try:
        areas, inferred = dataset.mask_summary(index)
    except UserError as exc:
        return str(dataset.image_path(index)), str(exc), "annotation"
    tally.counts.append(dataset.mask_count(index))
    tally.sizes.append(dataset.image_hw(index))
    tally.empty_masks += int(np.count_nonzero(areas == 0))
    tally.inferred += inferred
    tally.oriented += dataset.orientation(index) != 1
    return None


def dataset_stats(
    path: str | Path,
    *,
    format: str | None = None,
    full: bool = False,
    image_root: str | Path | None = None,
    include_crowd: bool = False,
) -> DatasetStats:
    """Open the dataset (collecting bad items), measure every image's masks, optionally decode
    every image, and summarise."""
    dataset = open_dataset(
        path, format, skip_bad=True, image_root=image_root, include_crowd=include_crowd
    )
    bad = [(i, r, k) for (i, r), k in zip(dataset.bad_items, dataset.bad_item_kinds, strict=True)]
    tally = _Tally()
    for index in progress(range(len(dataset)), total=len(dataset), desc="scanning"):
        failed = _measure(dataset, index, full, tally)
        if failed is not None:
            bad.append(failed)
    return DatasetStats(
        root=str(dataset.root),
        format=dataset.format,
        images=len(tally.counts),
        empty_images=sum(1 for c in tally.counts if c == 0),
        masks=_mask_counts(tally.counts),
        sizes=_size_stats(tally.sizes),
        empty_masks=tally.empty_masks,
        inferred_rule_masks=tally.inferred,
        exif_oriented_images=tally.oriented,
        bad=bad,
        full=full,
    )
