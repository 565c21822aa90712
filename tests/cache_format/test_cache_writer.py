"""Writer protocol: header checks, exclusive shards, crash recovery, concurrent workers, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from maskteacher.cache_format import (
    CacheError,
    ShardWriter,
    completed_ids,
    finalize,
    init_cache,
    new_shard_name,
    open_cache,
    record_failure,
)
from maskteacher.cache_format.verify import verify_cache


def test_init_adds_a_new_split(tmp_path, make_header):
    root = tmp_path / "c"
    init_cache(root, make_header())
    init_cache(
        root, make_header(fingerprints={"val": "sha256:v"}, dataset_roots={"val": "/data/val"})
    )
    hdr = json.loads((root / "cache_header.json").read_text())
    assert hdr["fingerprints"] == {"train": "sha256:t", "val": "sha256:v"}
    assert hdr["dataset_roots"] == {"val": "/data/val"}


def test_writer_needs_init_and_checks_records(tmp_path, make_header, make_record):
    rng = np.random.default_rng(0)
    with pytest.raises(CacheError, match="cache header not found"):
        ShardWriter(tmp_path / "none", "w-00000", split="train")
    root = tmp_path / "c"
    init_cache(root, make_header())
    with pytest.raises(CacheError, match="bad shard name"):
        ShardWriter(root, "../evil", split="train")
    with pytest.raises(CacheError, match="split"):
        ShardWriter(root, "w-00000", split="test")
    bad = [
        (dict(split="val"), "split 'val' given to a writer of split 'train'"),
        (
            dict(teacher_logits=np.zeros((2, 8, 8), np.float32)),
            r"teacher_logits has shape \(2, 8, 8\), expected \(2, 16, 16\)",
        ),
        (
            dict(teacher_iou=np.zeros(3, np.float32)),
            r"teacher_iou has shape \(3,\), expected \(2,\)",
        ),
        (dict(gt_masks=np.zeros((1, 16, 16), np.uint8)), "gt_masks must be bool"),
        (dict(orig_hw=np.array([0, 5])), "orig_hw must be two positive ints"),
        (dict(input_hw=np.array([65, 5])), "exceeds image_size 64"),
        (dict(embedding=np.zeros((4, 4, 4), np.float32)), "does not store them"),
        (dict(teacher_points=np.full((2, 2), np.nan, np.float32)), "NaN"),
    ]
    with ShardWriter(root, "w-00000", split="train") as w:
        for change, message in bad:
            rec = make_record(rng, "x", n=2, m=1)
            for k, v in change.items():
                setattr(rec, k, v)
            with pytest.raises(CacheError, match=message):
                w.add(rec)
        w.add(make_record(rng, "ok", n=2, m=1))
        with pytest.raises(CacheError, match="already added"):
            w.add(make_record(rng, "ok", n=1, m=0))
    assert completed_ids(root) == {"train": {"ok"}}


def test_second_writer_for_the_same_shard_is_refused(tmp_path, make_header, make_record):
    root = tmp_path / "c"
    init_cache(root, make_header())
    rng = np.random.default_rng(0)
    w = ShardWriter(root, "w-00000", split="train")
    with pytest.raises(CacheError, match=r"being written by another process \(.*pid"):
        ShardWriter(root, "w-00000", split="train")
    w.add(make_record(rng, "a", n=1, m=0))
    w.close()
    with pytest.raises(CacheError, match="already finished"):
        ShardWriter(root, "w-00000", split="train")


def test_stale_lock_is_taken_over(tmp_path, make_header, make_record):
    root = tmp_path / "c"
    init_cache(root, make_header())
    # a lock file nobody holds (its writer died) and the dead writer's half shard
    (root / "shards" / "w-00000.lock").write_text('{"pid": 999999, "host": "gone"}')
    (root / "shards" / ".tmp-w-00000.zarr").mkdir()
    (root / "shards" / ".tmp-w-00000.zarr" / "junk").write_text("x")
    with ShardWriter(root, "w-00000", split="train") as w:
        w.add(make_record(np.random.default_rng(0), "a", n=1, m=1))
    assert not (root / "shards" / "w-00000.lock").exists()
    assert not (root / "shards" / ".tmp-w-00000.zarr").exists()
    finalize(root)
    assert verify_cache(root, progress=False).ok


def test_exception_discards_the_shard(tmp_path, make_header, make_record):
    root = tmp_path / "c"
    init_cache(root, make_header())
    with pytest.raises(RuntimeError), ShardWriter(root, "w-00000", split="train") as w:
        w.add(make_record(np.random.default_rng(0), "a", n=1, m=1))
        raise RuntimeError("teacher crashed")
    assert sorted(os.listdir(root / "shards")) == []
    with ShardWriter(root, "w-00001", split="train"):
        pass  # nothing added: no shard left behind
    assert sorted(os.listdir(root / "shards")) == []


def test_new_shard_name_continues_a_workers_sequence(tmp_path, make_header, make_record):
    root = tmp_path / "c"
    init_cache(root, make_header())
    assert new_shard_name(root, "rank000") == "rank000-00000"
    with ShardWriter(root, new_shard_name(root, "rank000"), split="train") as w:
        w.add(make_record(np.random.default_rng(0), "a", n=1, m=1))
    (root / "shards" / ".tmp-rank000-00004.zarr").mkdir()
    assert new_shard_name(root, "rank000") == "rank000-00005"
    assert new_shard_name(root, "rank001") == "rank001-00000"


def test_failures_are_gathered_and_dropped_once_done(tmp_path, make_header, make_record):
    root = tmp_path / "c"
    init_cache(root, make_header(fingerprints={"train": "sha256:t", "val": "sha256:v"}))
    record_failure(root, "rank000", "bad1", "train", "cannot decode image\nJPEG error")
    record_failure(root, "rank001", "late", "val", "CUDA out of memory")
    with ShardWriter(root, "rank001-00000", split="val") as w:
        w.add(make_record(np.random.default_rng(0), "late", n=1, m=1, split="val"))
    manifest = finalize(root)
    assert [(f.image_id, f.split, f.reason, f.worker) for f in manifest.failures] == [
        ("bad1", "train", "cannot decode image JPEG error", "rank000")
    ]
    assert json.loads((root / "manifest.json").read_text())["failures"][0]["image_id"] == "bad1"


def test_missing_sidecar_is_rebuilt_from_the_shard(tmp_path, make_header, make_record):
    root = tmp_path / "c"
    init_cache(root, make_header())
    rng = np.random.default_rng(0)
    with ShardWriter(root, "w-00000", split="train") as w:
        for i in range(3):
            w.add(make_record(rng, f"i{i}", n=i, m=1))
    sidecar = root / "shards" / "w-00000.json"
    original = json.loads(sidecar.read_text())
    sidecar.unlink()  # as if killed between the rename and the sidecar write
    assert completed_ids(root) == {"train": {"i0", "i1", "i2"}}
    finalize(root)
    assert json.loads(sidecar.read_text()) == original
    assert verify_cache(root, progress=False).ok


WORKER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    sys.path.insert(0, {conftest_dir!r})
    from conftest import record
    from maskteacher.cache_format import ShardWriter
    root, name, count, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    with ShardWriter(root, name, split="train") as w:
        for i in range(count):
            w.add(record(rng, f"{{name}}-{{i}}", n=int(rng.integers(0, 20)), m=int(rng.integers(0, 4))))
            print("added", i, flush=True)
            time.sleep(pause)
    print("done", flush=True)
    """
)


