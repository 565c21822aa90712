"""Mask PNGs of the ``folder`` format: integrity check at open time, decoding to bool.

Which pixels are foreground
---------------------------
The origin's convention is one 8-bit grey PNG per object with foreground = value > 127. Masks
written by other tools often are not: 0/1 (very common), small grey levels, palette (``P``)
or RGB images. All of those decoded to *empty* masks under the plain ``> 127`` rule. The rule
now is, per file:

- palette (``P`` / ``PA``): foreground = palette index > 0 (index 0 is the background, as in
  PASCAL VOC style masks);
- grey (``1`` / ``L`` / ``LA``, alpha ignored) and 16-bit grey (``I;16``): the value;
  RGB(A) and other colour modes: the brightest of R, G, B. Then, with ``half`` = 127 (8 bit)
  or 32767 (16 bit):

  - some value > ``half``: foreground = value > ``half`` (the origin's rule, unchanged);
  - all values in 1..``half`` (e.g. 0/1 masks): foreground = value > 0 (inferred);
  - all values 0: an empty mask (``data stats`` counts these as ``empty_masks``).

A rule other than the origin's is *inferred*: the first such file logs one warning per dataset
(per process), and ``data stats`` counts those files (``inferred_rule_masks``). Coloured RGB
masks (not R = G = B) also count as inferred, since the origin read their luma.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from maskteacher.data._io import BadItem, digest, read_file
from maskteacher.data.images import PIL_ERRORS, SIXTEEN_BIT_MODES, size_mismatch
from maskteacher.errors import UserError

log = logging.getLogger("maskteacher.data")

_GREY_MODES = frozenset({"1", "L", "LA", "La"})
_PALETTE_MODES = frozenset({"P", "PA"})
# Dataset keys (mask roots) whose inferred-rule warning was logged in this process.
_WARNED: set[str] = set()


def _values(im: Image.Image) -> tuple[np.ndarray, int, str]:
    """(H, W) values the rule thresholds, the ``half`` threshold, and what the values are."""
    if im.mode in SIXTEEN_BIT_MODES:
        return np.clip(np.asarray(im).astype(np.int64), 0, 65535), 32767, "16-bit grey values"
    if im.mode in _GREY_MODES:
        return np.asarray(im.convert("L")), 127, "grey values"
    rgb = np.asarray(im.convert("RGB"))
    what = "RGB values" if _is_grey(rgb) else "colour mask, brightest channel"
    return rgb.max(axis=2), 127, what


def _is_grey(rgb: np.ndarray) -> bool:
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def foreground(im: Image.Image) -> tuple[np.ndarray, str | None]:
    """(H, W) bool foreground of one mask image by the module's rule, and the inferred rule
    in words (None when the origin's ``> 127`` applied or the mask is all zero)."""
    if im.mode in _PALETTE_MODES:
        index = np.asarray(im)
        index = index[..., 0] if index.ndim == 3 else index
        return index > 0, "palette image: foreground = palette index > 0"
    values, half, what = _values(im)
    top = int(values.max(initial=0))
    if top > half:
        inferred = f"{what}: foreground = value > {half}" if what.startswith("colour") else None
        return values > half, inferred
    if top == 0:
        return np.zeros(values.shape, dtype=bool), None
    return values > 0, f"{what} 0..{top}, none above {half}: foreground = value > 0"


def decode_mask(path: Path, hw: tuple[int, int]) -> tuple[np.ndarray, str | None]:
    """(H, W) bool mask of one PNG and its inferred rule (see :func:`foreground`).

    Raises UserError naming the file when it does not decode or its size is not ``hw``.
    """
    try:
        with Image.open(path) as im:
            mask, inferred = foreground(im)
    except PIL_ERRORS as exc:
        raise UserError(f"{path}: cannot decode mask ({exc}); expected a readable PNG") from None
    if mask.shape != tuple(hw):
        raise UserError(f"{path}: {size_mismatch('mask', mask.shape, hw, 1)}")
    return mask, inferred


def warn_inferred(key: str, path: Path, rule: str) -> None:
    """Log the inferred-rule warning once per dataset ``key`` in this process."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    log.warning(
        "%s: mask not in the origin's >127 convention (%s); masks of %s that need it are read "
        "with such an inferred rule (warned once per dataset; maskteacher data stats counts "
        "them as inferred_rule_masks)",
        path,
        rule,
        key,
    )


def load_masks(paths: tuple[Path, ...], hw: tuple[int, int], key: str) -> np.ndarray:
    """(M, H, W) bool from one PNG per object; warns once per ``key`` on an inferred rule."""
    if not paths:
        return np.zeros((0, *hw), dtype=bool)
    masks = []
    for path in paths:
        mask, inferred = decode_mask(path, hw)
        if inferred is not None:
            warn_inferred(key, path, inferred)
        masks.append(mask)
    return np.stack(masks)


def mask_summary(paths: tuple[Path, ...], hw: tuple[int, int]) -> tuple[np.ndarray, int]:
    """((M,) int64 foreground pixel counts, number of files read with an inferred rule)."""
    areas, inferred = np.zeros(len(paths), dtype=np.int64), 0
    for k, path in enumerate(paths):
        mask, rule = decode_mask(path, hw)
        areas[k] = int(np.count_nonzero(mask))
        inferred += rule is not None
    return areas, inferred


def check_mask_file(path: Path, hw: tuple[int, int], orientation: int) -> bytes:
    """Header + integrity check of a mask PNG without decompressing it; returns its digest.

    ``Image.verify`` walks the PNG chunks and their CRCs, so a truncated or bit-flipped file is
    found here at open time. Raises BadItem on an unreadable file or a size other than ``hw``
    (``orientation``: the image's EXIF tag, for the mismatch message).
    """
    raw = read_file(path, "mask file")
    try:
        with Image.open(io.BytesIO(raw)) as im:
            width, height = im.size
            im.verify()
    except UnidentifiedImageError:
        raise BadItem(path, "not a readable mask image (not a format PIL can identify)") from None
    except PIL_ERRORS as exc:
        raise BadItem(path, f"not a readable mask image ({exc})") from None
    if (height, width) != tuple(hw):
        raise BadItem(path, size_mismatch("mask", (height, width), hw, orientation))
    return digest(raw)
