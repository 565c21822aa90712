"""maskteacher demo: every stage runs and the report holds every method's row (smoke size).

The full-size demo is the README's main job; CI runs it in a fresh virtual environment
(.ci/readme_main_job.sh) and checks the same report structure.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maskteacher.cli import main
from maskteacher.demo import MARKER, METHODS

pytestmark = pytest.mark.slow


def test_quick_demo_writes_report_with_every_method(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "report.md") in printed
    assert "maskteacher precompute" in printed  # the real-checkpoint commands
    report = (out / "report.md").read_text()
    for name in ("teacher", "student_base", *METHODS):
        assert f"| {name} |" in report
    for stage in (
        "train teacher",
        "precompute teacher cache",
        "fine-tune student: dual_kl",
        "evaluate",
    ):
        assert stage in report
    assert (out / "loss_curves.png").stat().st_size > 0
    assert list((out / "eval" / "dual_l2" / "overlays").glob("*.png"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"teacher", "student_base", *METHODS}
    for name in METHODS:
        assert (out / "configs" / f"{name}.yaml").is_file()
        assert (out / "runs" / name / "student_official.pth").is_file()
    # the cache was used by the students: manifest present, teacher checked
    assert (out / "cache" / "manifest.json").is_file()

    # a second run into the same folder needs --force; a foreign folder is never replaced
    assert main(["demo", "--out", str(out), "--quick"]) == 2
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["demo", "--out", str(foreign), "--quick", "--force"]) == 2
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert (out / MARKER).is_file()
