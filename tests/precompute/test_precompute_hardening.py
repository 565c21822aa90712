"""Issue 11 (precompute parts) and issue 12 item 5: one writer per slice, SIGTERM cleanup,
refused inputs (empty dataset, cache inside the dataset, URL output, infinite values), write
failures as one line, the empty-teacher warning, and the resume check's field list."""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from precompute_helpers import run_cli, subprocess_env, write_config

from maskteacher.cache_format import (
    GENERATION_KEYS,
    OPTIONAL_GENERATION_KEYS,
    init_cache,
    open_cache,
)
from maskteacher.cache_format.verify import verify_cache
from maskteacher.config import load_config
from maskteacher.errors import UserError
from maskteacher.models.everything import GenerationParams
from maskteacher.precompute import PrecomputeJob, make_header
from maskteacher.precompute.run import join_cache, open_splits

SLOW = {"points_per_side": 8, "shard_size": 1, "batch_size": 1, "num_workers": 1}


def _leftovers(cache: Path) -> list[str]:
    """Lock files and temporary files anywhere in a cache folder."""
    return sorted(
        str(p.relative_to(cache))
        for p in cache.rglob("*")
        if p.name.endswith(".lock") or p.name.startswith(".tmp-")
    )


def test_generation_keys_are_what_the_header_records():
    every = GenerationParams(strategy="hierarchical").header_params(hq=True)
    assert set(every) == set(GENERATION_KEYS)
    sam = set(GENERATION_KEYS) - set(OPTIONAL_GENERATION_KEYS)
    assert set(GenerationParams().header_params()) == sam


def test_resume_check_refuses_each_listed_generation_field(tmp_path, sample_root, teacher_ckpt):
    """bf16 included (it changes the logits); points_per_batch (not listed) is accepted, and so
    are hq_token_only for a SAM teacher (it changes only SAM-HQ teachers' output) and the
    hierarchical strategy's parameters for the grid strategy (they apply to hierarchical only)."""
    config = write_config(tmp_path, train=sample_root, checkpoint=teacher_ckpt)
    job = PrecomputeJob.from_config(load_config(config))
    datasets = open_splits(job)
    join_cache(job, make_header(job, datasets, identity="ab" * 32))
    for f in dataclasses.fields(GenerationParams):
        value = getattr(job.generation, f.name)
        if isinstance(value, str):
            other = "hierarchical" if value == "grid" else "grid"
        elif isinstance(value, bool):
            other = not value
        else:
            other = 4 if value is None else value + (1 if isinstance(value, int) else 0.01)
        changed = dataclasses.replace(
            job, generation=dataclasses.replace(job.generation, **{f.name: other})
        )
        header = make_header(changed, datasets, identity="ab" * 32)
        unrecorded = ("points_per_batch", "hq_token_only", "hierarchical_stride",
                      "hierarchical_logit_thresh", "sdpa", "compile")  # fmt: skip
        if f.name in unrecorded:
            join_cache(changed, header)
            continue
        with pytest.raises(
            UserError, match=rf"made with precompute\.{f.name} = .*but this run has"
        ):
            join_cache(changed, header)


def _start(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "maskteacher", "precompute", str(config), "--no-progress", *extra],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_processes_on_one_cache_never_write_an_image_twice(tmp_path, teacher_ckpt):
    """Issue 11 item 9: two precompute runs started a second or two apart left the same image in
    two shards (the second planned shards the first finished meanwhile, as new attempts). The
    second is now refused while the first runs (or finds the work done)."""
    from maskteacher.data import make_sample

    data = make_sample(tmp_path / "train", images=10, seed=3, size_range=(64, 100))
    config = write_config(tmp_path, train=data, checkpoint=teacher_ckpt, precompute=SLOW)
    first = _start(config)
    done = tmp_path / "cache" / "shards" / "train-000000-00.json"
    deadline = time.monotonic() + 120
    while not done.exists() and first.poll() is None:  # the first run is a shard ahead
        assert time.monotonic() < deadline, "the first run made no progress"
        time.sleep(0.01)
    second = _start(config)
    results = [(p.wait(300), p.communicate()[1]) for p in (first, second)]
    assert {code for code, _ in results} <= {0, 2}
    for code, err in results:
        if code == 2:
            errors = [line for line in err.splitlines() if line.startswith("maskteacher: error")]
            assert len(errors) == 1 and "is being written by another process" in errors[0]
    assert run_cli(config) == 0  # whatever the timing, a rerun completes the cache
    reader = open_cache(tmp_path / "cache")
    assert sorted(reader.image_ids) == sorted(set(reader.image_ids)) and len(reader) == 10
    assert verify_cache(tmp_path / "cache", progress=False).ok
    assert _leftovers(tmp_path / "cache") == []


