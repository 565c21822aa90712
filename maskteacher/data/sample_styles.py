"""Looks of the synthetic sample data: shape outlines and object textures, grouped in styles.

A :class:`SampleStyle` names the shape kinds and texture patterns one sample set draws from;
:data:`SAMPLE_STYLES` holds the built-in ones:

- ``shapes`` (the default, and the original look): ellipses, rectangles and star-shaped
  polygons; flat, striped, checkered or blotchy fills;
- ``shifted``: another domain for the same task -- crosses, many-pointed stars and smooth blobs
  (concave outlines); rings, dots, pixel noise and waves as fills. The demo fine-tunes on it;
- ``mixed``: every shape and every fill (the demo's teacher learns from it: a model that has
  seen both domains, as SAM-H has seen far more of the world than a student's fine-tuning data).

Every shape builder returns the polygon in object-local coordinates (before rotation and
translation), so each kind is one small function and a new kind is one dict entry. The random
numbers are drawn in a fixed order, so an image depends only on its seed, index and style
(``shapes`` draws exactly the numbers it always drew: its images never change).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

#: (rng, size in pixels, rotation) -> (local polygon (K, 2) float, rotation to apply)
ShapeBuilder = Callable[[np.random.Generator, float, float], tuple[np.ndarray, float]]
#: (rng, (H, W), xx, yy) -> (H, W) float32 pattern in [0, 1]
PatternBuilder = Callable[
    [np.random.Generator, tuple[int, int], np.ndarray, np.ndarray], np.ndarray
]


@dataclass(frozen=True)
class SampleStyle:
    """Which shape kinds (keys of :data:`SHAPES`) and fills (keys of :data:`PATTERNS`) to draw."""

    shapes: tuple[str, ...]
    patterns: tuple[str, ...]


def smooth_noise(rng: np.random.Generator, hw: tuple[int, int], cells: int) -> np.ndarray:
    """(H, W) float32 in [0, 1]: a random cells x cells grid upsampled bilinearly."""
    grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
    up = Image.fromarray(grid).resize((hw[1], hw[0]), Image.Resampling.BILINEAR)
    return np.asarray(up, dtype=np.float32) / 255.0


def background(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) float32: a two-colour linear gradient plus smooth and fine noise."""
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = xx * np.cos(angle) + yy * np.sin(angle)
    t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
    c0, c1 = rng.uniform(20, 235, size=(2, 3)).astype(np.float32)
    img = c0 + t[..., None] * (c1 - c0)
    img += (smooth_noise(rng, hw, int(rng.integers(3, 8)))[..., None] - 0.5) * 60
    img += rng.normal(0, 6, size=(h, w, 1)).astype(np.float32)
    return img


# ----------------------------------------------------------------------------- shapes


def _ellipse(rng: np.random.Generator, size: float, rot: float) -> tuple[np.ndarray, float]:
    angles = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    rx, ry = size / 2, size / 2 * rng.uniform(0.4, 1.0)
    return np.stack([rx * np.cos(angles), ry * np.sin(angles)], axis=1), rot


def _rectangle(rng: np.random.Generator, size: float, rot: float) -> tuple[np.ndarray, float]:
    rw, rh = size / 2, size / 2 * rng.uniform(0.3, 1.0)
    local = np.array([[-rw, -rh], [rw, -rh], [rw, rh], [-rw, rh]])
    if rng.random() < 0.5:
        rot = 0.0
    return local, rot


def _star_shaped(rng: np.random.Generator, size: float, rot: float) -> tuple[np.ndarray, float]:
    """Star-shaped (w.r.t. its centre) polygon with 3-8 random vertices."""
    n = int(rng.integers(3, 9))
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=n))
    radii = size / 2 * rng.uniform(0.5, 1.0, size=n)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1), rot


def _cross(rng: np.random.Generator, size: float, rot: float) -> tuple[np.ndarray, float]:
    """A plus sign: two bars of relative width 0.25-0.45 (12 vertices)."""
    r, a = size / 2, size / 2 * rng.uniform(0.25, 0.45)
    local = np.array(
        [[-a, -r], [a, -r], [a, -a], [r, -a], [r, a], [a, a], [a, r], [-a, r], [-a, a], [-r, a]]
        + [[-r, -a], [-a, -a]],
        dtype=float,
    )
    return local, rot


def _star(rng: np.random.Generator, size: float, rot: float) -> tuple[np.ndarray, float]:
    """A regular star with 4-7 points and an inner radius of 0.35-0.6 of the outer one."""
    n = int(rng.integers(4, 8))
    inner = rng.uniform(0.35, 0.6)
    angles = np.arange(2 * n) * np.pi / n
    radii = size / 2 * np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1), rot


