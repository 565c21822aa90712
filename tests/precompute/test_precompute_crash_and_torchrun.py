"""Subprocess tests: SIGKILL at random moments + resume, and torchrun with 2 ranks (gloo, CPU)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from precompute_helpers import (
    assert_same_content,
    cache_content,
    run_cli,
    subprocess_env,
    write_config,
)

from maskteacher.cache_format import open_cache
from maskteacher.cache_format.verify import verify_cache

# More prompts per image than the other tests, so that a run lasts long enough to be killed;
# one image per batch, so that the result does not depend on the shard size.
CRASH_SETTINGS = {"points_per_side": 8, "shard_size": 2, "batch_size": 1}


def _data_and_reference(folder: Path, images: int, teacher_ckpt: Path) -> tuple[Path, Path]:
    from maskteacher.data import make_sample

    data = make_sample(folder / "train", images=images, seed=7, size_range=(64, 100))
    config = write_config(folder, train=data, checkpoint=teacher_ckpt, precompute=CRASH_SETTINGS)
    assert run_cli(config) == 0
    return data, folder / "cache"


def _finished_shards(cache: Path) -> int:
    shards = cache / "shards"
    if not shards.is_dir():
        return 0
    return sum(1 for p in shards.iterdir() if p.suffix == ".zarr" and not p.name.startswith("."))


def _kill_cycles(config: Path, cache: Path, kills: int, rng: random.Random) -> int:
    """Start the job and SIGKILL it at a random moment after it has made some progress (one
    more finished shard, then 0-0.1 s more), until it was killed ``kills`` times or finished
    by itself. Returns the number of kills. Callers give the job enough images that ``kills``
    cycles cannot finish it: the SDPA encoder makes a tiny teacher write ~15 images/s on 2
    cores, so each cycle consumes at most ~2 images beyond the shard it waits for."""
    cmd = [sys.executable, "-m", "maskteacher", "precompute", str(config), "--no-progress"]
    hits = 0
    while hits < kills:
        before = _finished_shards(cache)
        proc = subprocess.Popen(
            cmd,
            env=subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: the DataLoader worker dies too
        )
        deadline = time.monotonic() + 120
        while proc.poll() is None and _finished_shards(cache) <= before:
            assert time.monotonic() < deadline, "precompute made no progress"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.1))
        if proc.poll() is not None:
            break  # finished before the kill
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        hits += 1
    return hits


def _check_resumed(config: Path, cache: Path, uninterrupted: Path, images: int) -> None:
    assert run_cli(config) == 0  # the resume (in process: only the kills need a child)
    report = verify_cache(cache, progress=False)
    assert report.ok, report.problems
    reader = open_cache(cache)
    assert len(reader) == len(set(reader.image_ids)) == images  # every image exactly once
    assert not reader.manifest.failures
    assert_same_content(cache_content(cache), cache_content(uninterrupted))


def test_sigkill_and_resume_gives_the_uninterrupted_cache(tmp_path, teacher_ckpt):
    data, reference = _data_and_reference(tmp_path / "reference", 24, teacher_ckpt)
    config = write_config(
        tmp_path,
        train=data,
        checkpoint=teacher_ckpt,
        precompute={**CRASH_SETTINGS, "num_workers": 1},
    )
    assert _kill_cycles(config, tmp_path / "cache", 3, random.Random(0)) == 3
    _check_resumed(config, tmp_path / "cache", reference, 24)


@pytest.mark.slow
def test_ten_random_sigkills(tmp_path, teacher_ckpt):
    """The issue's target: 10 random SIGKILLs + resumes -> cache verify clean, every image
    exactly once (~2 min on 2 cores: each restart re-imports torch)."""
    data, reference = _data_and_reference(tmp_path / "reference", 60, teacher_ckpt)
    config = write_config(
        tmp_path,
        train=data,
        checkpoint=teacher_ckpt,
        precompute={**CRASH_SETTINGS, "shard_size": 1, "num_workers": 1},
    )
    assert _kill_cycles(config, tmp_path / "cache", 10, random.Random(1)) == 10
    _check_resumed(config, tmp_path / "cache", reference, 60)


def test_torchrun_two_ranks_equal_a_single_process(
    tmp_path, sample_root, val_root, teacher_ckpt, reference_cache
):
    config = write_config(tmp_path, train=sample_root, val=val_root, checkpoint=teacher_ckpt)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "maskteacher",
        "precompute",
        str(config),
        "--no-progress",
    ]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("precompute: 9 images written") == 1  # rank 0 prints the summary
    assert "(2 worker(s))" in done.stdout
    report = verify_cache(tmp_path / "cache", progress=False)
    assert report.ok and report.images == 9, report.problems
    shards = sorted(p.name for p in (tmp_path / "cache" / "shards").glob("*.zarr"))
    assert shards == sorted(p.name for p in (reference_cache / "shards").glob("*.zarr"))
    assert_same_content(cache_content(tmp_path / "cache"), cache_content(reference_cache))
