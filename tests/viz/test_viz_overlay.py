"""maskteacher.viz: overlays, outlines, panels, PNG writing (numpy + PIL only)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from maskteacher.viz import draw_masks, mask_outlines, palette, save_png, side_by_side


def test_palette_is_distinct_and_deterministic():
    p = palette(12)
    assert p.shape == (12, 3) and p.dtype == np.uint8
    assert len({tuple(c) for c in p}) == 12
    assert (palette(12) == p).all()


def test_outline_of_a_square():
    m = np.zeros((1, 8, 8), bool)
    m[0, 2:6, 2:6] = True
    edge = mask_outlines(m)[0]
    assert edge.sum() == 12  # 4x4 square: 16 pixels, 4 inside
    assert not edge[3:5, 3:5].any() and edge[2, 2:6].all()
    assert mask_outlines(m, thickness=2)[0].sum() == 16
    full = np.ones((1, 4, 4), bool)
    assert mask_outlines(full)[0].sum() == 12  # the image border counts as outside


def test_draw_masks_fills_and_outlines():
    img = np.full((10, 12, 3), 100, np.uint8)
    masks = np.zeros((2, 10, 12), bool)
    masks[0, :5] = True
    masks[1, 0, 0] = True
    gt = np.zeros((1, 10, 12), bool)
    gt[0, 6:9, 6:9] = True
    out = draw_masks(
        img, masks, outlines=gt, alpha=0.5, colors=np.array([[200, 0, 0], [0, 0, 200]], np.uint8)
    )
    assert out.shape == img.shape and out.dtype == np.uint8
    assert tuple(out[2, 5]) == (150, 50, 50)
    assert tuple(out[0, 0]) == (75, 25, 125)  # small mask drawn after (on top of) the big one
    assert tuple(out[6, 6]) == (255, 255, 255) and tuple(out[7, 7]) == (100, 100, 100)
    assert (img == 100).all()  # input untouched
    assert (draw_masks(img, np.zeros((0, 10, 12), bool)) == img).all()
    with pytest.raises(ValueError, match="masks must be"):
        draw_masks(img, np.zeros((1, 5, 5), bool))
    with pytest.raises(ValueError, match="uint8"):
        draw_masks(img.astype(np.float32), masks)


def test_side_by_side_and_save_png(tmp_path):
    a = np.zeros((4, 3, 3), np.uint8)
    b = np.full((2, 5, 3), 9, np.uint8)
    panel = side_by_side([a, b], gap=2)
    assert panel.shape == (4, 10, 3)
    assert (
        (panel[:2, 5:] == 9).all() and (panel[2:, 5:] == 255).all() and (panel[:, 3:5] == 255).all()
    )
    path = tmp_path / "p.png"
    save_png(path, panel)
    assert (np.asarray(Image.open(path)) == panel).all()
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]
    with pytest.raises(ValueError):
        save_png(tmp_path / "bad.png", panel.astype(np.int16))


def test_viz_and_cache_format_import_nothing_else_from_the_package():
    code = (
        "import sys, maskteacher.viz, maskteacher.cache_format, maskteacher.cache_format.verify, "
        "maskteacher.cache_format.merge\n"
        "mods = sorted(m for m in sys.modules if m.startswith('maskteacher.'))\n"
        "bad = [m for m in mods if not m.startswith(('maskteacher.viz', 'maskteacher.cache_format'))]\n"
        "assert not bad, bad\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert not any(m.startswith('maskteacher.cache_format') for m in mods if 'viz' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
