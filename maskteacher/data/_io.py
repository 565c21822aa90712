"""Shared file helpers for the dataset readers: image headers, image/mask decoding, RLE decoding,
bad-item bookkeeping. Every failure becomes a :class:`~maskteacher.errors.UserError` whose one
line names the file and what was expected.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from maskteacher.errors import UserError

log = logging.getLogger("maskteacher.data")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# What PIL raises on unreadable, truncated or malformed files (PNG ``verify`` raises SyntaxError).
_PIL_ERRORS = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
)
# Show a progress bar when an open-time scan or a stats pass covers at least this many items.
PROGRESS_MIN_ITEMS = 200
# How many skipped items are logged one by one before the rest is only counted.
_MAX_LOGGED_BAD = 10

_PYCOCOTOOLS_NUMPY2_WARNING = "__array__ implementation doesn't accept a copy keyword"

T = TypeVar("T")


class BadItem(Exception):
    """One item of a dataset is unusable; ``item`` names the file (or id), ``reason`` says why.

    Internal to the readers: with ``skip_bad`` it is recorded, otherwise it becomes a UserError.
    """

    def __init__(self, item: str | Path, reason: str) -> None:
        super().__init__(f"{item}: {reason}")
        self.item = str(item)
        self.reason = reason


class BadItemLog:
    """Collects bad items while a reader scans a dataset (the ``skip_bad`` policy).

    ``handle(bad)`` raises a UserError unless ``skip_bad``; with it, the item is logged as a
    warning (the first few one by one) and appended to ``items``.
    """

    def __init__(self, *, skip_bad: bool) -> None:
        self.skip_bad = skip_bad
        self.items: list[tuple[str, str]] = []

    def handle(self, bad: BadItem) -> None:
        if not self.skip_bad:
            raise UserError(
                f"{bad.item}: {bad.reason} (pass skip_bad / --skip-bad to skip such items)"
            )
        self.items.append((bad.item, bad.reason))
        if len(self.items) <= _MAX_LOGGED_BAD:
            log.warning("skipping bad item %s: %s", bad.item, bad.reason)

    def summarise(self, root: Path) -> None:
        if len(self.items) > _MAX_LOGGED_BAD:
            log.warning(
                "skipped %d bad items in %s (the dataset's bad_items lists them all)",
                len(self.items),
                root,
            )


def progress(items: Sequence[T] | Iterable[T], *, total: int, desc: str) -> Iterator[T]:
    """``tqdm`` over ``items`` when there are enough of them to be worth a bar."""
    return iter(
        tqdm(items, total=total, desc=desc, leave=False, disable=total < PROGRESS_MIN_ITEMS)
    )


def visible_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files in ``folder`` whose suffix (case-insensitive) is one of ``suffixes``, skipping hidden
    names such as macOS ``._x.jpg`` resource forks."""
    return [
        p
        for p in folder.iterdir()
        if p.suffix.lower() in suffixes and not p.name.startswith(".") and p.is_file()
    ]


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key that orders ``2.png`` before ``10.png`` (digit runs compare as numbers)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def image_header(path: Path) -> tuple[int, int]:
    """(H, W) of an image file from its header, without decoding pixels.

    Raises BadItem when the file is missing or is not an image PIL can read.
    """
    try:
        with Image.open(path) as im:
            width, height = im.size
    except FileNotFoundError:
        raise BadItem(path, "image file not found") from None
    except _PIL_ERRORS as exc:
        raise BadItem(path, f"not a readable image ({exc})") from None
    return height, width


def check_mask_file(path: Path, hw: tuple[int, int]) -> None:
    """Header + integrity check of a mask PNG without decompressing it.

    ``Image.verify`` walks the PNG chunks and their CRCs, so a truncated or bit-flipped file is
    found here at open time. Raises BadItem on an unreadable file or a size other than ``hw``.
    """
    try:
        with Image.open(path) as im:
            width, height = im.size
            im.verify()
    except _PIL_ERRORS as exc:
        raise BadItem(path, f"not a readable mask image ({exc})") from None
    if (height, width) != hw:
        raise BadItem(
            path, f"mask is {height}x{width} (HxW) but its image is {hw[0]}x{hw[1]}; expected equal"
        )


