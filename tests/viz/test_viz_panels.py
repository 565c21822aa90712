"""The image | ground truth | student | teacher rows shared by ``maskteacher eval`` and the
trainer's ``visual`` section, and file names for image ids."""

from __future__ import annotations

import numpy as np
from PIL import Image

from maskteacher.viz import draw_masks
from maskteacher.viz.panels import TITLE_HEIGHT, overlay_panels, safe_file_name, save_overlay

H, W, GAP = 20, 30, 4


def case():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    gt = np.zeros((2, H, W), bool)
    gt[0, 2:8, 2:10] = True
    gt[1, 12:18, 15:28] = True
    student = np.zeros((1, H, W), bool)
    student[0, 3:9, 2:12] = True
    teacher = np.zeros((3, H, W), bool)
    teacher[0, 0:5, 0:5], teacher[1, 10:20, 10:30], teacher[2, 5:15, 20:25] = True, True, True
    return image, gt, student, teacher


def panel(row: np.ndarray, k: int) -> np.ndarray:
    """The k-th panel of a row, below its title."""
    x = k * (W + GAP)
    return row[TITLE_HEIGHT:, x : x + W]


def test_panels_layout_and_content():
    image, gt, student, teacher = case()
    row = overlay_panels(image, gt, student, teacher)
    assert row.shape == (H + TITLE_HEIGHT, 4 * W + 3 * GAP, 3) and row.dtype == np.uint8
    np.testing.assert_array_equal(panel(row, 0), image)
    np.testing.assert_array_equal(panel(row, 1), draw_masks(image, gt))
    np.testing.assert_array_equal(panel(row, 2), draw_masks(image, student, outlines=gt))
    np.testing.assert_array_equal(panel(row, 3), draw_masks(image, teacher, outlines=gt))
    # a title above each panel: dark caption pixels on white
    assert all(
        (row[:TITLE_HEIGHT, k * (W + GAP) : k * (W + GAP) + W] < 128).any() for k in range(4)
    )
    without = overlay_panels(image, gt, student)  # no teacher: no teacher panel
    assert without.shape == (H + TITLE_HEIGHT, 3 * W + 2 * GAP, 3)
    np.testing.assert_array_equal(without, row[:, : 3 * W + 2 * GAP])


def test_captions_replace_titles_only():
    image, gt, student, teacher = case()
    plain = overlay_panels(image, gt, student, teacher)
    counted = overlay_panels(image, gt, student, teacher, captions={"student": "epoch 3"})
    np.testing.assert_array_equal(counted[TITLE_HEIGHT:], plain[TITLE_HEIGHT:])
    changed = np.nonzero((counted[:TITLE_HEIGHT] != plain[:TITLE_HEIGHT]).any(axis=(0, 2)))[0]
    assert changed.size and changed.min() >= 2 * (W + GAP) and changed.max() < 3 * (W + GAP)


def test_save_overlay_writes_the_row(tmp_path):
    image, gt, student, teacher = case()
    path = save_overlay(tmp_path / "a" / "b" / "x.png", image, gt, student, teacher)
    assert path == tmp_path / "a" / "b" / "x.png"
    np.testing.assert_array_equal(
        np.asarray(Image.open(path)), overlay_panels(image, gt, student, teacher)
    )
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no temporary file left


def test_safe_file_name():
    assert safe_file_name("COCO_val2017_000000139.jpg") == "COCO_val2017_000000139.jpg"
    assert safe_file_name("sa_1/img 2:x?.png") == "sa_1_img_2_x_.png"
    assert safe_file_name("../../etc/passwd") == ".._.._etc_passwd"  # no folder separators
