"""Issue 11 item 3: pixel formats and EXIF orientation.

16-bit PNGs are scaled to 8 bits, not clipped. Annotations refer to the stored pixel grid (the
COCO convention; the tag is never applied), the same in every place that decodes an image; a
dataset with orientation-tagged images warns once, ``data stats`` counts them, and annotations
sized for the rotated view get a message saying so."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from data_helpers import (
    jpeg_with_orientation,
    png16,
    rle_of,
    square_mask,
    textured_image,
    write_coco,
    write_folder,
    write_sa1b,
)
from PIL import Image

import maskteacher
from maskteacher.cli.cache import _load_image
from maskteacher.data import dataset_stats, open_dataset
from maskteacher.errors import UserError

RAMP = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040).astype(np.uint16)  # 0..65520


def _folder_with_image_file(tmp_path: Path, data: bytes, suffix: str) -> Path:
    root = write_folder(tmp_path / "ds", {"a": (textured_image(8, 8), [])})
    (root / "image" / "a.png").unlink()
    (root / "image" / f"a{suffix}").write_bytes(data)
    return root


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    root = _folder_with_image_file(tmp_path, png16(RAMP), ".png")
    image = open_dataset(root)[0].image
    expected = (RAMP >> 8).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], expected)
    assert len(np.unique(image[..., 0])) == 64  # a clip would leave 2 values (0 and 255)


def test_16bit_rgb_png_is_scaled_like_grey(tmp_path):
    rgb = np.stack([RAMP, RAMP[::-1], RAMP.T], axis=-1)
    root = _folder_with_image_file(tmp_path, png16(rgb), ".png")
    np.testing.assert_array_equal(open_dataset(root)[0].image, (rgb >> 8).astype(np.uint8))


def test_cache_view_decodes_images_like_the_readers(tmp_path):
    """``cache view`` draws on the same pixels training saw: 16-bit scaled, stored grid."""

    class Rec:
        image_id = "a"
        orig_hw = (8, 8)

    path = tmp_path / "ramp.png"
    path.write_bytes(png16(RAMP))
    np.testing.assert_array_equal(_load_image(str(path), Rec())[..., 0], RAMP >> 8)
    tagged = tmp_path / "tagged.jpg"
    tagged.write_bytes(jpeg_with_orientation(textured_image(8, 8), 6))
    stored = np.asarray(Image.open(tagged).convert("RGB"))  # the stored grid, tag not applied
    np.testing.assert_array_equal(_load_image(str(tagged), Rec()), stored)


def test_every_image_decode_goes_through_the_readers():
    """One decoding rule everywhere: no module but the data readers opens image files."""
    package = Path(maskteacher.__file__).parent
    allowed = {"data/images.py", "data/masks.py"}
    offenders = []
    for path in package.rglob("*.py"):
        rel = path.relative_to(package).as_posix()
        text = path.read_text()
        if re.search(r"Image\.open\(|imread\(", text) and rel not in allowed:
            offenders.append(rel)
    assert offenders == []


def _tagged_sa1b(tmp_path: Path, orientation: int) -> tuple[Path, np.ndarray]:
    image = textured_image(12, 12)
    data = jpeg_with_orientation(image, orientation)
    root = write_sa1b(tmp_path / "sa1b", "sa_1", data, [rle_of(square_mask(12, 12))])
    write_sa1b(root, "sa_2", jpeg_with_orientation(image, 1), [rle_of(square_mask(12, 12))])
    return root, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_ignored_counted_and_warned_once(orientation, tmp_path, caplog):
    root, stored = _tagged_sa1b(tmp_path, orientation)
    with caplog.at_level(logging.WARNING, logger="maskteacher.data"):
        ds = open_dataset(root)
    warnings = [r.getMessage() for r in caplog.records if "EXIF orientation" in r.getMessage()]
    assert len(warnings) == 1
    assert str(root / "sa_1.jpg") in warnings[0] and f"orientation {orientation}" in warnings[0]
    assert "1 of 2 images" in warnings[0]
    index = ds.image_ids.index("sa_1")
    np.testing.assert_array_equal(ds[index].image, stored)  # stored grid, not rotated
    assert ds.orientation(index) == orientation
    stats = dataset_stats(root)
    assert stats.exif_oriented_images == 1 and stats.to_dict()["exif_oriented_images"] == 1


def test_untagged_dataset_does_not_warn(tmp_path, caplog):
    root, _ = _tagged_sa1b(tmp_path, 1)
    with caplog.at_level(logging.WARNING, logger="maskteacher.data"):
        open_dataset(root)
    assert not [r for r in caplog.records if "EXIF" in r.getMessage()]
    assert dataset_stats(root).exif_oriented_images == 0


def _rotated_annotations(tmp_path: Path, fmt: str) -> tuple[Path, Path]:
    """A 10x16 (HxW) JPEG tagged orientation 6 whose annotations are 16x10: made on the rotated
    view. Returns (dataset root, the file the message must name)."""
    data = jpeg_with_orientation(textured_image(10, 16), 6)
    rotated = rle_of(square_mask(16, 10))
    if fmt == "sa1b":
        root = write_sa1b(tmp_path / "s", "sa_1", data, [rotated])
        return root, root / "sa_1.json"
    if fmt == "coco":
        ann = {"id": 4, "image_id": 1, "segmentation": rotated, "iscrowd": 0}
        json_path = write_coco(tmp_path / "c", [("a.jpg", data, (16, 10))], [ann])
        return tmp_path / "c", json_path.parent.parent / "images" / "a.jpg"
    mask = Image.fromarray(square_mask(16, 10).astype(np.uint8) * 255)
    root = write_folder(tmp_path / "f", {"a": (data, [mask])})
    return root, root / "mask" / "a" / "0.png"


@pytest.mark.parametrize("fmt", ["sa1b", "coco", "folder"])
def test_annotations_of_the_rotated_view_are_explained(fmt, tmp_path):
    root, path = _rotated_annotations(tmp_path, fmt)
    with pytest.raises(UserError) as err:
        open_dataset(root)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    assert "EXIF orientation 6" in message and "exiftran -ai" in message
