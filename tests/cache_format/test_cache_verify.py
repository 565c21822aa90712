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
    shard, rows = reader.locate("a0")
    spec, count, locs = next(p for p in shard.plan(rows) if p[0].name == "teacher_logits")
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
    assert (
        "format_version is 7 but this reader reads versions 1, 2"
        in report["problems"][0]["message"]
    )
    assert main(["cache", "inspect", root]) == 2
    assert "format_version is 7" in capsys.readouterr().err


def test_edited_shard_table_is_caught_and_never_read_as_truth(small_cache):
    """Issue 11 item 5: a changed digit in a shard's own table (here a0's mask count 3 -> 2) was
    caught by verify only; a run read 2 of a0's 3 masks. Readers now take the rows from the
    crc-checked index; verify reports the edited file and the disagreement."""
    root, _, shards = small_cache
    group = os.path.join(root, "shards", "w0-00000.zarr", "zarr.json")
    _rewrite_json(
        group, lambda d: d["attributes"]["maskteacher_index"]["teacher_count"].__setitem__(0, 2)
    )
    rec = open_cache(root)["a0"]
    assert rec.num_masks == 3
    np.testing.assert_array_equal(rec.teacher_iou, shards["w0-00000"][0].teacher_iou)
    report = verify_cache(root, progress=False)
    messages = [p.message for p in report.problems]
    assert any(m.startswith("file zarr.json has ") for m in messages)  # rewritten: other size
    assert any("cannot read the shard" in m and "sha256" in m for m in messages)


def test_edited_index_column_is_refused_on_read(small_cache):
    root, manifest, _ = small_cache
    path = os.path.join(root, manifest.index.path, "teacher_count.npy")
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))  # the last image's mask count, one bit
    reader = open_cache(root)
    with pytest.raises(CacheError, match="teacher_count.npy: index column fails its crc32c check"):
        reader[0]
    report = verify_cache(root, progress=False)
    assert [p.where for p in report.problems] == [manifest.index.path]


def test_duplicate_listing_is_reported(tmp_path, write_cache_with_duplicates, v1_cache, capsys):
    """Issue 11 item 9: verify reports an image the manifest lists twice (inspect and train
    refuse such a cache)."""
    root = write_cache_with_duplicates(tmp_path / "dup")
    code, report = _verify_json(root, capsys)
    assert code == 1
    dup = [p for p in report["problems"] if p["image_id"] == "a0"]
    assert (
        dup[0]["where"] == "manifest.json"
        and "listed 2 times in split 'train'" in dup[0]["message"]
    )
    assert "maskteacher cache repair" in dup[0]["message"]
    old = v1_cache("zarr")
    _rewrite_json(
        os.path.join(old, "manifest.json"),
        lambda d: d["shards"][1]["image_ids"].__setitem__(0, "a0"),
    )
    report = verify_cache(old, progress=False)
    assert any(p.image_id == "a0" and "listed 2 times" in p.message for p in report.problems)


@pytest.mark.parametrize("small_cache", ["zarr", "hdf5"], indirect=True)
def test_parallel_and_checksum_only_verify(small_cache):
    root, manifest, _ = small_cache
    path, offset, nbytes = _chunk_file(root, manifest.header.backend)
    with open(path, "r+b") as f:
        f.seek(offset + 2)
        f.write(b"\xff\xff")
    serial = verify_cache(root, progress=False, jobs=1)
    parallel = verify_cache(root, progress=False, jobs=2)
    assert serial.to_json() == parallel.to_json() and not serial.ok
    assert serial.images_ok == 4
    quick = verify_cache(root, progress=False, jobs=2, checksums_only=True)
    assert quick.to_json()["images_ok"] is None and not quick.decoded
    assert [p.image_id for p in quick.problems] == [None]
    assert "sha256" in quick.problems[0].message


