"""Manifest safety (paths, versions, types), expect checks, dataset fingerprints."""

from __future__ import annotations

import json
import os

import pytest

from maskteacher.cache_format import CacheError, dataset_fingerprint, open_cache
from maskteacher.cache_format.manifest import check_relative_path


def _edit_manifest(root, change):
    path = os.path.join(root, "manifest.json")
    with open(path) as f:
        data = json.load(f)
    change(data)
    with open(path, "w") as f:
        json.dump(data, f)


@pytest.mark.parametrize(
    "bad",
    [
        "../outside.zarr",
        "shards/../../x.zarr",
        "/etc/passwd",
        "shards/./a.zarr",
        "C:/x",
        "shards\\a.zarr",
        "",
    ],
)
def test_bad_relative_paths_refused(bad):
    with pytest.raises(CacheError):
        check_relative_path(bad, "manifest.json")


def test_manifest_path_escapes_are_refused(small_cache, tmp_path):
    root, _, _ = small_cache
    _edit_manifest(root, lambda d: d["shards"][0].update(path="../other/shards/w0-00000.zarr"))
    with pytest.raises(CacheError, match=r"must not contain '\.\.'"):
        open_cache(root)
    _edit_manifest(
        root, lambda d: d["shards"][0].update(path=os.path.join(str(tmp_path), "x.zarr"))
    )
    with pytest.raises(CacheError, match="is absolute"):
        open_cache(root)


def test_symlink_leading_outside_is_refused(small_cache, tmp_path):
    root, _, _ = small_cache
    outside = tmp_path / "elsewhere"
    os.rename(os.path.join(root, "shards", "w1-00000.zarr"), outside)
    os.symlink(outside, os.path.join(root, "shards", "w1-00000.zarr"))
    reader = open_cache(root)
    assert reader["a0"].image_id == "a0"  # other shards still read
    with pytest.raises(CacheError, match="resolves outside the cache root"):
        reader["b0"]


def test_manifest_version_and_format_checked(small_cache):
    root, _, _ = small_cache
    _edit_manifest(root, lambda d: d.update(format_version=2))
    with pytest.raises(CacheError, match="format_version is 2 but this reader reads version 1"):
        open_cache(root)
    _edit_manifest(root, lambda d: d.update(format_version=1, format="pickle"))
    with pytest.raises(CacheError, match="not a maskteacher-cache document"):
        open_cache(root)


def test_manifest_types_checked(small_cache):
    root, _, _ = small_cache
    _edit_manifest(root, lambda d: d["shards"][0].update(images="3"))
    with pytest.raises(CacheError, match=r"shards\[0\]: field 'images' must be int"):
        open_cache(root)
    _edit_manifest(root, lambda d: d["shards"][0].update(images=4))
    with pytest.raises(CacheError, match="'images' is 4 but 3 image ids are listed"):
        open_cache(root)


def test_duplicate_ids_in_manifest_refused(small_cache):
    root, _, _ = small_cache
    _edit_manifest(root, lambda d: d["shards"][1].update(image_ids=["a0", "b1"]))
    with pytest.raises(CacheError, match="image 'a0' \\(train\\) is in shards"):
        open_cache(root)


def test_not_a_cache_and_unfinished_cache(tmp_path, make_header):
    from maskteacher.cache_format import init_cache

    with pytest.raises(CacheError, match="is not a cache"):
        open_cache(tmp_path)
    init_cache(tmp_path / "c", make_header())
    with pytest.raises(CacheError, match="unfinished.*cache merge"):
        open_cache(tmp_path / "c")


def test_expect_mismatches_name_field_and_values(small_cache):
    root, manifest, _ = small_cache
    ok = {
        "format_version": 1,
        "teacher_type": "vit_t",
        "checkpoint_sha256": "ab" * 32,
        "codec": "int8",
        "clip": 12,
        "image_size": 64,
        "points_per_side": 8,
        "params.pred_iou_thresh": 0.88,
        "fingerprints": {"train": "sha256:t"},
        "store.gt": True,
    }
    assert len(open_cache(root, expect=ok)) == 5
    cases = [
        (
            {"teacher_type": "vit_h"},
            "field 'teacher_type' is 'vit_t' in the cache but 'vit_h' was expected",
        ),
        ({"checkpoint_sha256": "00"}, "field 'checkpoint_sha256' is 'abab"),
        ({"codec": "fp16"}, "field 'codec' is 'int8' in the cache but 'fp16'"),
        ({"clip": 8.0}, "field 'clip' is 12.0 in the cache but 8.0"),
        ({"image_size": 1024}, "field 'image_size' is 64 in the cache but 1024"),
        ({"format_version": 2}, "field 'format_version' is 1"),
        ({"points_per_side": 32}, "field 'params.points_per_side' is 8 in the cache but 32"),
        ({"box_nms_thresh": 0.7}, "field 'params.box_nms_thresh' is missing from the cache"),
        (
            {"fingerprints": {"train": "sha256:new"}},
            "fingerprint of split 'train' is 'sha256:t' in the cache but 'sha256:new'",
        ),
        ({"store.embedding": True}, "field 'store.embedding' is False"),
    ]
    for expect, message in cases:
        with pytest.raises(CacheError, match=message.replace("(", r"\(").replace(")", r"\)")):
            open_cache(root, expect=expect)


def test_dataset_fingerprint():
    a = dataset_fingerprint([("x", 10), ("y", 20)])
    assert a.startswith("sha256:") and len(a) == 7 + 64
    assert a == dataset_fingerprint([("y", 20), ("x", 10)])
    assert a != dataset_fingerprint([("x", 10), ("y", 21)])
    assert a != dataset_fingerprint([("x", 10)])
    assert a != dataset_fingerprint([("x", 10), ("z", 20)])
