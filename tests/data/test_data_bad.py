"""Bad data: each case raises a UserError naming the file by default, and is skipped and recorded
with ``skip_bad=True`` while the rest of the dataset stays readable."""

from __future__ import annotations

import io
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskteacher.data import open_dataset
from maskteacher.errors import UserError

N_IMAGES = 6  # conftest.SAMPLE_IMAGES


@pytest.fixture
def copy_sample(sample_roots, tmp_path) -> Callable[[str], Path]:
    def copy(fmt: str) -> Path:
        return Path(shutil.copytree(sample_roots[fmt], tmp_path / fmt))

    return copy


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _first_mask(root: Path) -> Path:
    return root / "mask" / "sample_0001" / "0.png"


def _corrupt_image(root: Path, fmt: str) -> Path:
    path = {
        "folder": root / "image" / "sample_0002.png",
        "sa1b": root / "sa_3.jpg",
        "coco": root / "images" / "000000000003.jpg",
    }[fmt]
    path.write_bytes(b"\x00garbage, not an image" * 10)
    return path


def _truncate_mask(root: Path, fmt: str) -> Path:
    path = _first_mask(root)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _wrong_mask_size(root: Path, fmt: str) -> Path:
    path = _first_mask(root)
    h, w = np.asarray(Image.open(path)).shape
    path.write_bytes(_png_bytes(np.zeros((h + 3, w), np.uint8)))
    return path


def _unparsable_json(root: Path, fmt: str) -> Path:
    path = root / "sa_2.json"
    path.write_text('{"image": {"image_id": 2}, "annotations": [')
    return path


def _rle_size_mismatch(root: Path, fmt: str) -> Path:
    path = root / "sa_4.json"
    doc = json.loads(path.read_text())
    doc["annotations"][1]["segmentation"]["size"][0] += 1
    path.write_text(json.dumps(doc))
    return path


def _sa1b_missing_json(root: Path, fmt: str) -> Path:
    (root / "sa_5.json").unlink()
    return root / "sa_5.jpg"


def _sa1b_json_without_image(root: Path, fmt: str) -> Path:
    # an extra annotation file with no image: reported, while all six images stay usable
    path = root / "sa_99.json"
    path.write_text(json.dumps({"annotations": []}))
    return path


def _coco_edit(root: Path, edit: Callable[[dict], None]) -> Path:
    path = root / "annotations" / "instances.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    return path


def _coco_rle_size_mismatch(root: Path, fmt: str) -> Path:
    def edit(doc: dict) -> None:
        ann = next(
            a
            for a in doc["annotations"]
            if isinstance(a["segmentation"], dict) and not a["iscrowd"]
        )
        ann["segmentation"]["size"] = [1, 1]

    return _coco_edit(root, edit)


def _coco_bad_polygon(root: Path, fmt: str) -> Path:
    def edit(doc: dict) -> None:
        ann = next(a for a in doc["annotations"] if isinstance(a["segmentation"], list))
        ann["segmentation"] = [[1.0, 2.0, 3.0, 4.0, 5.0]]

    return _coco_edit(root, edit)


def _coco_wrong_image_size(root: Path, fmt: str) -> Path:
    def edit(doc: dict) -> None:
        doc["images"][4]["width"] += 7

    _coco_edit(root, edit)
    return root / "images" / "000000000005.jpg"


