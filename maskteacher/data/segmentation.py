"""COCO-style segmentations (RLE objects and polygons): validation before decoding, decoding.

pycocotools decodes whatever it is given: an RLE whose run lengths do not add up to ``h * w``
comes back as a mask of uninitialised memory (or writes past its buffer when they add up to
more), a garbage ``counts`` string decodes to noise, and a polygon with NaN / inf or huge
coordinates makes ``frPyObjects`` allocate until the process is killed. So every segmentation
is checked at open time, before pycocotools sees it:

- RLE: ``{"size": [h, w], "counts": str | [int, ...]}``, size equal to the image's, every run
  length >= 0 and their sum exactly ``h * w``. Compressed ``counts`` strings are parsed here
  (vectorised numpy; pycocotools has no validating parser) with the format of its
  ``rleFrString``: 5-bit groups offset by 48 (``'0'``), bit 0x20 = more groups follow, bit
  0x10 of the last group = negative, and from the fourth count on each value is a difference
  to the count two places earlier;
- polygons: lists of an even number (>= 6) of finite numbers, every vertex within the image
  grown by its own size on each side (x in [-W, 2W], y in [-H, 2H]).
A failure is a BadItem whose text names the file and the annotation id.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from numbers import Real
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils

from maskteacher.data._io import BadItem
from maskteacher.data.images import size_mismatch

_PYCOCOTOOLS_NUMPY2_WARNING = "__array__ implementation doesn't accept a copy keyword"
# Longest run-length code accepted, in 5-bit groups (a count < 2**32 and its difference to the
# count two places earlier need at most 34 bits; 7 groups hold 35).
_MAX_GROUPS = 7


def _string_runs(
    strings: list[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | tuple[int, str]:
    """Run lengths of compressed COCO RLE strings, all parsed in one vectorised pass.

    Returns ((K,) int64 runs, (K,) index of the string each run belongs to (non-decreasing),
    (K,) position of the run in its string), or (index of the first malformed string, why).
    """
    for k, text in enumerate(strings):
        if not text.isascii():
            return k, "RLE counts string has non-ASCII characters"
    lengths = np.array([len(t) for t in strings], dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    codes = np.frombuffer("".join(strings).encode("ascii"), dtype=np.uint8) - np.uint8(48)
    if codes.size and codes.max() > 63:  # below '0' wraps around to > 63 as well
        at = int(np.argmax(codes > 63))
        k = int(np.searchsorted(starts, at, side="right")) - 1
        return k, f"RLE counts string has an invalid character {strings[k][at - starts[k]]!r}"
    nonempty = np.flatnonzero(lengths)
    cut = codes[starts[nonempty] + lengths[nonempty] - 1] >= 32  # bit 0x20: more follows
    if cut.any():
        k = int(nonempty[np.argmax(cut)])
        return k, "RLE counts string is truncated (its last character continues a number)"
    group_end = np.flatnonzero(codes < 32)
    group_start = np.concatenate(([0], group_end[:-1] + 1))
    size = group_end - group_start + 1
    first = np.searchsorted(group_start, starts)  # each string's first group (= first run)
    if size.size and size.max() > _MAX_GROUPS:
        k = int(np.searchsorted(first, np.argmax(size), side="right")) - 1
        return k, "RLE counts string encodes a number too large for a run length"
    values = (codes[group_start] & 0x1F).astype(np.int64)
    longer = np.flatnonzero(size > 1)
    for k in range(1, int(size.max(initial=1))):
        longer = longer[size[longer] > k]
        values[longer] |= (codes[group_start[longer] + k] & 0x1F).astype(np.int64) << (5 * k)
    negative = np.flatnonzero(codes[group_end] & 0x10)
    values[negative] -= np.int64(1) << (5 * size[negative])
    return _undelta(values, first)


def _undelta(values: np.ndarray, first: np.ndarray) -> tuple[np.ndarray, ...]:
    """Runs from decoded values: from a string's 4th value on, each is a difference to the run
    two places earlier (so the odd runs, and the even runs from the 3rd, are running sums).
    ``first``: (n,) index of each string's first value (non-decreasing; equal for empty ones).

    Returns ((K,) runs, (K,) owning string, (K,) position of each run in its string).
    """
    per_string = np.diff(first, append=values.size)
    owner = np.repeat(np.arange(first.size), per_string)
    pos = np.arange(values.size) - np.repeat(first, per_string)
    heads = first[per_string > 0]
    chained = values.copy()
    chained[heads] = 0  # a string's first value starts no chain
    sums = np.empty_like(chained)
    sums[0::2] = np.cumsum(chained[0::2])  # both parities' running sums, strided: no copies
    sums[1::2] = np.cumsum(chained[1::2])
    # subtract the running sum just before each string, at the run's parity
    padded = np.concatenate(([0, 0], sums))
    before_even = np.repeat(padded[first], per_string)  # sums[first - 2]
    before_odd = np.repeat(padded[first + 1], per_string)  # sums[first - 1]
    runs = sums - np.where(pos & 1, before_odd, before_even)
    runs[heads] = values[heads]
    return runs, owner, pos


def _sums(values: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """(n,) exact int64 sums of ``values`` per owner (owner non-decreasing, in 0..n-1)."""
    bounds = np.searchsorted(owner, np.arange(n + 1))
    prefix = np.concatenate(([0], np.cumsum(values)))
    return prefix[bounds[1:]] - prefix[bounds[:-1]]


def _list_runs(counts: Any) -> np.ndarray | str:
    """(K,) int64 run lengths of an uncompressed RLE ``counts`` list, or why it is malformed."""
    if not isinstance(counts, list):
        return "RLE counts is neither a string nor a list of run lengths"
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
        return "RLE counts list holds values that are not integers"
    if any(abs(c) >= 2**62 for c in counts):
        return "RLE counts list holds a number too large for a run length"
    return np.asarray(counts, dtype=np.int64)


def _check_rle_object(segmentation: Any, hw: tuple[int, int], where: str, orientation: int) -> Any:
    """The ``counts`` of an RLE object whose structure and size are right; BadItem otherwise."""
    if (
        not isinstance(segmentation, dict)
        or "size" not in segmentation
        or "counts" not in segmentation
    ):
        raise BadItem(where, 'segmentation is not an RLE object {"size": [h, w], "counts": ...}')
    size = segmentation["size"]
    if not (
        isinstance(size, list)
        and len(size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in size)
    ):
        raise BadItem(where, f"RLE size {size!r} is not [height, width]")
    if tuple(size) != tuple(hw):
        raise BadItem(where, size_mismatch("RLE size", tuple(size), hw, orientation))
    return segmentation["counts"]


def _check_runs(runs: np.ndarray, hw: tuple[int, int], where: str) -> int:
    """Foreground area of valid run lengths; BadItem when one is negative or they do not sum
    to ``h * w``."""
    if runs.size and int(runs.min()) < 0:
        raise BadItem(where, "RLE counts decode to a negative run length; expected lengths >= 0")
    if runs.size and int(runs.max()) > hw[0] * hw[1]:
        raise BadItem(
            where,
            f"RLE counts decode to a run of {int(runs.max())} pixels, more than its size "
            f"{hw[0]}x{hw[1]} holds (corrupt counts)",
        )
    total = int(runs.sum())
    if total != hw[0] * hw[1]:
        raise BadItem(
            where,
            f"RLE counts add up to {total} pixels but its size {hw[0]}x{hw[1]} has "
            f"{hw[0] * hw[1]}; expected equal (corrupt or truncated counts)",
        )
    return int(runs[1::2].sum())


def check_rles(
    segmentations: Sequence[Any],
    hw: tuple[int, int],
    wheres: Sequence[str],
    *,
    orientation: int = 1,
) -> np.ndarray:
    """Validate COCO RLE objects (compressed or uncompressed); return their (M,) areas.

    Raises BadItem(wheres[k], ...) for the first segmentation k that is not ``{"size": [h, w],
    "counts": str | list}``, whose size differs from ``hw`` (``orientation``: the image's
    EXIF tag, for the message), whose counts do not parse, hold a negative run length or do not
    sum to ``h * w``. Compressed strings are parsed together in one vectorised pass.
    """
    counts = [
        _check_rle_object(seg, hw, where, orientation)
        for seg, where in zip(segmentations, wheres, strict=True)
    ]
    areas = np.zeros(len(counts), dtype=np.int64)
    text = [k for k, c in enumerate(counts) if isinstance(c, str)]
    if text:
        parsed = _string_runs([counts[k] for k in text])
        if isinstance(parsed[1], str):
            raise BadItem(wheres[text[parsed[0]]], f"{parsed[1]}; expected COCO RLE counts")
        runs, owner, pos = parsed
        pixels = hw[0] * hw[1]
        if runs.size and (runs.min() < 0 or runs.max() > pixels):
            bad_runs = True
        else:
            bad_runs = bool((_sums(runs, owner, len(text)) != pixels).any())
        if bad_runs:
            bounds = np.searchsorted(owner, np.arange(len(text) + 1))
            for j, k in enumerate(text):  # the first bad one raises with its message
                _check_runs(runs[bounds[j] : bounds[j + 1]], hw, wheres[k])
        areas[text] = _sums(np.where(pos % 2 == 1, runs, 0), owner, len(text))
    for k, c in enumerate(counts):
        if not isinstance(c, str):
            runs_k = _list_runs(c)
            if isinstance(runs_k, str):
                raise BadItem(wheres[k], f"{runs_k}; expected COCO RLE counts")
            areas[k] = _check_runs(runs_k, hw, wheres[k])
    return areas


def _finite_number(v: Any) -> bool:
    if not isinstance(v, Real) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an int too large for a float
        return False


def check_polygons(segmentation: list[Any], hw: tuple[int, int], *, where: str) -> None:
    """Validate COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` against an (H, W) image.

    Raises BadItem(where, ...) on an empty list, a polygon with an odd number or fewer than 6
    coordinates, a value that is not a finite number, or a vertex outside [-W, 2W] x [-H, 2H].
    """
    if not segmentation:
        raise BadItem(where, "segmentation is an empty polygon list")
    h, w = hw
    for polygon in segmentation:
        if not isinstance(polygon, list):
            raise BadItem(
                where, "segmentation is not a list of polygons [[x1, y1, x2, y2, ...], ...]"
            )
        if len(polygon) < 6 or len(polygon) % 2:
            raise BadItem(
                where, f"polygon has {len(polygon)} coordinates; expected an even number >= 6"
            )
        if not all(_finite_number(v) for v in polygon):
            shown = next(v for v in polygon if not _finite_number(v))
            raise BadItem(where, f"polygon coordinate {shown!r} is not a finite number")
        xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        outside = (np.abs(xy[:, 0] - w / 2) > 1.5 * w) | (np.abs(xy[:, 1] - h / 2) > 1.5 * h)
        if outside.any():
            x, y = xy[int(np.flatnonzero(outside)[0])]
            raise BadItem(
                where,
                f"polygon vertex ({x:g}, {y:g}) lies far outside the {w}x{h} (WxH) image; "
                f"expected x in [{-w}, {2 * w}] and y in [{-h}, {2 * h}]",
            )


def check_segmentations(
    segmentations: Sequence[Any],
    hw: tuple[int, int],
    wheres: Sequence[str],
    *,
    orientation: int = 1,
) -> None:
    """Polygons (each checked alone) and RLE objects (checked together), as above."""
    polygons = [k for k, seg in enumerate(segmentations) if isinstance(seg, list)]
    for k in polygons:
        check_polygons(segmentations[k], hw, where=wheres[k])
    rles = [k for k, seg in enumerate(segmentations) if not isinstance(seg, list)]
    check_rles(
        [segmentations[k] for k in rles],
        hw,
        [wheres[k] for k in rles],
        orientation=orientation,
    )


def to_rle(segmentation: Any, hw: tuple[int, int]) -> dict[str, Any]:
    """Compressed RLE of one checked segmentation, the form pycocotools decodes.

    Polygons are rasterised and merged (``COCO.annToRLE``'s steps); uncompressed ``counts``
    lists (COCO crowd annotations) go through ``frPyObjects``; strings pass through.
    """
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, *hw))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, *hw)
    return segmentation


def decode_rles(rles: Sequence[dict[str, Any]], hw: tuple[int, int]) -> np.ndarray:
    """Decode checked compressed COCO RLEs to (M, H, W) bool via pycocotools.

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


def rle_areas(rles: Sequence[dict[str, Any]]) -> np.ndarray:
    """(M,) int64 foreground pixel counts of checked compressed RLEs (no decoding)."""
    if not rles:
        return np.zeros(0, dtype=np.int64)
    return np.asarray(mask_utils.area(list(rles)), dtype=np.int64).reshape(-1)
