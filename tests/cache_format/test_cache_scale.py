"""Issue 16: format 2 (columnar index, small manifest), old caches, the reader API the trainer
uses (fields, raw bytes, decode in the main process, lazy verify), bounded reader memory, the
zarr writer writing each file once."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from fixtures.make_v1_caches import record_digest

from maskteacher.cache_format import (
    CacheError,
    ShardWriter,
    StoreFlags,
    decode_many,
    finalize,
    init_cache,
    open_cache,
)
from maskteacher.cache_format.merge import merge_caches
from maskteacher.cache_format.upgrade import upgrade_cache
from maskteacher.cache_format.verify import verify_cache
from maskteacher.cli import main


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_format1_caches_written_by_the_old_code_still_read(v1_cache, v1_expected, backend):
    root = v1_cache(backend)
    reader = open_cache(root)
    assert reader.manifest.version == 1 and len(reader) == 5
    assert {i: record_digest(reader[i]) for i in reader.image_ids} == v1_expected(backend)
    assert reader.cache_id == v1_expected("cache_id")[backend]  # what its checkpoints recorded
    assert [f.image_id for f in reader.manifest.failures] == ["broken"]
    assert reader.index_of("b1") == 4 and list(reader.positions_of(["b0", "zz"])) == [3, -1]
    assert verify_cache(root, progress=False).ok
    info = json.loads(_cli_out(["cache", "inspect", root, "--json"]))
    assert info["format_version"] == 1 and info["masks_per_image"]["max"] == 9


def _cli_out(argv, capsys=None):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return buf.getvalue()


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_upgrade_converts_in_place_and_keeps_the_records(v1_cache, v1_expected, backend, capsys):
    root = v1_cache(backend)
    old_id = open_cache(root).cache_id
    shard_files = sorted(os.listdir(os.path.join(root, "shards")))
    for sidecar in Path(root, "shards").glob("*.json"):  # a copy of only what format 1 needed
        sidecar.unlink()
    shutil.rmtree(os.path.join(root, "failures"))
    assert main(["cache", "upgrade", root]) == 0
    assert "upgraded" in capsys.readouterr().out
    reader = open_cache(root)
    assert reader.manifest.version == 2 and reader.manifest.upgraded_from == {
        "format_version": 1,
        "cache_id": old_id,
    }
    assert {i: record_digest(reader[i]) for i in reader.image_ids} == v1_expected(backend)
    assert [f.image_id for f in reader.manifest.failures] == ["broken"]
    assert sorted(os.listdir(os.path.join(root, "shards"))) == shard_files  # shards untouched
    assert verify_cache(root, progress=False, jobs=2).ok
    assert main(["cache", "upgrade", root]) == 0
    assert "already format 2" in capsys.readouterr().out
    assert open_cache(root).cache_id == reader.cache_id


def test_upgrade_refuses_a_corrupt_cache_and_merge_asks_for_it(v1_cache, tmp_path, capsys):
    root = v1_cache("zarr")
    assert main(["cache", "merge", str(tmp_path / "m"), root]) == 2
    assert f"format-1 cache; convert it first with 'maskteacher cache upgrade {root}'" in (
        capsys.readouterr().err
    )
    chunk = os.path.join(root, "shards", "w1-00000.zarr", "teacher_logits", "c", "0", "0", "0")
    with open(chunk, "r+b") as f:
        f.write(b"\x00\x00\x00")
    with pytest.raises(CacheError, match="problem.* found before upgrading.*w1-00000"):
        upgrade_cache(root)
    header = json.loads(Path(root, "cache_header.json").read_text())
    assert header["format_version"] == 1


def test_manifest_is_small_and_cache_id_comes_from_checksums(small_cache):
    root, manifest, _ = small_cache
    text = Path(root, "manifest.json").read_text()
    assert '"a0"' not in text and "image_ids" not in text  # per-image data lives in the index
    data = json.loads(text)
    assert data["format_version"] == 2 and set(data["index"]["columns"]) >= {
        "image_id.bytes",
        "teacher_start",
        "lookup.hash",
    }
    assert all(set(s["sidecar"]) == {"path", "bytes", "sha256"} for s in data["shards"])
    reader = open_cache(root)
    assert reader.cache_id == manifest.cache_id() and reader.cache_id.startswith("sha256:")
    finalize(root)  # same content: same index folder, same id
    assert open_cache(root).cache_id == reader.cache_id
    assert os.listdir(os.path.join(root, "index")) == [os.path.basename(manifest.index.path)]


def test_fields_raw_bytes_and_main_process_decode(small_cache):
    """The trainer's fast path: workers fetch the compressed chunks of the fields they need,
    the main process decodes a batch (numpy)."""
    root, _, shards = small_cache
    reader = open_cache(root, split="train")
    want = {r.image_id: r for rs in shards.values() for r in rs}
    positions = reader.positions_of(["b0", "a0", "nope"], split="train")
    assert list(positions) == [3, 0, -1]
    raws = [reader.read_raw(int(p), fields=("teacher_logits", "gt_masks")) for p in positions[:2]]
    assert {f for r in raws for f in r.fields} == {"teacher_logits", "gt_masks"}
    raws = pickle.loads(pickle.dumps(raws))  # what crosses the worker -> main process queue
    recs = decode_many(raws, threads=2)
    for rec in recs:
        full = reader[rec.image_id]
        np.testing.assert_array_equal(rec.teacher_logits, full.teacher_logits)
        np.testing.assert_array_equal(rec.gt_masks, want[rec.image_id].gt_masks)
        assert rec.teacher_iou is None and rec.teacher_boxes is None and rec.embedding is None
        assert rec.num_masks == want[rec.image_id].teacher_logits.shape[0]
    meta = decode_many([reader.read_raw("a0", fields=["teacher_iou"])])[0]
    np.testing.assert_array_equal(meta.teacher_iou, want["a0"].teacher_iou)
    assert meta.teacher_logits is None and meta.gt_masks is None and meta.num_masks == 3
    with pytest.raises(ValueError, match="unknown record fields"):
        reader.read_raw(0, fields=["logits"])


def test_reader_memory_is_bounded(tmp_path, make_header, make_record):
    """At most max_open_shards shard readers and MAX_OPEN_FILES descriptors are kept."""
    from maskteacher.cache_format import storage

    rng = np.random.default_rng(2)
    root = tmp_path / "c"
    init_cache(root, make_header())
    for k in range(6):
        with ShardWriter(root, f"s-{k:05d}", split="train") as w:
            w.add(make_record(rng, f"i{k}", n=2, m=1))
    finalize(root)
    reader = open_cache(root, max_open_shards=2)
    for _ in range(2):
        for i in range(6):
            assert reader[i].image_id == f"i{i}"
            assert len(reader._shards) <= 2
    assert len(reader.source._fds) <= storage.MAX_OPEN_FILES
    assert set(reader.index._cols) <= {
        "split",
        "shard",
        "local",
        "teacher_start",
        "teacher_count",
        "gt_start",
        "gt_count",
        "orig_hw",
        "input_hw",
        "image_id.bytes",
        "image_id.offsets",
        "source.bytes",
        "source.offsets",
        "lookup.hash",
    }  # loaded lazily: lookup.order is not needed for reads by position


def test_zarr_writer_fills_each_file_once(tmp_path, make_header, make_record, monkeypatch):
    """Chunks are encoded as images arrive and each zarr shard file is written once, full but
    the last; plain zarr reads the files as the reader does (a small file size forces many
    files and a partial last one)."""
    from maskteacher.cache_format import layout, zarr_backend

    monkeypatch.setattr(layout, "TARGET_FILE_BYTES", 4 * 16 * 16 * 3)  # 3 chunks of logits
    rng = np.random.default_rng(3)
    root = tmp_path / "c"
    init_cache(root, make_header(store=StoreFlags(embedding=True, tokens=True)))
    recs = [
        make_record(rng, f"i{k}", n=n, m=1, embed_dim=4, token_dim=3)
        for k, n in enumerate([5, 0, 9, 3, 12, 1])
    ]
    writes = []
    real = zarr_backend.ZarrShardWriter._write_file

    def spy(self, spec):
        writes.append((spec.name, self._files[spec.name], len(self._chunks[spec.name])))
        real(self, spec)

    monkeypatch.setattr(zarr_backend.ZarrShardWriter, "_write_file", spy)
    with ShardWriter(root, "s-00000", split="train") as w:
        for r in recs:
            w.add(r)
    finalize(root)
    assert len({(name, k) for name, k, _ in writes}) == len(writes)  # every file once
    logits = [n for name, _k, n in writes if name == "teacher_logits"]
    assert logits == [3, 3, 3, 1] and sum(logits) == 2 + 3 + 1 + 3 + 1
    reader = open_cache(root)
    shard = os.path.join(root, "shards", "s-00000.zarr")
    plain = {
        n: zarr.open_array(os.path.join(shard, n), mode="r")
        for n in ("teacher_logits", "teacher_tokens", "embedding")
    }
    for k, r in enumerate(recs):
        rows, rec = reader.rows(k), reader[k]
        s, n = rows.teacher_start, rows.teacher_count
        np.testing.assert_array_equal(plain["teacher_logits"][s : s + n], rec.teacher_logits)
        np.testing.assert_array_equal(plain["teacher_tokens"][s : s + n], rec.tokens)
        np.testing.assert_array_equal(plain["embedding"][rows.local], rec.embedding)
        assert rec.num_masks == r.teacher_logits.shape[0]
    assert verify_cache(root, progress=False).ok


def test_files_follow_the_umask(tmp_path, make_header, make_record):
    """Issue 11 item 11: cache files were 0600 (mkstemp); they follow the umask now."""
    old = os.umask(0o022)
    try:
        root = tmp_path / "c"
        init_cache(root, make_header())
        with ShardWriter(root, "s-00000", split="train") as w:
            w.add(make_record(np.random.default_rng(0), "a", n=2, m=1))
        finalize(root)
        merge_caches(tmp_path / "m", [root], link=False)
    finally:
        os.umask(old)
    for top in (root, tmp_path / "m"):
        for folder, dirs, names in os.walk(top):
            for name in names:
                mode = os.stat(os.path.join(folder, name)).st_mode & 0o777
                assert mode == 0o644, (os.path.join(folder, name), oct(mode))
            for name in dirs:
                assert os.stat(os.path.join(folder, name)).st_mode & 0o777 == 0o755


def test_a_failed_write_is_one_error_and_leaves_nothing(
    tmp_path, make_header, make_record, monkeypatch
):
    """Issue 11 item 13: disk full (or a read-only folder) while writing a shard."""
    import errno

    from maskteacher.cache_format import zarr_backend

    def full(self, spec):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(self.path, spec.name))

    monkeypatch.setattr(zarr_backend.ZarrShardWriter, "_write_file", full)
    root = tmp_path / "c"
    init_cache(root, make_header())
    message = "cannot write shard 's-00000': No space left on device"
    with pytest.raises(CacheError, match=message), ShardWriter(root, "s-00000", split="train") as w:
        w.add(make_record(np.random.default_rng(0), "a", n=2, m=1))
    assert os.listdir(root / "shards") == []

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ro"))

    monkeypatch.setattr(os, "makedirs", denied)
    with pytest.raises(CacheError, match="cannot write cache folder .*ro.*: Permission denied"):
        init_cache(tmp_path / "ro" / "cache", make_header())