# (format, corrupt(root, fmt) -> the path the message must name, substring of the reason,
#  number of images left with skip_bad)
CASES = {
    "folder-corrupt-image": ("folder", _corrupt_image, "not a readable image", N_IMAGES - 1),
    "sa1b-corrupt-image": ("sa1b", _corrupt_image, "not a readable image", N_IMAGES - 1),
    "coco-corrupt-image": ("coco", _corrupt_image, "not a readable image", N_IMAGES - 1),
    "folder-truncated-mask": ("folder", _truncate_mask, "not a readable mask", N_IMAGES - 1),
    "folder-mask-size": ("folder", _wrong_mask_size, "expected equal", N_IMAGES - 1),
    "sa1b-json-parse": ("sa1b", _unparsable_json, "does not parse", N_IMAGES - 1),
    "sa1b-rle-size": ("sa1b", _rle_size_mismatch, "RLE size is", N_IMAGES - 1),
    "sa1b-missing-json": ("sa1b", _sa1b_missing_json, "no annotation file", N_IMAGES - 1),
    "sa1b-orphan-json": ("sa1b", _sa1b_json_without_image, "without an image", N_IMAGES),
    "coco-rle-size": ("coco", _coco_rle_size_mismatch, "RLE size is 1x1", N_IMAGES - 1),
    "coco-bad-polygon": ("coco", _coco_bad_polygon, "5 coordinates", N_IMAGES - 1),
    "coco-image-size": ("coco", _coco_wrong_image_size, "expected equal", N_IMAGES - 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_item_raises_by_default_naming_the_file(case, copy_sample):
    fmt, corrupt, reason, _ = CASES[case]
    root = copy_sample(fmt)
    path = corrupt(root, fmt)
    with pytest.raises(UserError) as err:
        open_dataset(root, fmt)
    message = str(err.value)
    assert str(path) in message
    assert reason in message
    assert "\n" not in message


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_item_skipped_and_recorded_with_skip_bad(case, copy_sample, caplog):
    fmt, corrupt, reason, left = CASES[case]
    root = copy_sample(fmt)
    path = corrupt(root, fmt)
    with caplog.at_level(logging.WARNING, logger="maskteacher.data"):
        ds = open_dataset(root, fmt, skip_bad=True)
    assert len(ds) == left
    assert len(ds.bad_items) == 1
    item, why = ds.bad_items[0]
    assert str(path) in item and reason in why
    assert any(
        "skipping bad item" in r.getMessage() and str(path) in r.getMessage()
        for r in caplog.records
    )
    for i in range(len(ds)):  # everything left is readable
        sample = ds[i]
        assert sample.masks.shape == (sample.num_masks, *sample.image.shape[:2])


def test_coco_json_that_does_not_parse_is_fatal_even_with_skip_bad(copy_sample):
    root = copy_sample("coco")
    path = root / "annotations" / "instances.json"
    path.write_text('{"images": [}')
    for skip in (False, True):
        with pytest.raises(UserError, match="annotation JSON does not parse") as err:
            open_dataset(root, skip_bad=skip)
        assert str(path) in str(err.value)


def test_coco_json_without_annotations_list(copy_sample):
    root = copy_sample("coco")
    path = _coco_edit(root, lambda doc: doc.pop("annotations"))
    with pytest.raises(UserError, match='no "annotations" list') as err:
        open_dataset(root)
    assert str(path) in str(err.value)


def test_coco_annotation_for_unknown_image(copy_sample):
    root = copy_sample("coco")
    _coco_edit(
        root, lambda doc: doc["annotations"].append({"id": 999, "image_id": 77, "segmentation": []})
    )
    with pytest.raises(UserError, match="refers to image id 77, not in images"):
        open_dataset(root)
    ds = open_dataset(root, skip_bad=True)
    assert len(ds) == N_IMAGES and len(ds.bad_items) == 1


def test_truncated_jpeg_body_fails_on_access_naming_the_file(copy_sample):
    """Damage only decoding can find passes the open-time checks and raises when accessed."""
    root = copy_sample("sa1b")
    path = root / "sa_2.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    ds = open_dataset(root, skip_bad=True)
    assert len(ds) == N_IMAGES and ds.bad_items == []
    index = ds.image_ids.index("sa_2")
    with pytest.raises(UserError, match="cannot decode image") as err:
        ds[index]
    assert str(path) in str(err.value)


def test_mask_changed_after_open_fails_on_access(copy_sample):
    root = copy_sample("folder")
    ds = open_dataset(root)
    index = ds.image_ids.index("sample_0001")
    sample = ds[index]
    _first_mask(root).write_bytes(b"broken")
    with pytest.raises(UserError, match="cannot decode mask") as err:
        _ = sample.masks
    assert str(_first_mask(root)) in str(err.value)


def test_many_bad_items_are_summarised_in_the_log(copy_sample, caplog):
    root = copy_sample("sa1b")
    for k in range(12):
        (root / f"orphan_{k}.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="maskteacher.data"):
        ds = open_dataset(root, skip_bad=True)
    assert len(ds.bad_items) == 12
    messages = [r.getMessage() for r in caplog.records]
    assert sum("skipping bad item" in m for m in messages) == 10
    assert any("skipped 12 bad items" in m for m in messages)


@pytest.mark.parametrize("name", ["sa_2.jpg", "sa_4.jpg"])
def test_damaged_image_bytes_fail_with_one_line_naming_the_file(name, copy_sample):
    """Issue 11 item 13: seeded byte damage to an image (truncation, flipped bytes, overwritten
    runs) either still decodes at the header's size or raises one UserError line naming the file
    -- never another exception -- at open time or on access."""
    root = copy_sample("sa1b")
    path = root / name
    original = path.read_bytes()
    rng = np.random.default_rng(11)
    for trial in range(60):
        data = bytearray(original)
        if trial % 3 == 0:
            data = data[: int(rng.integers(1, len(data)))]
        elif trial % 3 == 1:
            for _ in range(int(rng.integers(1, 8))):
                data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        else:
            start = int(rng.integers(0, len(data)))
            data[start : start + int(rng.integers(1, 64))] = b"\xff" * 16
        path.write_bytes(bytes(data))
        try:
            ds = open_dataset(root, skip_bad=True)
            if name[:-4] in ds.image_ids:
                index = ds.image_ids.index(name[:-4])
                assert ds[index].image.shape[:2] == ds.image_hw(index)
        except UserError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)
