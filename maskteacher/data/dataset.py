"""Records and the common reader interface: :class:`Sample`, :class:`SegmentationDataset` and the
base class the three readers (folder, sa1b, coco) share.

Open-time vs access-time checks
-------------------------------
Opening a dataset lists its items in a sorted, deterministic order and checks each one cheaply:
image headers (format + size, no pixel decoding), mask PNG headers and chunk CRCs
(``PIL.Image.verify``, no decompression), annotation JSON parsing, RLE and polygon structure and
sizes. A failing item raises :class:`~maskteacher.errors.UserError` naming the file, or, with
``skip_bad=True``, is logged, recorded in ``bad_items`` and left out of ``image_ids``. Because bad
items are dropped at open time, every process that opens the same data (precompute workers,
trainer ranks) sees the same item list and the same fingerprint.

Pixel data is decoded only on access: the image in ``dataset[i]``, masks on first
``sample.masks``. Damage that only decoding can find (e.g. a truncated JPEG whose header is
intact) raises UserError naming the file at that point, also under ``skip_bad``;
``maskteacher data stats ROOT --full`` decodes everything and lists such files.

Images are decoded on their stored pixel grid (EXIF orientation is not applied; see
:mod:`maskteacher.data.images`); a dataset with orientation-tagged images logs one warning when
opened. ``fingerprint_entries`` is computed on first use (:mod:`maskteacher.data.fingerprint`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from maskteacher.data._io import BadItemLog, BadKind, progress
from maskteacher.data.fingerprint import content_key, image_digest
from maskteacher.data.images import read_image, warn_oriented
from maskteacher.errors import UserError


@dataclass(eq=False)
class Sample:
    """One image and its instance masks.

    Fields:
        image_id: stable id (file stem for folder/sa1b, ``str(image id)`` for coco).
        image: (H, W, 3) uint8 RGB, original frame, on the file's stored pixel grid (EXIF
            orientation is not applied: annotations refer to that grid, as in COCO).
        num_masks: number of object masks, known without decoding them.
        masks (property): (M, H, W) bool, original frame, M == num_masks (may be 0); decoded on
            first access and cached. RLE formats (sa1b, coco) return pycocotools' column-major
            layout as a zero-copy view (not C-contiguous); ``np.ascontiguousarray`` if needed.

    ``mask_loader`` is a picklable zero-argument callable returning the masks (readers pass a
    ``functools.partial`` of a module-level function so samples survive DataLoader workers).
    """

    image_id: str
    image: np.ndarray
    num_masks: int
    mask_loader: Callable[[], np.ndarray] = field(repr=False)
    _masks: np.ndarray | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_arrays(cls, image_id: str, image: np.ndarray, masks: np.ndarray) -> Sample:
        """A sample whose masks are already decoded: image (H, W, 3) uint8, masks (M, H, W) bool."""
        masks = np.asarray(masks, dtype=bool)
        if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
            raise ValueError(f"masks shape {masks.shape} does not match image shape {image.shape}")
        sample = cls(image_id, image, int(masks.shape[0]), mask_loader=masks.copy)
        sample._masks = masks
        return sample

    @property
    def orig_hw(self) -> tuple[int, int]:
        """(H, W) of the original frame."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    @property
    def masks(self) -> np.ndarray:
        """(M, H, W) bool instance masks in the original frame, decoded on first access."""
        if self._masks is None:
            masks = self.mask_loader()
            expected = (self.num_masks, *self.orig_hw)
            if masks.shape != expected:  # a reader bug, not user input
                raise RuntimeError(
                    f"{self.image_id}: decoded masks {masks.shape}, expected {expected}"
                )
            self._masks = masks
        return self._masks


