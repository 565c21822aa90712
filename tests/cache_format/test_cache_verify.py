"""Corruption: flipped bytes, truncated and deleted shards, edited manifest -> verify exits 1
naming shard/image, the reader refuses the broken part with a clear error."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from maskteacher.cache_format import CacheError, open_cache
from maskteacher.cache_format.verify import verify_cache
from maskteacher.cli import main


def _verify_json(root, capsys):
    code = main(["cache", "verify", str(root), "--json"])
    report = json.loads(capsys.readouterr().out)
    return code, report


def _rewrite_json(path, change):
    with open(path) as f:
        data = json.load(f)
    change(data)
    with open(path, "w") as f:
        json.dump(data, f)


def _chunk_file(root, backend):
    """The file holding the teacher logits of shard w0 and the byte range of image a0's chunk."""
    reader = open_cache(root)
    shard, local = reader.locate("a0")
    spec, count, locs = next(p for p in shard.plan(local) if p[0].name == "teacher_logits")
    loc = locs[0]
    return os.path.join(root, loc.file), loc.offset, loc.nbytes


@pytest.mark.parametrize("small_cache", ["zarr", "hdf5"], indirect=True)
def test_clean_cache_verifies(small_cache, capsys):
    root, manifest, _ = small_cache
    code, report = _verify_json(root, capsys)
    assert code == 0 and report["ok"] and report["images_ok"] == 5 and report["problems"] == []
    assert main(["cache", "verify", root, "--quiet"]) == 0
    assert "OK: 5/5 images decoded" in capsys.readouterr().out


@pytest.mark.parametrize("small_cache", ["zarr", "hdf5"], indirect=True)
def test_flipped_byte_is_found_and_refused(small_cache, capsys):
    root, manifest, _ = small_cache
    backend = manifest.header.backend
    path, offset, nbytes = _chunk_file(root, backend)
    with open(path, "r+b") as f:
        f.seek(offset + nbytes // 2)
        byte = f.read(1)
        f.seek(offset + nbytes // 2)
        f.write(bytes([byte[0] ^ 0x40]))
    code, report = _verify_json(root, capsys)
    assert code == 1
    shard = "shards/w0-00000" + (".zarr" if backend == "zarr" else ".h5")
    bad_images = {(p["where"], p["image_id"]) for p in report["problems"]}
    assert (shard, "a0") in bad_images
    assert any("sha256" in p["message"] and p["where"] == shard for p in report["problems"])
    reader = open_cache(root)
    with pytest.raises(
        CacheError,
        match=rf"shard {shard}: image 'a0': teacher_logits chunk 0 is corrupt \(.*checksum",
    ):
        reader["a0"]
    assert reader["b0"].num_masks == 5  # the rest of the cache still reads


@pytest.mark.parametrize("small_cache", ["zarr", "hdf5"], indirect=True)
def test_truncated_shard(small_cache, capsys):
    root, manifest, _ = small_cache
    backend = manifest.header.backend
    path, offset, nbytes = _chunk_file(root, backend)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 40 if backend == "zarr" else offset + nbytes // 2)
    code, report = _verify_json(root, capsys)
    assert code == 1
    messages = " | ".join(p["message"] for p in report["problems"])
    assert "bytes, the manifest says" in messages
    assert (
        any(p["image_id"] == "a0" for p in report["problems"])
        or "cannot read the shard" in messages
    )
    with pytest.raises(CacheError, match="shard shards/w0-00000"):
        open_cache(root)["a0"]


@pytest.mark.parametrize("small_cache", ["zarr", "hdf5"], indirect=True)
def test_deleted_shard(small_cache, capsys):
    root, manifest, _ = small_cache
    suffix = ".zarr" if manifest.header.backend == "zarr" else ".h5"
    target = os.path.join(root, "shards", "w1-00000" + suffix)
    shutil.rmtree(target) if os.path.isdir(target) else os.unlink(target)
    code, report = _verify_json(root, capsys)
    assert code == 1
    assert {p["where"] for p in report["problems"]} == {"shards/w1-00000" + suffix}
    assert any("missing file" in p["message"] for p in report["problems"])
    assert main(["cache", "verify", root, "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "BAD shards/w1-00000" in out and "missing" in out
    reader = open_cache(root)
    assert reader["a1"].num_gt == 1
    with pytest.raises(
        CacheError, match=f"shard shards/w1-00000{suffix}: image 'b0': missing file"
    ):
        reader["b0"]


def test_edited_manifest_version(small_cache, capsys):
    root, _, _ = small_cache
    path = os.path.join(root, "manifest.json")
    _rewrite_json(path, lambda d: d.update(format_version=7))
    code, report = _verify_json(root, capsys)
    assert code == 1
    assert report["problems"][0]["where"] == "manifest.json"
    assert "format_version is 7" in report["problems"][0]["message"]
    assert main(["cache", "inspect", root]) == 2
    assert "format_version is 7" in capsys.readouterr().err


def test_edited_shard_index_is_caught(small_cache, capsys):
    root, _, _ = small_cache
    group = os.path.join(root, "shards", "w0-00000.zarr", "zarr.json")
    _rewrite_json(
        group, lambda d: d["attributes"]["maskteacher_index"]["teacher_count"].__setitem__(0, 999)
    )
    report = verify_cache(root, progress=False)
    assert not report.ok
    assert any("rows run past the array end" in p.message for p in report.problems)
    with pytest.raises(CacheError, match="malformed shard index"):
        open_cache(root)["a0"]


def test_unlisted_file_is_reported(small_cache):
    root, _, _ = small_cache
    with open(os.path.join(root, "shards", "w0-00000.zarr", "extra.bin"), "wb") as f:
        f.write(np.zeros(4, np.uint8).tobytes())
    report = verify_cache(root, progress=False)
    assert [p.message for p in report.problems] == [
        "file shards/w0-00000.zarr/extra.bin is not listed in the manifest"
    ]