def test_lazy_shard_verification(small_cache):
    """verify_shards=True checks a shard's files when a process first reads from it."""
    root, _, _ = small_cache
    meta = os.path.join(root, "shards", "w1-00000.zarr", "teacher_meta", "zarr.json")
    with open(meta, "a") as f:
        f.write(" ")  # not used by the hot path: only a sha256 check sees it
    assert open_cache(root)["b0"].num_masks == 5
    reader = open_cache(root, verify_shards=True)
    assert reader["a0"].num_masks == 3  # shard w0 is intact
    with pytest.raises(
        CacheError,
        match=r"w1-00000.zarr failed verification: file teacher_meta/zarr.json has \d+ bytes",
    ):
        reader["b1"]
    with pytest.raises(CacheError, match="failed verification"):
        reader.read_raw("b0", fields=["gt_masks"])


def test_unlisted_file_is_reported(small_cache):
    root, _, _ = small_cache
    with open(os.path.join(root, "shards", "w0-00000.zarr", "extra.bin"), "wb") as f:
        f.write(np.zeros(4, np.uint8).tobytes())
    report = verify_cache(root, progress=False)
    assert [p.message for p in report.problems] == [
        "file shards/w0-00000.zarr/extra.bin is not listed in the manifest"
    ]


def _records(root):
    reader = open_cache(root)
    out = [reader[i] for i in range(len(reader))]
    reader.close()
    return out


def _same_records(a, b) -> bool:
    fields = ("orig_hw", "input_hw", "teacher_logits", "teacher_iou", "teacher_boxes", "gt_masks")
    return len(a) == len(b) and all(
        x.image_id == y.image_id
        and all(np.array_equal(getattr(x, f), getattr(y, f)) for f in fields)
        for x, y in zip(a, b)
    )


def test_hdf5_metadata_corruption_never_reads_as_wrong_data(
    tmp_path, write_cache, make_header, make_record
):
    """Issue 11 item 5: in HDF5 shards, corrupted metadata (object headers, the per-image table)
    was read without error. Every mutation outside the chunk data now either raises CacheError
    or reads exactly the original records (metadata checksums of the HDF5 1.10 format, the
    fletcher32-checked table, rows taken from the crc-checked index)."""
    import random

    rng = np.random.default_rng(4)
    recs = [make_record(rng, f"h{i}", n=n, m=2) for i, n in enumerate([3, 0, 6])]
    write_cache(tmp_path / "c", make_header("hdf5"), {"s-00000": recs})
    root = tmp_path / "c"
    want = _records(root)
    path = root / "shards" / "s-00000.h5"
    original = path.read_bytes()
    reader = open_cache(root)
    chunks = set()
    for i in range(len(reader)):
        shard, rows = reader.locate(i)
        for _spec, _n, locs in shard.plan(rows):
            chunks.update(b for loc in locs for b in range(loc.offset, loc.offset + loc.nbytes))
    reader.close()
    table = original.find(b'{"format_version"')
    digits = [o for o in range(table, original.find(b"}}", table)) if chr(original[o]).isdigit()]
    pick = random.Random(0)
    others = pick.sample([o for o in range(len(original)) if o not in chunks], 60)
    for offset in others + digits[::3]:
        data = bytearray(original)
        data[offset] = (
            ord(str((int(chr(data[offset])) + 1) % 10))
            if offset in digits
            else data[offset] ^ pick.randint(1, 255)
        )
        path.write_bytes(bytes(data))
        try:
            got = _records(root)
        except CacheError:
            continue
        assert _same_records(got, want), f"byte {offset} changed the records silently"
    path.write_bytes(original)


def test_format1_zarr_table_edit_is_refused_on_read(v1_cache):
    """A format-1 cache has no index: its shard tables are checked against the sha256 the
    manifest lists before they are used."""
    root = v1_cache("zarr")
    group = os.path.join(root, "shards", "w0-00000.zarr", "zarr.json")
    _rewrite_json(
        group, lambda d: d["attributes"]["maskteacher_index"]["teacher_count"].__setitem__(0, 2)
    )
    with pytest.raises(CacheError, match="w0-00000.zarr/zarr.json: fails its sha256 check"):
        open_cache(root)