def _worker(tmp_path, root, name, count, pause):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(conftest_dir=os.path.dirname(__file__)))
    return subprocess.Popen(
        [sys.executable, str(script), str(root), name, str(count), str(pause)],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_sigkill_mid_shard_leaves_finished_shards_valid_and_resumable(tmp_path, make_header):
    root = tmp_path / "c"
    init_cache(root, make_header())
    done = _worker(tmp_path, root, "w-00000", 3, 0.0)
    assert done.wait(60) == 0
    victim = _worker(tmp_path, root, "w-00001", 1000, 0.05)
    for line in victim.stdout:
        if line.startswith("added 3"):
            break
    victim.send_signal(signal.SIGKILL)
    victim.wait(30)
    names = set(os.listdir(root / "shards"))
    assert {"w-00000.zarr", "w-00000.json", ".tmp-w-00001.zarr", "w-00001.lock"} <= names
    assert completed_ids(root) == {"train": {"w-00000-0", "w-00000-1", "w-00000-2"}}
    finalize(root)  # unfinished shard is ignored
    assert verify_cache(root, progress=False).ok
    # resume: the same shard name again, after the killed writer
    again = _worker(tmp_path, root, "w-00001", 2, 0.0)
    assert again.wait(60) == 0
    manifest = finalize(root)
    assert manifest.images == 5
    assert not any(
        n.startswith(".tmp-") or n.endswith(".lock") for n in os.listdir(root / "shards")
    )
    assert verify_cache(root, progress=False).ok


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_two_processes_write_concurrently(tmp_path, make_header, backend):
    root = tmp_path / "c"
    init_cache(root, make_header(backend))
    procs = [_worker(tmp_path, root, f"rank{r}-00000", 6, 0.01) for r in range(2)]
    for p in procs:
        assert p.wait(60) == 0
    manifest = finalize(root)
    assert manifest.images == 12
    assert verify_cache(root, progress=False).ok
    reader = open_cache(root)
    assert sorted(reader.image_ids) == sorted(
        f"rank{r}-00000-{i}" for r in range(2) for i in range(6)
    )
    t = time.perf_counter()
    for i in range(len(reader)):
        reader[i]
    assert time.perf_counter() - t < 30


def test_writer_locks_one_process_per_slice(tmp_path, make_header):
    """One writer per slice of the work; a run splitting the work differently is refused while
    another runs; a lock left by a dead process is taken over."""
    from maskteacher.cache_format.locks import live_writers, writer_lock

    root = tmp_path / "c"
    init_cache(root, make_header())
    lock = writer_lock(str(root), "worker0000-of-0002", "2 worker(s)")
    other = writer_lock(str(root), "worker0001-of-0002", "2 worker(s)")  # the other slice: fine
    assert {w["slice"] for w in live_writers(str(root))} == {
        "worker0000-of-0002",
        "worker0001-of-0002",
    }
    with pytest.raises(
        CacheError, match="slice worker0000-of-0002 is being written by another process"
    ):
        writer_lock(str(root), "worker0000-of-0002", "2 worker(s)")
    with pytest.raises(CacheError, match="splits the work as 2 worker.*this run as 1 worker"):
        writer_lock(str(root), "worker0000-of-0001", "1 worker(s)")
    lock.release()
    other.release()
    assert not [n for n in os.listdir(root) if n.endswith(".lock")]
    (root / ".writer-worker0000-of-0001.lock").write_text('{"pid": 999999}')  # a dead holder
    assert live_writers(str(root)) == []
    writer_lock(str(root), "worker0000-of-0001", "1 worker(s)").release()