def _blob(rng: np.random.Generator, size: float, rot: float) -> tuple[np.ndarray, float]:
    """A smooth blob: a 40-gon whose radius varies with three random low harmonics."""
    angles = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    amplitudes = rng.uniform(0.0, 0.2, size=3)
    phases = rng.uniform(0, 2 * np.pi, size=3)
    wobble = sum(
        a * np.cos((k + 2) * angles + p) for k, (a, p) in enumerate(zip(amplitudes, phases))
    )
    radii = size / 2 * (0.75 + wobble) / 1.35
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1), rot


SHAPES: dict[str, ShapeBuilder] = {
    "ellipse": _ellipse,
    "rectangle": _rectangle,
    "polygon": _star_shaped,
    "cross": _cross,
    "star": _star,
    "blob": _blob,
}

# ----------------------------------------------------------------------------- fills


def _flat(rng, hw, xx, yy) -> np.ndarray:
    return np.zeros(hw, np.float32)


def _stripes(rng, hw, xx, yy) -> np.ndarray:
    angle, period = rng.uniform(0, np.pi), rng.uniform(4, 14)
    phase = (xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period
    return (np.sin(phase) > 0).astype(np.float32)


def _checker(rng, hw, xx, yy) -> np.ndarray:
    cell = int(rng.integers(3, 10))
    return ((xx // cell + yy // cell) % 2).astype(np.float32)


def _blotches(rng, hw, xx, yy) -> np.ndarray:
    return smooth_noise(rng, hw, int(rng.integers(4, 12)))


def _rings(rng, hw, xx, yy) -> np.ndarray:
    cx, cy, period = rng.uniform(0, hw[1]), rng.uniform(0, hw[0]), rng.uniform(4, 12)
    radius = np.hypot(xx - cx, yy - cy)
    return (np.sin(radius * 2 * np.pi / period) > 0).astype(np.float32)


def _dots(rng, hw, xx, yy) -> np.ndarray:
    cell = int(rng.integers(5, 11))
    r = cell * rng.uniform(0.2, 0.4)
    dx, dy = xx % cell - cell / 2, yy % cell - cell / 2
    return (dx * dx + dy * dy < r * r).astype(np.float32)


def _pixel_noise(rng, hw, xx, yy) -> np.ndarray:
    return rng.random(hw).astype(np.float32)


def _waves(rng, hw, xx, yy) -> np.ndarray:
    px, py = rng.uniform(6, 20, size=2)
    return (0.5 + 0.25 * (np.sin(xx * 2 * np.pi / px) + np.sin(yy * 2 * np.pi / py))).astype(
        np.float32
    )


PATTERNS: dict[str, PatternBuilder] = {
    "flat": _flat,
    "stripes": _stripes,
    "checker": _checker,
    "blotches": _blotches,
    "rings": _rings,
    "dots": _dots,
    "noise": _pixel_noise,
    "waves": _waves,
}

SAMPLE_STYLES: dict[str, SampleStyle] = {
    "shapes": SampleStyle(
        shapes=("ellipse", "rectangle", "polygon"),
        patterns=("flat", "stripes", "checker", "blotches"),
    ),
    "shifted": SampleStyle(
        shapes=("cross", "star", "blob"), patterns=("rings", "dots", "noise", "waves")
    ),
    "mixed": SampleStyle(shapes=tuple(SHAPES), patterns=tuple(PATTERNS)),
}
DEFAULT_STYLE = "shapes"


def texture(rng: np.random.Generator, hw: tuple[int, int], style: SampleStyle) -> np.ndarray:
    """(H, W, 3) float32 fill for one object: a base colour mixed with one of the style's
    patterns toward a second colour, plus a little noise."""
    h, w = hw
    base = rng.uniform(0, 255, size=3).astype(np.float32)
    other = rng.uniform(0, 255, size=3).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pattern = style.patterns[int(rng.integers(0, len(style.patterns)))]
    t = PATTERNS[pattern](rng, hw, xx, yy)
    img = base + t[..., None] * (other - base) * 0.6
    return img + rng.normal(0, 4, size=(h, w, 1)).astype(np.float32)


# Object size as a fraction of the image's shorter side: (probability, low, high).
_SIZE_CLASSES = ((0.35, 0.08, 0.18), (0.40, 0.20, 0.40), (0.25, 0.45, 0.80))


def shape_polygon(rng: np.random.Generator, kind: str, hw: tuple[int, int]) -> list[float]:
    """Flat polygon [x1, y1, ...] for one shape of random size/position, clipped to the image."""
    h, w = hw
    probs = np.array([c[0] for c in _SIZE_CLASSES])
    _, lo, hi = _SIZE_CLASSES[int(rng.choice(len(_SIZE_CLASSES), p=probs / probs.sum()))]
    size = rng.uniform(lo, hi) * min(h, w)
    cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
    local, rot = SHAPES[kind](rng, size, rng.uniform(0, 2 * np.pi))
    rotation = np.array([[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]])
    points = local @ rotation.T + np.array([cx, cy])
    points[:, 0] = points[:, 0].clip(0, w)
    points[:, 1] = points[:, 1].clip(0, h)
    return [round(float(v), 3) for v in points.reshape(-1)]