def test_a_running_writer_of_the_slice_refuses_a_second(
    tmp_path, sample_root, teacher_ckpt, capsys
):
    """The same rule, deterministic: while a process holds the slice (as a running precompute
    does), a second run of that slice, or one splitting the work otherwise, writes nothing."""
    from maskteacher.cache_format.locks import writer_lock

    config = write_config(tmp_path, train=sample_root, checkpoint=teacher_ckpt)
    cache = tmp_path / "cache"
    cache.mkdir()
    lock = writer_lock(str(cache), "worker0000-of-0001", "1 worker(s)")
    try:
        assert run_cli(config) == 2
        assert (
            "slice worker0000-of-0001 is being written by another process"
            in capsys.readouterr().err
        )
        assert run_cli(config, "--num-shards", 2, "--shard-index", 1) == 2
        assert "splits the work as 1 worker(s), this run as 2 worker(s)" in capsys.readouterr().err
        assert not any((cache / "shards").iterdir())
    finally:
        lock.release()
    assert run_cli(config) == 0 and len(open_cache(cache)) == 6


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, teacher_ckpt):
    """Issue 11 item 13: SIGTERM left a shard lock and a .tmp- shard behind."""
    from maskteacher.data import make_sample

    data = make_sample(tmp_path / "train", images=12, seed=4, size_range=(64, 100))
    config = write_config(tmp_path, train=data, checkpoint=teacher_ckpt, precompute=SLOW)
    proc = _start(config)
    shards = tmp_path / "cache" / "shards"
    deadline = time.monotonic() + 120
    while not (shards.is_dir() and any(p.name.startswith(".tmp-") for p in shards.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, "no shard was started"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "maskteacher: terminated" in err
    assert _leftovers(tmp_path / "cache") == []
    assert run_cli(config) == 0 and len(open_cache(tmp_path / "cache")) == 12


def test_refused_inputs_write_nothing(tmp_path, sample_root, teacher_ckpt, capsys):
    empty = tmp_path / "empty"
    (empty / "image").mkdir(parents=True)
    (empty / "mask").mkdir()
    for name in "abc":
        (tmp_path / name).mkdir()
    cases = [
        (
            write_config(tmp_path / "a", train=empty, checkpoint=teacher_ckpt),
            "no images found; nothing to precompute",
        ),
        (
            write_config(
                tmp_path / "b",
                train=sample_root,
                checkpoint=teacher_ckpt,
                precompute={"stability_score_offset": float("inf")},
            ),
            "precompute.stability_score_offset: got inf; expected a finite number",
        ),
    ]
    for config, message in cases:
        assert run_cli(config) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
        assert not (config.parent / "cache").exists()
    config = write_config(tmp_path / "c", train=sample_root, checkpoint=teacher_ckpt)
    assert run_cli(config, "--output", "s3://bucket/cache") == 2
    assert "precompute writes a local folder, not a URL" in capsys.readouterr().err
    inside = sample_root / "image" / "cache"
    assert run_cli(config, "--output", str(inside)) == 2
    assert "is inside the train dataset folder" in capsys.readouterr().err
    assert not inside.exists()


def test_write_failures_are_one_line_and_leave_nothing(
    tmp_path, sample_root, teacher_ckpt, capsys, monkeypatch
):
    """Issue 11 item 13: disk full during precompute, a read-only or impossible output folder."""
    from maskteacher.cache_format import zarr_backend

    def full(self, spec):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(self.path, spec.name))

    config = write_config(tmp_path, train=sample_root, checkpoint=teacher_ckpt)
    with monkeypatch.context() as m:
        m.setattr(zarr_backend.ZarrShardWriter, "_write_file", full)
        assert run_cli(config) == 2
    err = capsys.readouterr().err
    assert (
        "cannot write shard 'train-000000-00': No space left on device" in err
        and err.count("\n") == 1
    )
    assert (
        _leftovers(tmp_path / "cache") == [] and not (tmp_path / "cache" / "manifest.json").exists()
    )
    assert not [p for p in (tmp_path / "cache" / "shards").iterdir()]
    (tmp_path / "file").write_text("not a folder")
    assert run_cli(config, "--output", str(tmp_path / "file" / "cache")) == 2
    assert "cannot write cache folder" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        assert run_cli(config, "--output", str(tmp_path / "ro" / "cache")) == 2
        assert "Permission denied" in capsys.readouterr().err


def test_summary_warns_when_the_teacher_keeps_no_mask(tmp_path, sample_root, teacher_ckpt, capsys):
    """Issue 11 item 7 (precompute half): thresholds too strict for the teacher."""
    strict = {"pred_iou_thresh": 0.9999, "stability_score_thresh": 0.9999}
    config = write_config(tmp_path, train=sample_root, checkpoint=teacher_ckpt, precompute=strict)
    assert run_cli(config) == 0
    out = capsys.readouterr().out
    assert "WARNING: the teacher kept no mask on 100% of the images written (6 of 6)" in out
    assert "lower precompute.pred_iou_thresh (now 0.9999)" in out
    assert "precompute.stability_score_thresh (now 0.9999)" in out
    capsys.readouterr()
    (tmp_path / "n").mkdir()
    normal = write_config(tmp_path / "n", train=sample_root, checkpoint=teacher_ckpt)
    assert run_cli(normal) == 0
    assert "WARNING" not in capsys.readouterr().out


def test_reading_unknown_or_missing_url_backends_is_one_line(capsys):
    from maskteacher.cli import main

    assert main(["cache", "inspect", "foo://bucket/cache"]) == 2
    assert "unknown URL scheme" in capsys.readouterr().err
    try:
        import s3fs  # noqa: F401
    except ImportError:
        assert main(["cache", "inspect", "s3://bucket/cache"]) == 2
        err = capsys.readouterr().err
        assert "no fsspec backend for s3:// URLs is installed (Install s3fs" in err
        assert err.count("\n") == 1


def test_resume_into_a_format1_cache_asks_for_an_upgrade(
    tmp_path, sample_root, teacher_ckpt, capsys
):
    config = write_config(tmp_path, train=sample_root, checkpoint=teacher_ckpt)
    job = PrecomputeJob.from_config(load_config(config))
    header = make_header(job, open_splits(job), identity="ab" * 32)
    init_cache(tmp_path / "cache", dataclasses.replace(header, format_version=1))
    assert run_cli(config) == 2
    assert f"'maskteacher cache upgrade {tmp_path / 'cache'}'" in capsys.readouterr().err
