"""Mask overlays on RGB images (numpy + PIL)."""

from __future__ import annotations

import colorsys
import os
import tempfile
from collections.abc import Sequence

import numpy as np


def palette(n: int, *, seed: int = 0) -> np.ndarray:
    """(n, 3) uint8 distinct, saturated colours (golden-ratio hue steps), deterministic."""
    hues = (seed * 0.1 + np.arange(n) * 0.618033988749895) % 1.0
    rgb = [colorsys.hsv_to_rgb(h, 0.85, 0.95) for h in hues]
    return (np.asarray(rgb, np.float64).reshape(n, 3) * 255).round().astype(np.uint8)


def mask_outlines(masks: np.ndarray, *, thickness: int = 1) -> np.ndarray:
    """(M, H, W) bool -> (M, H, W) bool boundary pixels (inside the mask, next to outside).

    A pixel is on the outline when it is in the mask and one of its 4 neighbours within
    ``thickness`` steps is not (the image border counts as outside).
    """
    m = np.asarray(masks, bool)
    inner = m.copy()
    for _ in range(max(1, thickness)):
        padded = np.pad(inner, ((0, 0), (1, 1), (1, 1)), constant_values=False)
        inner = (
            inner
            & padded[:, :-2, 1:-1]
            & padded[:, 2:, 1:-1]
            & padded[:, 1:-1, :-2]
            & padded[:, 1:-1, 2:]
        )
    return m & ~inner


def draw_masks(
    image: np.ndarray,
    masks: np.ndarray,
    *,
    outlines: np.ndarray | None = None,
    alpha: float = 0.45,
    colors: np.ndarray | None = None,
    outline_color: tuple[int, int, int] = (255, 255, 255),
    outline_thickness: int = 1,
) -> np.ndarray:
    """Fill ``masks`` in colour over ``image`` and draw the boundaries of ``outlines``.

    image (H, W, 3) uint8; masks (N, H, W) bool, blended with ``alpha``, largest first so small
    masks stay visible; outlines (M, H, W) bool or None, drawn on top in ``outline_color``.
    Returns a new (H, W, 3) uint8 image.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {img.shape} {img.dtype}")
    h, w = img.shape[:2]
    masks = np.asarray(masks, bool)
    if masks.ndim != 3 or masks.shape[1:] != (h, w):
        raise ValueError(f"masks must be (N, {h}, {w}) bool, got {masks.shape}")
    out = img.astype(np.float32)
    cols = palette(len(masks)) if colors is None else np.asarray(colors, np.uint8)
    if len(cols) < len(masks):
        raise ValueError(f"{len(cols)} colours for {len(masks)} masks")
    for k in np.argsort(-masks.sum(axis=(1, 2)), kind="stable"):
        sel = masks[k]
        out[sel] = (1.0 - alpha) * out[sel] + alpha * cols[k].astype(np.float32)
    result = out.round().clip(0, 255).astype(np.uint8)
    if outlines is not None:
        outlines = np.asarray(outlines, bool)
        if outlines.ndim != 3 or outlines.shape[1:] != (h, w):
            raise ValueError(f"outlines must be (M, {h}, {w}) bool, got {outlines.shape}")
        if len(outlines):
            edge = mask_outlines(outlines, thickness=outline_thickness).any(0)
            result[edge] = np.asarray(outline_color, np.uint8)
    return result


def side_by_side(
    panels: Sequence[np.ndarray], *, gap: int = 4, background: int = 255
) -> np.ndarray:
    """Place (H_i, W_i, 3) uint8 panels left to right, top-aligned, ``gap`` pixels apart."""
    if not panels:
        raise ValueError("side_by_side needs at least one panel")
    for p in panels:
        if p.ndim != 3 or p.shape[2] != 3 or p.dtype != np.uint8:
            raise ValueError(f"panels must be (H, W, 3) uint8, got {p.shape} {p.dtype}")
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    out = np.full((height, width, 3), background, np.uint8)
    x = 0
    for p in panels:
        out[: p.shape[0], x : x + p.shape[1]] = p
        x += p.shape[1] + gap
    return out


def save_png(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Write an (H, W, 3) or (H, W) uint8 image as PNG (temporary file + rename)."""
    from PIL import Image

    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"image must be (H, W, 3) or (H, W) uint8, got {img.shape} {img.dtype}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(img).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
