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
    _edit_manifest(root, lambda d: d.update(format_version=3))
    with pytest.raises(CacheError, match="format_version is 3 but this reader reads versions 1, 2"):
        open_cache(root)
    _edit_manifest(root, lambda d: d.update(format_version=1))
    with pytest.raises(CacheError, match="shard entries do not match format_version 1"):
        open_cache(root)
    _edit_manifest(root, lambda d: d.update(format_version=2, format="pickle"))
    with pytest.raises(CacheError, match="not a maskteacher-cache document"):
        open_cache(root)


def test_manifest_types_checked(small_cache):
    root, _, _ = small_cache
    _edit_manifest(root, lambda d: d["shards"][0].update(images="3"))
    with pytest.raises(CacheError, match=r"shards\[0\]: field 'images' must be int"):
        open_cache(root)
    _edit_manifest(root, lambda d: d["shards"][0].update(images=4))
    with pytest.raises(CacheError, match="the index holds 5 images, the shards 6"):
        open_cache(root)
    _edit_manifest(root, lambda d: d["shards"][0].update(images=3, sidecar=[]))
    with pytest.raises(CacheError, match=r"shards\[0\]: sidecar: expected a JSON object"):
        open_cache(root)


def test_duplicate_ids_in_manifest_refused(tmp_path, write_cache_with_duplicates):
    root = write_cache_with_duplicates(tmp_path / "dup")
    with pytest.raises(
        CacheError, match="image 'a0' \\(train\\) is in shards .*w0-00000.* and .*w1-00000"
    ):
        open_cache(root)


def test_format1_duplicates_refused(v1_cache):
    root = v1_cache("zarr")
    _edit_manifest(root, lambda d: d["shards"][1].update(image_ids=["a0", "b1"]))
    with pytest.raises(CacheError, match="its image ids differ from the manifest's list"):
        open_cache(root)


def test_deeply_nested_or_huge_json_is_one_error(small_cache, monkeypatch):
    """Issue 11 item 12: a nested manifest was a RecursionError; the size is bounded too."""
    root, _, _ = small_cache
    path = os.path.join(root, "manifest.json")
    with open(path, "w") as f:
        f.write("[" * 200_000 + "]" * 200_000)
    with pytest.raises(CacheError, match="nested too deeply"):
        open_cache(root)
    with open(path, "w") as f:
        json.dump({"format": "maskteacher-cache", "x": [[[[[[[[[[1]]]]]]]]]]}, f)
    with pytest.raises(CacheError, match="format_version"):
        open_cache(root)
    import maskteacher.cache_format.jsonio as jsonio

    monkeypatch.setattr(jsonio, "MAX_JSON_BYTES", 20)
    with pytest.raises(CacheError, match="bytes of JSON, more than the 20 accepted"):
        open_cache(root)


def test_free_form_header_fields_are_depth_bounded(tmp_path, make_header):
    from maskteacher.cache_format import init_cache

    deep: dict = {}
    node = deep
    for _ in range(12):
        node["x"] = {}
        node = node["x"]
    init_cache(tmp_path / "c", make_header(params={"points_per_side": 8, "deep": deep}))
    with pytest.raises(CacheError, match="'params' is nested more than 8 deep"):
        init_cache(tmp_path / "c", make_header())


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
        "format_version": 2,
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
        ({"format_version": 1}, "field 'format_version' is 2"),
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