@runtime_checkable
class SegmentationDataset(Protocol):
    """What every reader provides (FolderDataset, SA1BDataset, CocoDataset)."""

    root: Path
    format: str
    image_ids: list[str]
    bad_items: list[tuple[str, str]]
    bad_item_kinds: list[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...

    def image_path(self, index: int) -> Path: ...

    def image_hw(self, index: int) -> tuple[int, int]: ...

    def mask_count(self, index: int) -> int: ...

    def orientation(self, index: int) -> int: ...

    def mask_summary(self, index: int) -> tuple[np.ndarray, int]: ...

    def fingerprint_entries(self) -> list[tuple[str, int]]: ...


@dataclass(frozen=True)
class Item:
    """What a reader knows about one image after the open-time scan.

    ``mask_loader`` decodes the (M, H, W) bool masks; ``summary_loader`` returns ((M,) int64
    foreground pixel counts, number of masks read with an inferred rule) without keeping the
    masks; both must be picklable. ``orientation`` is the image's EXIF tag (1 = none);
    ``annotation_digest`` the digest of its annotations for the fingerprint.
    """

    image_id: str
    image_path: Path
    hw: tuple[int, int]
    num_masks: int
    mask_loader: Callable[[], np.ndarray]
    summary_loader: Callable[[], tuple[np.ndarray, int]]
    annotation_digest: bytes
    orientation: int = 1


class BaseDataset:
    """Index, access and bookkeeping shared by the readers; subclasses build ``self._items``."""

    format: str = ""

    def __init__(self, root: Path, items: list[Item], bad: BadItemLog) -> None:
        self.root = root
        self._items = items
        self.image_ids = [item.image_id for item in items]
        self.bad_items = bad.items
        self.bad_item_kinds: list[BadKind] = bad.kinds
        self._fingerprint: list[tuple[str, int]] | None = None
        bad.summarise(root)
        oriented = [(it.image_path, it.orientation) for it in items if it.orientation != 1]
        warn_oriented(root, oriented, len(items))

    def __len__(self) -> int:
        return len(self._items)

    def _item(self, index: int) -> Item:
        if not -len(self._items) <= index < len(self._items):
            raise IndexError(f"index {index} out of range for {len(self._items)} images")
        return self._items[index]

    def __getitem__(self, index: int) -> Sample:
        item = self._item(index)
        image = read_image(item.image_path)
        if image.shape[:2] != item.hw:  # header and pixels disagree: a broken file
            raise UserError(
                f"{item.image_path}: decoded image is {image.shape[0]}x{image.shape[1]} but its "
                f"header said {item.hw[0]}x{item.hw[1]}; expected equal"
            )
        return Sample(item.image_id, image, item.num_masks, mask_loader=item.mask_loader)

    def image_path(self, index: int) -> Path:
        return self._item(index).image_path

    def image_hw(self, index: int) -> tuple[int, int]:
        """(H, W) of image ``index`` from its header (no decoding)."""
        return self._item(index).hw

    def mask_count(self, index: int) -> int:
        """Number of object masks of image ``index`` (no decoding)."""
        return self._item(index).num_masks

    def orientation(self, index: int) -> int:
        """EXIF orientation tag of image ``index`` (1 when absent); never applied."""
        return self._item(index).orientation

    def mask_summary(self, index: int) -> tuple[np.ndarray, int]:
        """((M,) int64 foreground pixels per mask, masks read with an inferred rule) of image
        ``index``, without keeping the decoded masks. UserError when a mask does not decode."""
        return self._item(index).summary_loader()

    def fingerprint_entries(self) -> list[tuple[str, int]]:
        """(image_id, content key) per image, in ``image_ids`` order; computed once, on first
        use (it reads a few blocks of every image: :mod:`maskteacher.data.fingerprint`)."""
        if self._fingerprint is None:
            entries = []
            for item in progress(self._items, total=len(self._items), desc="fingerprinting"):
                try:
                    sampled = image_digest(item.image_path)
                except OSError as exc:
                    raise UserError(
                        f"{item.image_path}: cannot read the image for the dataset fingerprint "
                        f"({exc})"
                    ) from None
                entries.append((item.image_id, content_key(sampled, item.annotation_digest)))
            self._fingerprint = entries
        return list(self._fingerprint)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, images={len(self)}, "
            f"bad_items={len(self.bad_items)})"
        )
