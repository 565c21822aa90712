"""maskteacher demo at smoke size: every stage and file, every method's rows, and the same
tables from two runs with the same seed.

The full-size demo is the README's main job; CI runs it in a fresh virtual environment
(.ci/readme_main_job.sh) and checks the same report structure.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maskteacher.cli import main
from maskteacher.demo import METHODS
from maskteacher.demo.report import TIMING_HEADING
from maskteacher.demo.run import MARKER

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory) -> list[Path]:
    """Two quick demos with the same seed, in two folders."""
    root = tmp_path_factory.mktemp("demo")
    outs = [root / "first", root / "second"]
    for out in outs:
        assert main(["demo", "--out", str(out), "--quick"]) == 0
    return outs


def test_quick_demo_writes_report_with_every_method(quick_runs, tmp_path, capsys):
    out = quick_runs[0]
    report = (out / "report.md").read_text()
    for name in ("teacher", "student_base", *METHODS):
        assert f"| {name} |" in report
    for seed in (0, 1):  # per method x seed rows
        assert all(f"| {m} | {seed} |" in report for m in METHODS)
    for heading in (
        "## Mean ± spread over seeds: `fine`",
        "## Mean ± spread over seeds: `original`",
        "## Reading the result",
        "## Training logs",
        "**The spec's claim**",
        TIMING_HEADING,
    ):
        assert heading in report
    for column in ("boundary IoU", "AR@100", "teacher agreement"):
        assert column in report
    assert "fine-tune: 5 methods x 2 seeds" in report and "load average" in report
    assert (out / "loss_curves.png").stat().st_size > 0
    for method in METHODS:
        run = out / "sweep" / "runs" / method / "seed_0"
        assert list((run / "eval" / "fine" / "overlays").glob("*.png"))
        assert (run / "eval" / "original" / "metrics.json").is_file()
        assert f"sweep/runs/{method}/seed_0/eval/fine/overlays/" in report
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["reference"]) == {"teacher", "student_base"}
    assert len(metrics["runs"]) == 2 * len(METHODS)
    for name in ("student_base", "precompute", "fine_tune"):
        assert (out / "configs" / f"{name}.yaml").is_file()
    assert (out / "sweep" / "summary.md").is_file() and (out / "sweep" / "results.csv").is_file()
    assert (out / "cache" / "manifest.json").is_file()

    # a second run into the same folder needs --force; a foreign folder is never replaced
    assert main(["demo", "--out", str(out), "--quick"]) == 2
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["demo", "--out", str(foreign), "--quick", "--force"]) == 2
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert (out / MARKER).is_file()


def _tables(report: str) -> str:
    """Everything above the wall-time section: the tables, the reading, the pictures' names."""
    return report.split(TIMING_HEADING)[0]


def test_two_runs_with_the_same_seed_give_identical_tables(quick_runs):
    first, second = ((out / "report.md").read_text() for out in quick_runs)
    assert _tables(first) == _tables(second)
    assert first != second or TIMING_HEADING in first
    # beyond the printed digits: every figure and every training step's loss
    runs = []
    for out in quick_runs:
        rows = {}
        for path in sorted((out / "sweep" / "runs").glob("*/seed_*/result.json")):
            data = json.loads(path.read_text())
            for name in data["metrics"].values():
                name.pop("ms_per_image")
            rows[str(path.relative_to(out))] = (data["metrics"], data["losses"])
        runs.append(rows)
    assert runs[0] == runs[1] and len(runs[0]) == 2 * len(METHODS)
    assert all(losses for _, losses in runs[0].values())
    reference = [json.loads((out / "metrics.json").read_text())["reference"] for out in quick_runs]
    for ref in reference:
        for model in ref.values():
            for figures in model.values():
                figures.pop("ms_per_image")
    assert reference[0] == reference[1]
