"""The synthetic sample maker: determinism, content, file layouts, safe writing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from maskteacher.data import sample as sample_module
from maskteacher.data.sample import (
    MIN_VISIBLE_AREA,
    SHAPE_KINDS,
    generate_sample,
    make_sample,
    rasterize_polygon,
    uncompressed_rle,
)
from maskteacher.data.sample_styles import PATTERNS, SAMPLE_STYLES, SHAPES
from maskteacher.errors import UserError

# pycocotools <= 2.0.11 trips numpy 2's __array__(copy=...) deprecation on every decode
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_generation_is_deterministic_and_per_image():
    a = generate_sample(3, seed=5)
    b = generate_sample(5, seed=5)
    for x, y in zip(a, b[:3]):
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.masks, y.masks)
    c = generate_sample(3, seed=6)
    assert not all(
        x.image.shape == y.image.shape and np.array_equal(x.image, y.image) for x, y in zip(a, c)
    )


def test_written_files_are_identical_for_the_same_seed(tmp_path):
    for fmt in ("folder", "sa1b", "coco"):
        first = _files(make_sample(tmp_path / f"{fmt}1", format=fmt, images=2, seed=1))
        second = _files(make_sample(tmp_path / f"{fmt}2", format=fmt, images=2, seed=1))
        assert first == second and first


def test_content_is_varied_and_masks_are_exact(sample_truth):
    images = generate_sample(12, seed=0)
    shapes = {s.image.shape[:2] for s in images}
    assert len(shapes) == len(images) and any(h != w for h, w in shapes)
    assert all(96 <= side <= 200 for hw in shapes for side in hw)
    kinds = {obj.kind for s in images for obj in s.objects}
    assert kinds == set(SHAPE_KINDS)
    fractions = []
    for s in images:
        assert 1 <= len(s.objects) <= 9
        masks = s.masks
        assert masks.sum(axis=0).max() <= 1  # visible regions never overlap
        assert (masks.sum(axis=(1, 2)) >= MIN_VISIBLE_AREA).all()
        fractions += list(masks.mean(axis=(1, 2)))
        for obj in s.objects:
            shape = rasterize_polygon(obj.polygon, s.image.shape[:2])
            assert (obj.visible & ~shape).sum() == 0  # visible part lies inside the shape
            assert obj.occluded == bool((shape & ~obj.visible).any())
    assert min(fractions) < 0.01 and max(fractions) > 0.15  # small and large objects
    assert any(obj.occluded for s in images for obj in s.objects)
    # objects are painted: pixel colours differ across a mask boundary on average
    s = images[0]
    inside = s.image[s.masks[-1]].mean(axis=0)
    outside = s.image[~s.masks.any(axis=0)].mean(axis=0)
    assert np.abs(inside - outside).sum() > 10


@pytest.mark.parametrize("first", [False, True])
def test_uncompressed_rle_round_trips_through_pycocotools(first):
    rng = np.random.default_rng(int(first))
    mask = rng.random((7, 9)) > 0.5
    mask[0, 0] = first
    rle = uncompressed_rle(mask)
    assert isinstance(rle["counts"], list) and sum(rle["counts"]) == mask.size
    decoded = mask_utils.decode(mask_utils.frPyObjects(rle, 7, 9))
    np.testing.assert_array_equal(decoded.astype(bool), mask)


def test_sa1b_json_has_the_sa1b_fields(sample_roots):
    doc = json.loads((sample_roots["sa1b"] / "sa_1.json").read_text())
    assert set(doc["image"]) == {"image_id", "width", "height", "file_name"}
    assert doc["image"]["file_name"] == "sa_1.jpg"
    keys = {
        "id",
        "segmentation",
        "area",
        "bbox",
        "predicted_iou",
        "stability_score",
        "point_coords",
        "crop_box",
    }
    for ann in doc["annotations"]:
        assert set(ann) == keys
        assert isinstance(ann["segmentation"]["counts"], str)
        assert ann["segmentation"]["size"] == [doc["image"]["height"], doc["image"]["width"]]
        x, y = ann["point_coords"][0]
        assert mask_utils.decode(ann["segmentation"])[int(y), int(x)] == 1  # point inside


def test_coco_json_exercises_polygons_both_rles_and_crowd(sample_roots):
    doc = json.loads((sample_roots["coco"] / "annotations" / "instances.json").read_text())
    kinds = [
        (
            "poly"
            if isinstance(a["segmentation"], list)
            else type(a["segmentation"]["counts"]).__name__,
            a["iscrowd"],
        )
        for a in doc["annotations"]
    ]
    assert kinds.count(("poly", 0)) > len(kinds) / 3
    assert ("str", 0) in kinds and ("list", 0) in kinds and ("list", 1) in kinds
    assert {c["name"] for c in doc["categories"]} >= set(SHAPE_KINDS)


def test_make_sample_refuses_a_non_empty_folder_and_bad_arguments(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(UserError, match="already exists and is not an empty folder"):
        make_sample(tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(UserError, match="unknown sample format 'voc'"):
        make_sample(tmp_path / "a", format="voc")
    with pytest.raises(UserError, match="images must be >= 1"):
        make_sample(tmp_path / "b", images=0)
    (tmp_path / "empty").mkdir()
    assert make_sample(tmp_path / "empty", images=1) == tmp_path / "empty"
    assert (tmp_path / "empty" / "image").is_dir()


def test_make_sample_leaves_nothing_behind_when_interrupted(tmp_path, monkeypatch):
    calls = []

    def failing_save(image, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(sample_module, "_save_image", failing_save)
    with pytest.raises(KeyboardInterrupt):
        make_sample(tmp_path / "out", format="sa1b", images=3)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- styles, unlabelled


def test_the_shifted_style_draws_its_own_shapes_and_keeps_the_invariants():
    images = generate_sample(16, seed=0, style="shifted")
    kinds = {obj.kind for s in images for obj in s.objects}
    assert kinds == set(SAMPLE_STYLES["shifted"].shapes)
    assert not kinds & set(SHAPE_KINDS)
    for s in images:
        masks = s.masks
        assert masks.sum(axis=0).max() <= 1
        assert (masks.sum(axis=(1, 2)) >= MIN_VISIBLE_AREA).all()
        for obj in s.objects:
            shape = rasterize_polygon(obj.polygon, s.image.shape[:2])
            assert (obj.visible & ~shape).sum() == 0
    # another domain: the same seed gives other pictures than the default style
    default = generate_sample(16, seed=0)
    assert not any(np.array_equal(a.image, b.image) for a, b in zip(images, default))


def test_every_shape_and_fill_builder_is_used_by_a_style():
    used_shapes = {k for style in SAMPLE_STYLES.values() for k in style.shapes}
    used_fills = {k for style in SAMPLE_STYLES.values() for k in style.patterns}
    assert used_shapes == set(SHAPES) and used_fills == set(PATTERNS)


def test_unlabelled_leaves_a_fixed_fraction_out_and_the_pictures_unchanged():
    full = generate_sample(10, seed=4, style="shifted")
    part = generate_sample(10, seed=4, style="shifted", unlabelled=0.5)
    for a, b in zip(full, part):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.masks, b.masks)
        n = len(b.objects)
        assert len(b.objects) - len(b.annotated) == int(np.floor(0.5 * n + 0.5))
        assert all(obj.labelled for obj in a.objects)
    again = generate_sample(10, seed=4, style="shifted", unlabelled=0.5)
    assert [[o.labelled for o in s.objects] for s in again] == [
        [o.labelled for o in s.objects] for s in part
    ]


@pytest.mark.parametrize("fmt", ["folder", "sa1b", "coco"])
def test_written_annotations_hold_only_the_labelled_objects(tmp_path, fmt):
    from maskteacher.data import open_dataset

    truth = generate_sample(4, seed=2, unlabelled=0.4)
    root = make_sample(tmp_path / fmt, format=fmt, images=4, seed=2, unlabelled=0.4)
    ds = open_dataset(root)
    for index, s in enumerate(truth):
        item = ds[index]
        expected = np.stack([o.visible for o in s.annotated]) if s.annotated else item.masks
        assert len(item.masks) == len(s.annotated)
        np.testing.assert_array_equal(np.asarray(item.masks, bool), expected)


def test_bad_style_or_fraction_is_one_clear_error():
    with pytest.raises(UserError, match="unknown sample style 'cubist'; expected one of shapes"):
        generate_sample(1, style="cubist")
    with pytest.raises(UserError, match=r"unlabelled must be a fraction in \[0, 1\), got 1.0"):
        generate_sample(1, unlabelled=1.0)
