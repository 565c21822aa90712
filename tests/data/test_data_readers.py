"""Readers: what make-sample wrote, datasets written by hand, zero objects, detection, laziness."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from maskteacher.data import (
    DATASET_FORMATS,
    Sample,
    SegmentationDataset,
    detect_format,
    open_dataset,
    sample_image_id,
)
from maskteacher.data import masks as masks_module
from maskteacher.errors import UserError

FORMATS = ("folder", "sa1b", "coco")


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _rle_str(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


# ----------------------------------------------------------------------------- make-sample data


@pytest.mark.parametrize("fmt", FORMATS)
def test_reader_reads_what_make_sample_wrote(fmt, sample_roots, sample_truth):
    ds = open_dataset(sample_roots[fmt])
    assert isinstance(ds, SegmentationDataset)
    assert ds.format == fmt
    assert len(ds) == len(sample_truth)
    assert ds.bad_items == []
    by_id = {sample_image_id(fmt, s.index): s for s in sample_truth}
    assert set(ds.image_ids) == set(by_id)
    for index, image_id in enumerate(ds.image_ids):
        truth = by_id[image_id]
        sample = ds[index]
        assert sample.image_id == image_id
        assert sample.image.dtype == np.uint8
        assert sample.image.shape == truth.image.shape
        assert ds.image_hw(index) == truth.image.shape[:2]
        assert sample.num_masks == ds.mask_count(index) == len(truth.objects)
        np.testing.assert_array_equal(sample.masks, truth.masks)
        diff = np.abs(sample.image.astype(int) - truth.image.astype(int))
        if ds.image_path(index).suffix == ".png":
            assert diff.max() == 0
        else:  # JPEG quality 95: lossy but close
            assert diff.mean() < 3.0


def test_ids_are_sorted_deterministically(sample_roots):
    assert open_dataset(sample_roots["folder"]).image_ids == sorted(
        sample_image_id("folder", i) for i in range(6)
    )
    assert open_dataset(sample_roots["sa1b"]).image_ids == sorted(
        sample_image_id("sa1b", i) for i in range(6)
    )
    assert open_dataset(sample_roots["coco"]).image_ids == [str(i) for i in range(1, 7)]


def test_coco_crowd_skipped_unless_included(sample_roots, sample_truth):
    plain = open_dataset(sample_roots["coco"])
    crowd = open_dataset(sample_roots["coco"], include_crowd=True)
    first = plain.image_ids.index("1")
    assert crowd.mask_count(first) == plain.mask_count(first) + 1
    masks = crowd[first].masks
    np.testing.assert_array_equal(masks[:-1], sample_truth[0].masks)
    np.testing.assert_array_equal(masks[-1], sample_truth[0].masks.any(axis=0))
    for i in range(1, len(plain)):
        assert crowd.mask_count(i) == plain.mask_count(i)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dataset_and_sample_pickle(fmt, sample_roots):
    """DataLoader workers pickle datasets and samples: both must survive it."""
    ds = open_dataset(sample_roots[fmt])
    clone = pickle.loads(pickle.dumps(ds))
    sample = pickle.loads(pickle.dumps(ds[1]))
    np.testing.assert_array_equal(sample.masks, clone[1].masks)
    assert clone.image_ids == ds.image_ids


def test_masks_decoded_only_on_access_and_cached(sample_roots, monkeypatch):
    calls = []
    real = masks_module.decode_mask

    def counting(path, hw):
        calls.append(path)
        return real(path, hw)

    monkeypatch.setattr(masks_module, "decode_mask", counting)
    ds = open_dataset(sample_roots["folder"])
    sample = ds[0]
    assert calls == []
    first = sample.masks
    assert len(calls) == sample.num_masks
    assert sample.masks is first
    assert len(calls) == sample.num_masks


def test_index_out_of_range(sample_roots):
    ds = open_dataset(sample_roots["sa1b"])
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert ds[-1].image_id == ds.image_ids[-1]


def test_sample_from_arrays():
    image = np.zeros((4, 5, 3), np.uint8)
    masks = np.zeros((2, 4, 5), bool)
    masks[1, 1:3, 2:4] = True
    sample = Sample.from_arrays("x", image, masks)
    assert sample.num_masks == 2 and sample.orig_hw == (4, 5)
    np.testing.assert_array_equal(sample.masks, masks)
    with pytest.raises(ValueError, match="does not match"):
        Sample.from_arrays("x", image, np.zeros((1, 3, 5), bool))


# ----------------------------------------------------------------------------- by hand


def test_folder_by_hand_modes_and_mask_order(tmp_path):
    root = tmp_path / "ds"
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 128
    _save_png(rgba, root / "image" / "b.png")
    grey = np.full((6, 7), 90, np.uint8)
    Image.fromarray(grey).save(root / "image" / "a.jpg", quality=100)
    (root / "image" / "notes.txt").write_text("ignored")
    (root / "image" / "._b.png").write_bytes(b"macOS resource fork, ignored")
    masks = {}
    for name, (r0, r1) in {"1.png": (0, 2), "2.png": (2, 4), "10.png": (4, 6)}.items():
        m = np.zeros((10, 12), np.uint8)
        m[r0:r1] = 200  # > 127: foreground
        m[r1:] = 100  # <= 127: background
        _save_png(m, root / "mask" / "b" / name)
        masks[name] = m > 127
    (root / "mask" / "a").mkdir(parents=True)  # no PNGs: zero objects

    ds = open_dataset(root)
    assert ds.format == "folder" and ds.image_ids == ["a", "b"]
    a, b = ds[0], ds[1]
    assert a.image.shape == (6, 7, 3) and np.abs(a.image.astype(int) - 90).max() <= 1
    assert a.masks.shape == (0, 6, 7)
    assert b.image.shape == (10, 12, 3)
    assert (b.image[..., 0] == 200).all() and (b.image[..., 1:] == 0).all()  # alpha dropped
    np.testing.assert_array_equal(
        b.masks, np.stack([masks[n] for n in ("1.png", "2.png", "10.png")])
    )


def test_folder_palette_image_and_missing_mask_dir(tmp_path):
    root = tmp_path / "ds"
    (root / "mask").mkdir(parents=True)
    pal = Image.fromarray(np.arange(20, dtype=np.uint8).reshape(4, 5)).convert("P")
    (root / "image").mkdir()
    pal.save(root / "image" / "p.png")
    sample = open_dataset(root)[0]
    assert sample.image.shape == (4, 5, 3)
    assert sample.masks.shape == (0, 4, 5)


def test_sa1b_by_hand_with_pycocotools_rle(tmp_path):
    h, w = 20, 30
    m0 = np.zeros((h, w), bool)
    m0[2:9, 3:17] = True
    m1 = np.zeros((h, w), bool)
    m1[10:18, 20:29] = True
    m1[15, 5] = True
    annotations = []
    for k, m in enumerate((m0, m1)):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("utf-8")  # as SA-1B stores it
        annotations.append(
            {
                "id": 100 + k,
                "segmentation": rle,
                "area": int(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "predicted_iou": 0.9,
                "stability_score": 0.95,
                "point_coords": [[5.0, 5.0]],
                "crop_box": [0.0, 0.0, float(w), float(h)],
            }
        )
    doc = {
        "image": {"image_id": 7, "width": w, "height": h, "file_name": "sa_7.jpg"},
        "annotations": annotations,
    }
    root = tmp_path / "sa"
    root.mkdir()
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(root / "sa_7.jpg")
    (root / "sa_7.json").write_text(json.dumps(doc))
    (root / "sa_8.jpg").write_bytes((root / "sa_7.jpg").read_bytes())
    (root / "sa_8.json").write_text(json.dumps({"image": doc["image"], "annotations": []}))
    (root / "._sa_7.jpg").write_bytes(b"macOS resource fork, ignored")

    assert detect_format(root) == "sa1b"
    ds = open_dataset(root)
    assert ds.image_ids == ["sa_7", "sa_8"]
    np.testing.assert_array_equal(ds[0].masks, np.stack([m0, m1]))
    assert ds[1].num_masks == 0 and ds[1].masks.shape == (0, h, w)


def _coco_doc(h: int, w: int) -> tuple[dict, list[np.ndarray]]:
    """A COCO JSON with a hand-written polygon, a compressed and an uncompressed RLE and a crowd."""
    poly_mask = np.zeros((h, w), bool)
    poly_mask[1:4, 2:6] = (
        True  # pycocotools: polygon corners (2,1)-(6,4) cover cols 2..5, rows 1..3
    )
    rle_mask = np.zeros((h, w), bool)
    rle_mask[5:8, 0:3] = True
    # uncompressed RLE written by hand: column-major runs starting with background
    unc_mask = np.zeros((h, w), bool)
    unc_mask[0:2, 7] = True  # column 7, rows 0-1
    counts = [7 * h, 2, h * w - 7 * h - 2]
    crowd_mask = np.zeros((h, w), bool)
    crowd_mask[6:8, 6:9] = True
    doc = {
        "images": [
            {"id": 12, "file_name": "x.png", "height": h, "width": w},
            {"id": 3, "file_name": "empty.png", "height": h, "width": w},
        ],
        "annotations": [
            {"id": 1, "image_id": 12, "iscrowd": 0, "segmentation": [[2, 1, 6, 1, 6, 4, 2, 4]]},
            {"id": 2, "image_id": 12, "iscrowd": 0, "segmentation": _rle_str(rle_mask)},
            {
                "id": 3,
                "image_id": 12,
                "iscrowd": 0,
                "segmentation": {"size": [h, w], "counts": counts},
            },
            {"id": 4, "image_id": 12, "iscrowd": 1, "segmentation": _rle_str(crowd_mask)},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    return doc, [poly_mask, rle_mask, unc_mask, crowd_mask]


def test_coco_by_hand_polygon_rle_uncompressed_and_crowd(tmp_path):
    h, w = 9, 10
    doc, (poly_mask, rle_mask, unc_mask, crowd_mask) = _coco_doc(h, w)
    root = tmp_path / "coco"
    _save_png(np.zeros((h, w, 3), np.uint8), root / "images" / "x.png")
    _save_png(np.zeros((h, w, 3), np.uint8), root / "images" / "empty.png")
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_mine.json").write_text(json.dumps(doc))

    assert detect_format(root) == "coco"
    ds = open_dataset(root)
    assert ds.image_ids == ["3", "12"]  # numeric order
    assert ds.root == root / "annotations" / "instances_mine.json"
    assert ds[0].masks.shape == (0, h, w)  # image without annotations
    np.testing.assert_array_equal(ds[1].masks, np.stack([poly_mask, rle_mask, unc_mask]))
    with_crowd = open_dataset(root / "annotations" / "instances_mine.json", include_crowd=True)
    np.testing.assert_array_equal(
        with_crowd[1].masks, np.stack([poly_mask, rle_mask, unc_mask, crowd_mask])
    )


def test_coco_release_layout_and_image_root(tmp_path):
    h, w = 9, 10
    doc, _ = _coco_doc(h, w)
    (tmp_path / "annotations").mkdir()
    json_path = tmp_path / "annotations" / "instances_val2017.json"
    json_path.write_text(json.dumps(doc))
    for name in ("x.png", "empty.png"):
        _save_png(np.zeros((h, w, 3), np.uint8), tmp_path / "val2017" / name)
        _save_png(np.zeros((h, w, 3), np.uint8), tmp_path / "elsewhere" / name)
    ds = open_dataset(json_path)
    assert ds.image_dir == tmp_path / "val2017"
    assert ds.image_path(0) == tmp_path / "val2017" / "empty.png"
    ds = open_dataset(json_path, image_root=tmp_path / "elsewhere")
    assert ds.image_path(1) == tmp_path / "elsewhere" / "x.png"


def test_coco_images_not_found_lists_where_it_looked(tmp_path):
    doc, _ = _coco_doc(9, 10)
    json_path = tmp_path / "ann" / "instances.json"
    json_path.parent.mkdir()
    json_path.write_text(json.dumps(doc))
    with pytest.raises(
        UserError, match=r"cannot find image files such as 'empty.png'; looked in"
    ) as e:
        open_dataset(json_path)
    assert str(tmp_path / "images") in str(e.value)
    with pytest.raises(UserError, match="image_root .* is not a folder"):
        open_dataset(json_path, image_root=tmp_path / "nope")


def test_coco_folder_with_several_instance_jsons(tmp_path):
    (tmp_path / "annotations").mkdir()
    for name in ("instances_a.json", "instances_b.json"):
        (tmp_path / "annotations" / name).write_text("{}")
    with pytest.raises(UserError, match="several instances JSONs"):
        open_dataset(tmp_path, "coco")


# ----------------------------------------------------------------------------- detection / errors


@pytest.mark.parametrize("fmt", FORMATS)
def test_detect_format_on_samples(fmt, sample_roots):
    assert detect_format(sample_roots[fmt]) == fmt


def test_detect_format_json_file_and_failures(tmp_path, sample_roots):
    assert detect_format(sample_roots["coco"] / "annotations" / "instances.json") == "coco"
    with pytest.raises(UserError, match="does not exist"):
        detect_format(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"looked for image/ \(folder\).*instances\*\.json.*sa1b"):
        detect_format(tmp_path / "empty")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(UserError, match="not a .json"):
        detect_format(tmp_path / "a.txt")


def test_open_dataset_errors(tmp_path, sample_roots):
    assert DATASET_FORMATS == ("folder", "sa1b", "coco")
    with pytest.raises(UserError, match="does not exist"):
        open_dataset(tmp_path / "missing")
    with pytest.raises(UserError, match="unknown dataset format 'voc'; expected one of folder"):
        open_dataset(sample_roots["folder"], "voc")
    with pytest.raises(UserError, match="image_root applies to the coco format only"):
        open_dataset(sample_roots["folder"], image_root=tmp_path)
    (tmp_path / "f" / "image").mkdir(parents=True)
    with pytest.raises(UserError, match="no mask/ folder"):
        open_dataset(tmp_path / "f")
    with pytest.raises(UserError, match="no image/ folder"):
        open_dataset(sample_roots["sa1b"], "folder")
