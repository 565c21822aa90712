"""Issue 16 item 5: the command line starts without torch; commands are a plain tuple."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

import maskteacher.cli as cli
from maskteacher.cache_format import CacheHeader, CacheRecord, ShardWriter, finalize, init_cache

HEAVY = ("torch", "torchvision", "segment_anything", "maskteacher.data", "maskteacher.models")

PROBE = textwrap.dedent(
    """
    import json, sys
    from maskteacher.cli import main
    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
    print(json.dumps({"code": code, "heavy": [m for m in HEAVY if m in sys.modules]}))
    """
).replace("HEAVY", repr(HEAVY))


def _probe(*argv: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def _tiny_cache(root) -> str:
    header = CacheHeader(teacher_type="vit_t", checkpoint_sha256="ab" * 32, image_size=32)
    init_cache(root, header)
    with ShardWriter(root, "s-00000", split="train") as w:
        w.add(
            CacheRecord(
                image_id="a",
                split="train",
                orig_hw=np.array([10, 12]),
                input_hw=np.array([27, 32]),
                teacher_logits=np.zeros((1, 8, 8), np.float32),
                teacher_points=np.zeros((1, 2), np.float32),
                teacher_iou=np.ones(1, np.float32),
                teacher_stability=np.ones(1, np.float32),
                teacher_boxes=np.zeros((1, 4), np.float32),
                gt_masks=np.zeros((0, 8, 8), bool),
            )
        )
    finalize(root)
    return os.fspath(root)


def test_help_and_cache_inspect_do_not_import_torch(tmp_path):
    assert _probe("--help") == {"code": 0, "heavy": []}
    for group in ("cache", "data", "precompute", "train", "eval", "config", "demo"):
        assert _probe(group, "--help") == {"code": 0, "heavy": []}, group
    root = _tiny_cache(tmp_path / "c")
    assert _probe("cache", "inspect", root) == {"code": 0, "heavy": []}
    assert _probe("cache", "verify", root, "--quiet", "--jobs", "1") == {"code": 0, "heavy": []}
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "maskteacher", "cache", "inspect", root],
        check=True,
        capture_output=True,
    )
    assert time.perf_counter() - start < 30  # the figure itself is measured by bench/cache_scale.py


def test_commands_are_a_plain_tuple_of_modules():
    source = Path(cli.__file__).read_text()
    assert "find_spec" not in source and "importlib" not in source
    assert [m.__name__.rsplit(".", 1)[-1] for m in cli.COMMANDS] == [
        "config",
        "data",
        "cache",
        "precompute",
        "train",
        "eval",
        "sweep",
        "demo",
    ]
    sub = cli.build_parser()._subparsers._group_actions[0].choices
    assert list(sub) == [
        "config", "data", "cache", "precompute", "train", "eval", "sweep", "demo"
    ]  # fmt: skip


def test_dataset_formats_match_the_readers():
    from maskteacher.cli.data import dataset_formats
    from maskteacher.data import DATASET_FORMATS

    assert sorted(dataset_formats()) == sorted(DATASET_FORMATS)
