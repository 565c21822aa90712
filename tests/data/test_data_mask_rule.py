"""Issue 11 item 1: mask PNGs outside the origin's ``> 127`` convention decode to the object,
not to an empty mask; the inferred rule is warned about once per dataset; ``data stats`` counts
empty-decoding masks and masks read with an inferred rule."""

from __future__ import annotations

import io
import json
import logging
import shutil

import numpy as np
import pytest
from data_helpers import png16, square_mask, textured_image, write_folder
from PIL import Image

from maskteacher.data import dataset_stats, open_dataset

H, W = 12, 16
TRUTH = square_mask(H, W)
INFERRED = "not in the origin's >127 convention"


def _grey(values: np.ndarray) -> Image.Image:
    return Image.fromarray(values.astype(np.uint8), mode="L")


def _palette(mask: np.ndarray) -> Image.Image:
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette([0, 0, 0, 200, 30, 30] + [0, 0, 0] * 254)  # index 1 = dark red (luma 77)
    return im


def _rgb(mask: np.ndarray, colour: tuple[int, int, int]) -> Image.Image:
    rgb = np.zeros((*mask.shape, 3), np.uint8)
    rgb[mask] = colour
    return Image.fromarray(rgb, mode="RGB")


def _sixteen(values: np.ndarray) -> Image.Image:
    return Image.open(io.BytesIO(png16(values.astype(np.uint16))))


# name -> (mask image encoding TRUTH, read with an inferred rule?)
ENCODINGS = {
    "grey-0-255 (origin)": (lambda m: _grey(m * 255), False),
    "grey-0-1": (lambda m: _grey(m * 1), True),
    "grey-0-64": (lambda m: _grey(m * 64), True),
    "bilevel-mode-1": (lambda m: Image.fromarray(m).convert("1"), False),
    "grey-alpha": (lambda m: _grey(m * 1).convert("LA"), True),
    "palette-index-1": (_palette, True),
    "rgb-white": (lambda m: _rgb(m, (255, 255, 255)), False),
    "rgb-red": (lambda m: _rgb(m, (255, 0, 0)), True),
    "rgb-0-1": (lambda m: _rgb(m, (1, 1, 1)), True),
    "rgba-blue": (lambda m: _rgb(m, (0, 0, 255)).convert("RGBA"), True),
    "16bit-0-1": (lambda m: _sixteen(m * 1), True),
    "16bit-0-65535": (lambda m: _sixteen(m * 65535), False),
}


@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_mask_encodings_decode_to_the_object(name, tmp_path):
    encode, _ = ENCODINGS[name]
    root = write_folder(tmp_path / "ds", {"a": (textured_image(H, W), [encode(TRUTH)])})
    masks = open_dataset(root)[0].masks
    np.testing.assert_array_equal(masks[0], TRUTH)


def test_origin_convention_kept_where_it_applies(tmp_path):
    """Soft 0..255 masks and stray low values still threshold at 127, as in the origin."""
    soft = np.zeros((H, W), np.uint8)
    soft[TRUTH] = 200
    soft[0, :] = 100  # a faint band below the threshold: background
    soft[-1, -1] = 1
    root = write_folder(tmp_path / "ds", {"a": (textured_image(H, W), [_grey(soft)])})
    np.testing.assert_array_equal(open_dataset(root)[0].masks[0], TRUTH)


def test_inferred_rule_warned_once_per_dataset(tmp_path, caplog):
    images = {
        stem: (textured_image(H, W, seed=k), [_grey(TRUTH * 1), _palette(TRUTH)])
        for k, stem in enumerate(("a", "b", "c"))
    }
    root = write_folder(tmp_path / "ds", images)
    with caplog.at_level(logging.WARNING, logger="maskteacher.data"):
        ds = open_dataset(root)
        opened = [r.getMessage() for r in caplog.records if INFERRED in r.getMessage()]
        assert len(opened) == 1  # known at open time (the first mask is probed)
        for i in range(len(ds)):
            _ = ds[i].masks
    warnings = [r.getMessage() for r in caplog.records if INFERRED in r.getMessage()]
    assert len(warnings) == 1
    assert "foreground = value > 0" in warnings[0] and str(root / "mask") in warnings[0]


def test_origin_convention_masks_do_not_warn(tmp_path, caplog):
    root = write_folder(tmp_path / "ds", {"a": (textured_image(H, W), [_grey(TRUTH * 255)])})
    with caplog.at_level(logging.WARNING, logger="maskteacher.data"):
        _ = open_dataset(root)[0].masks
    assert not [r for r in caplog.records if INFERRED in r.getMessage()]


def test_stats_count_empty_and_inferred_masks(tmp_path):
    empty = np.zeros((H, W), np.uint8)
    images = {
        "a": (textured_image(H, W), [_grey(TRUTH * 255), _grey(TRUTH * 1), _grey(empty)]),
        "b": (textured_image(H, W, 1), [_palette(TRUTH), _grey(empty)]),
    }
    root = write_folder(tmp_path / "ds", images)
    stats = dataset_stats(root)
    assert stats.empty_masks == 2
    assert stats.inferred_rule_masks == 2
    report = stats.to_dict()
    assert report["empty_masks"] == 2 and report["inferred_rule_masks"] == 2
    assert any("masks that decode empty: 2" in line for line in stats.lines())


@pytest.mark.parametrize("fmt", ["sa1b", "coco"])
def test_stats_count_empty_rle_masks(fmt, sample_roots, tmp_path):
    """RLE formats: empty masks are counted from the run lengths, without decoding."""
    root = shutil.copytree(sample_roots[fmt], tmp_path / fmt)
    before = dataset_stats(root).empty_masks
    empty = {"size": None, "counts": None}
    if fmt == "sa1b":
        path = root / "sa_1.json"
        doc = json.loads(path.read_text())
        h, w = doc["annotations"][0]["segmentation"]["size"]
        empty.update(size=[h, w], counts=[h * w])
        doc["annotations"].append({"id": 99, "segmentation": empty})
    else:
        path = root / "annotations" / "instances.json"
        doc = json.loads(path.read_text())
        entry = doc["images"][0]
        h, w = entry["height"], entry["width"]
        empty.update(size=[h, w], counts=[h * w])
        doc["annotations"].append({"id": 99, "image_id": entry["id"], "segmentation": empty})
    path.write_text(json.dumps(doc))
    assert dataset_stats(root).empty_masks == before + 1