def load_rgb(path: Path) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB.

    Grey, grey+alpha, RGBA, palette, CMYK etc. are converted to RGB (alpha is dropped). EXIF
    orientation is deliberately NOT applied: masks are stored on the file's pixel grid, so the
    image must stay on it too.
    """
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found") from None
    except _PIL_ERRORS as exc:
        raise UserError(
            f"{path}: cannot decode image ({exc}); expected a readable JPEG/PNG"
        ) from None
    return np.asarray(rgb, dtype=np.uint8)


def load_binary_mask(path: Path, hw: tuple[int, int]) -> np.ndarray:
    """Decode one mask PNG to (H, W) bool: foreground = grey value > 127."""
    try:
        with Image.open(path) as im:
            grey = np.asarray(im.convert("L"))
    except _PIL_ERRORS as exc:
        raise UserError(f"{path}: cannot decode mask ({exc}); expected a readable PNG") from None
    if grey.shape != hw:
        raise UserError(
            f"{path}: mask is {grey.shape[0]}x{grey.shape[1]} (HxW) but its image is "
            f"{hw[0]}x{hw[1]}; expected equal"
        )
    return grey > 127


def read_json(path: Path) -> Any:
    """Parse a JSON file; BadItem names the file and the parse error."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise BadItem(path, "annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadItem(path, f"annotation JSON does not parse ({exc})") from None
    except OSError as exc:
        raise BadItem(path, f"cannot read annotation file ({exc})") from None


def check_rle(segmentation: Any, hw: tuple[int, int], *, where: str) -> None:
    """Validate a COCO RLE object (compressed or uncompressed) against the image size.

    Raises BadItem(where, ...) when it is not ``{"size": [h, w], "counts": str | list}`` or its
    size differs from ``hw``.
    """
    if (
        not isinstance(segmentation, dict)
        or "size" not in segmentation
        or "counts" not in segmentation
    ):
        raise BadItem(where, 'segmentation is not an RLE object {"size": [h, w], "counts": ...}')
    size = segmentation["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        raise BadItem(where, f"RLE size {size!r} is not [height, width]")
    if tuple(size) != tuple(hw):
        raise BadItem(
            where,
            f"RLE size is {size[0]}x{size[1]} (HxW) but the image is {hw[0]}x{hw[1]}; expected equal",
        )
    if not isinstance(segmentation["counts"], str | list):
        raise BadItem(where, "RLE counts is neither a string nor a list of run lengths")


def decode_rles(rles: Sequence[dict[str, Any]], hw: tuple[int, int]) -> np.ndarray:
    """Decode compressed COCO RLEs (``counts`` str or bytes) to (M, H, W) bool via pycocotools.

    The result is a zero-copy view of pycocotools' column-major output, so it is NOT C-contiguous
    (its C-contiguous twin is ``.transpose(0, 2, 1)``, shape (M, W, H)). Re-laying it out would
    double the decode time; ``masks_to_lowres`` takes either layout at full speed, and
    ``np.ascontiguousarray`` gives C order where a consumer needs it.
    """
    if not rles:
        return np.zeros((0, *hw), dtype=bool)
    with warnings.catch_warnings():
        # pycocotools <= 2.0.11 trips numpy 2's __array__(copy=...) deprecation on every decode
        warnings.filterwarnings("ignore", _PYCOCOTOOLS_NUMPY2_WARNING, DeprecationWarning)
        stacked = mask_utils.decode(list(rles))  # (H, W, M) uint8, Fortran order
    return stacked.view(np.bool_).transpose(2, 0, 1)


def compress_rle(segmentation: dict[str, Any]) -> dict[str, Any]:
    """An RLE object in the compressed form pycocotools decodes: uncompressed ``counts`` lists
    (as in COCO crowd annotations) are converted with ``frPyObjects``; strings pass through."""
    if isinstance(segmentation["counts"], list):
        h, w = segmentation["size"]
        return mask_utils.frPyObjects(segmentation, h, w)
    return segmentation
