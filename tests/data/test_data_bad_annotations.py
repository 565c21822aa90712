"""Issue 11 item 2: corrupt annotations are refused before pycocotools decodes them: RLE run
lengths that do not add up to h*w, garbage counts strings, polygons with NaN / inf / huge
coordinates. One line naming the file and the annotation id; ``skip_bad`` counts them, and
``data stats`` reports them as bad annotations."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from data_helpers import rle_of, square_mask, textured_image, write_coco, write_sa1b
from PIL import Image

from maskteacher.data import dataset_stats, open_dataset
from maskteacher.errors import UserError

H, W = 10, 14
GOOD = rle_of(square_mask(H, W))


def _jpeg(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(textured_image(H, W, seed)).save(buf, format="JPEG")
    return buf.getvalue()


# name -> (segmentation, substring of the reason)
BAD_RLES = {
    "short-string": ({"size": [H, W], "counts": "0b1"}, "add up to"),
    "long-string": (
        {"size": [H, W], "counts": rle_of(square_mask(H + 9, W))["counts"]},
        "add up to",
    ),
    "run-too-long": (
        {"size": [H, W], "counts": rle_of(np.ones((H + 9, W), bool))["counts"]},
        "more than its size",
    ),
    "garbage-string": ({"size": [H, W], "counts": "!!not an rle!!"}, "invalid character"),
    "truncated-string": ({"size": [H, W], "counts": GOOD["counts"] + "P"}, "truncated"),
    "non-ascii": ({"size": [H, W], "counts": "0\u00e91"}, "non-ASCII"),
    "negative-run": ({"size": [H, W], "counts": [H * W + 5, -5]}, "negative"),
    "list-short": ({"size": [H, W], "counts": [3, 4]}, "add up to"),
    "list-floats": ({"size": [H, W], "counts": [1.5, H * W - 1.5]}, "not integers"),
    "counts-dict": ({"size": [H, W], "counts": {"a": 1}}, "neither a string"),
}


def _sa1b(tmp_path: Path, bad: dict) -> Path:
    root = write_sa1b(tmp_path / "sa1b", "sa_1", _jpeg(), [GOOD])
    write_sa1b(root, "sa_2", _jpeg(1), [GOOD, bad, GOOD])
    return root


@pytest.mark.parametrize("name", sorted(BAD_RLES))
def test_sa1b_corrupt_rle_is_one_line_naming_file_and_annotation(name, tmp_path):
    bad, reason = BAD_RLES[name]
    root = _sa1b(tmp_path, bad)
    with pytest.raises(UserError) as err:
        open_dataset(root)
    message = str(err.value)
    assert str(root / "sa_2.json") in message and "(annotation 1)" in message
    assert reason in message and "\n" not in message


@pytest.mark.parametrize("name", sorted(BAD_RLES))
def test_sa1b_corrupt_rle_skipped_and_counted(name, tmp_path):
    bad, _ = BAD_RLES[name]
    root = _sa1b(tmp_path, bad)
    ds = open_dataset(root, skip_bad=True)
    assert ds.image_ids == ["sa_1"]
    assert len(ds.bad_items) == 1 and ds.bad_item_kinds == ["annotation"]
    stats = dataset_stats(root).to_dict()
    assert stats["bad_annotations"] == 1 and stats["bad"][0]["kind"] == "annotation"


def _coco(tmp_path: Path, segmentation, iscrowd: int = 0) -> tuple[Path, Path]:
    images = [("a.jpg", _jpeg(), (H, W)), ("b.jpg", _jpeg(1), (H, W))]
    anns = [
        {"id": 7, "image_id": 1, "segmentation": GOOD, "iscrowd": 0},
        {"id": 8, "image_id": 2, "segmentation": [[1, 1, 5, 1, 5, 5]], "iscrowd": 0},
        {"id": 9, "image_id": 2, "segmentation": segmentation, "iscrowd": iscrowd},
    ]
    json_path = write_coco(tmp_path / "coco", images, anns)
    return tmp_path / "coco", json_path


BAD_POLYGONS = {
    "nan": ([[1.0, 1.0, float("nan"), 2.0, 3.0, 4.0]], "not a finite number"),
    "inf": ([[1.0, 1.0, float("inf"), 2.0, 3.0, 4.0]], "not a finite number"),
    "huge": ([[1.0, 1.0, 1e12, 2.0, 3.0, 1e12]], "far outside"),
    "huge-int": ([[1, 1, 10**400, 2, 3, 4]], "not a finite number"),
    "negative-far": ([[-1e9, 1.0, 2.0, 2.0, 3.0, 4.0]], "far outside"),
    "string": ([[1.0, 1.0, "2", 2.0, 3.0, 4.0]], "not a finite number"),
}


@pytest.mark.parametrize("name", sorted(BAD_POLYGONS))
def test_coco_bad_polygon_refused_before_rasterising(name, tmp_path):
    polygon, reason = BAD_POLYGONS[name]
    root, json_path = _coco(tmp_path, polygon)
    with pytest.raises(UserError) as err:
        open_dataset(root)
    message = str(err.value)
    assert str(json_path) in message and "annotation 9" in message
    assert reason in message and "\n" not in message
    ds = open_dataset(root, skip_bad=True)
    assert ds.image_ids == ["1"] and ds.bad_item_kinds == ["annotation"]


@pytest.mark.parametrize("name", ["short-string", "garbage-string", "list-short", "negative-run"])
def test_coco_corrupt_rle_refused(name, tmp_path):
    bad, reason = BAD_RLES[name]
    root, json_path = _coco(tmp_path, bad, iscrowd=1)
    assert open_dataset(root).image_ids == ["1", "2"]  # crowd left out: not checked
    with pytest.raises(UserError) as err:
        open_dataset(root, include_crowd=True)
    assert str(json_path) in str(err.value) and "annotation 9" in str(err.value)
    assert reason in str(err.value)


def test_polygons_slightly_outside_the_image_are_fine(tmp_path):
    """COCO has vertices a little outside the image; only far-away ones are refused."""
    root, _ = _coco(tmp_path, [[-3.5, -2.0, W + 4.0, 0.0, W + 4.0, H + 6.0]])
    masks = open_dataset(root)[1].masks
    assert masks.shape == (2, H, W) and masks[1].any()


def test_valid_rles_pass_and_give_their_areas(sample_roots, tmp_path):
    """The validating parser agrees with pycocotools on every real RLE of the samples and on
    random masks (odd and even run counts, masks starting with foreground, empty, full)."""
    from maskteacher.data.segmentation import check_rles

    rng = np.random.default_rng(5)
    masks = [rng.random((H, W)) < p for p in (0.0, 0.02, 0.3, 0.9, 1.0)]
    masks += [square_mask(H, W), ~square_mask(H, W)]
    segs = [rle_of(m) for m in masks]
    segs.append({"size": [H, W], "counts": [0, H * W]})  # uncompressed: all foreground
    areas = check_rles(segs, (H, W), [str(k) for k in range(len(segs))])
    assert areas.tolist() == [int(m.sum()) for m in masks] + [H * W]
    root = shutil.copytree(sample_roots["sa1b"], tmp_path / "s")
    ds = open_dataset(root)
    for i in range(len(ds)):
        doc = json.loads((root / f"{ds.image_ids[i]}.json").read_text())
        segs = [a["segmentation"] for a in doc["annotations"]]
        got = check_rles(segs, ds.image_hw(i), ["x"] * len(segs))
        assert got.tolist() == ds[i].masks.reshape(len(segs), -1).sum(1).tolist()
