"""Overlay pictures of everything-mode results: image | ground truth | student | teacher.

The one drawing path used by ``maskteacher eval`` and by the trainer's ``visual`` section, built
on :mod:`.overlay` (numpy + PIL). All masks are (N, H, W) bool in the original frame.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from maskteacher.viz.overlay import draw_masks, save_png, side_by_side

PANEL_TITLES = ("image", "ground truth", "student", "teacher")
TITLE_HEIGHT = 14


def _titled(panel: np.ndarray, title: str) -> np.ndarray:
    """Put a one-line caption above an (H, W, 3) uint8 panel."""
    h, w = panel.shape[:2]
    out = np.full((h + TITLE_HEIGHT, w, 3), 255, np.uint8)
    out[TITLE_HEIGHT:] = panel
    canvas = Image.fromarray(out)
    ImageDraw.Draw(canvas).text((2, 1), title, fill=(0, 0, 0))
    return np.asarray(canvas)


def overlay_panels(
    image: np.ndarray,
    gt_masks: np.ndarray,
    student_masks: np.ndarray,
    teacher_masks: np.ndarray | None = None,
    *,
    captions: dict[str, str] | None = None,
) -> np.ndarray:
    """One row of titled panels: the image, GT filled, student filled (GT outlined), teacher filled.

    image (H, W, 3) uint8; gt / student / teacher masks (N, H, W) bool. The teacher panel is
    left out when ``teacher_masks`` is None. ``captions`` may replace a panel's title (keys from
    :data:`PANEL_TITLES`), e.g. to add mask counts. Returns an (H + 14, W_total, 3) uint8 image.
    """
    captions = captions or {}
    panels = [
        ("image", image),
        ("ground truth", draw_masks(image, gt_masks)),
        ("student", draw_masks(image, student_masks, outlines=gt_masks)),
    ]
    if teacher_masks is not None:
        panels.append(("teacher", draw_masks(image, teacher_masks, outlines=gt_masks)))
    return side_by_side([_titled(p, captions.get(name, name)) for name, p in panels])


def save_overlay(path: str | Path, *args, **kwargs) -> Path:
    """Draw :func:`overlay_panels` and write it as PNG (atomically); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(path, overlay_panels(*args, **kwargs))
    return path


def safe_file_name(image_id: str) -> str:
    """An image id as a file-name stem: anything but letters, digits, ``.``, ``_``, ``-`` -> ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", image_id)
