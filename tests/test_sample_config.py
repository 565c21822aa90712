"""configs/sample_tiny.yaml's header lists a by-hand pipeline: every command in it works."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "sample_tiny.yaml"


def header_commands(path: Path) -> list[list[str]]:
    """The ``#   maskteacher ...`` lines of the config's header comment (``\\`` continues)."""
    commands, current = [], ""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if current:
            current += " " + text
        elif text.startswith("maskteacher "):
            current = text
        else:
            continue
        if current.endswith("\\"):
            current = current[:-1].rstrip()
        else:
            commands.append(shlex.split(current))
            current = ""
    return commands


def test_header_lists_the_whole_pipeline():
    verbs = [c[1] for c in header_commands(CONFIG)]
    assert verbs == ["data", "data", "precompute", "train", "eval"]


@pytest.mark.slow
def test_header_commands_run_in_order(tmp_path):
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    teacher = "maskteacher/demo/teacher"  # the config names the shipped teacher repo-relative
    shutil.copytree(REPO / teacher, tmp_path / teacher)
    for command in header_commands(CONFIG):
        done = subprocess.run(
            # -P: the copied maskteacher/demo/teacher folder must not shadow the package
            [sys.executable, "-P", "-m", "maskteacher", *command[1:]],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=600,
        )
        assert done.returncode == 0, (command, done.stderr[-2000:])
    metrics = json.loads((tmp_path / "runs/sample_tiny/eval/metrics.json").read_text())
    assert 0.0 <= metrics["mean_best_iou"] <= 1.0
    assert (tmp_path / "runs/teacher_cache/manifest.json").is_file()
    from maskteacher.cache_format import open_cache

    cache = open_cache(str(tmp_path / "runs/teacher_cache"))
    kept = cache.teacher_counts(list(range(len(cache))))
    assert (kept > 0).mean() > 0.5  # the teacher keeps masks: the dual term has something to do
