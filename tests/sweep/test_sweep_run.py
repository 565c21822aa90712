"""``maskteacher sweep`` end to end on tiny runs: results, skipping, job-array slices + collect,
failures recorded, folder checks."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from maskteacher.cli import main
from maskteacher.data import make_sample
from maskteacher.sweep import runner

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

GRID = ["--grid", "train.lr=1e-3,1e-2", "--seeds", "0,1"]
TIMING = ("train_seconds", "eval_seconds", "wall_seconds")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sweep")
    data = {
        "train": make_sample(root / "train", images=2, seed=0),
        "val": make_sample(root / "val", images=2, seed=1),
        "shifted": make_sample(root / "shifted", images=2, seed=2, style="shifted"),
    }
    config = {
        "dataset": {
            "train_dataset": str(data["train"]),
            "val_dataset": str(data["val"]),
            "format": "folder",
            "mode": "everything",
            "grid_points": 4,
            "num_workers": 0,
        },
        "model": {"type": "vit_t_tiny", "image_size": 64},
        "train": {"epochs": 1, "batch_size": 2, "warmup_step": 1, "max_prompts": 8},
        "precompute": {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0},
    }
    config["train"].update({"device": "cpu", "log_every": 1})
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    return {"root": root, "config": path, "data": data}


def sweep(setup, out: Path, *extra: str) -> int:
    args = ["sweep", str(setup["config"]), *GRID, "--out", str(out), "--overlays", "1"]
    return main([*args, "--eval", f"shifted={setup['data']['shifted']}", *extra])


def rows(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "results.csv").open()))


def test_sweep_runs_every_combination_and_skips_finished_runs(setup, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    assert sweep(setup, out) == 0
    table = rows(out)
    assert [(r["combination"], r["seed"], r["train.lr"]) for r in table] == [
        ("train.lr=1e-3", "0", "1e-3"),
        ("train.lr=1e-3", "1", "1e-3"),
        ("train.lr=1e-2", "0", "1e-2"),
        ("train.lr=1e-2", "1", "1e-2"),
    ]
    for r in table:
        assert r["status"] == "finished" and r["error"] == ""
        assert 0.0 <= float(r["val/mean_best_iou"]) <= 1.0
        assert 0.0 <= float(r["shifted/mean_best_iou"]) <= 1.0
        assert float(r["wall_seconds"]) > 0
        run = out / r["run"]
        assert (run / "student_official.pth").is_file()
        assert (run / "eval" / "shifted" / "metrics.json").is_file()
        assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == int(r["seed"])
    # the seeds differ, so do the figures; a summary row per combination with mean ± spread
    assert table[0]["val/mean_best_iou"] != table[1]["val/mean_best_iou"]
    summary = (out / "summary.md").read_text()
    assert "| train.lr=1e-3 | 2 | " in summary and "±" in summary
    assert "## Evaluation set `shifted`" in summary and (out / "summary.png").stat().st_size > 0

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runner, "_train_and_evaluate", no_training)
    before = (out / "summary.md").read_text()
    assert sweep(setup, out) == 0
    assert (out / "summary.md").read_text() == before


def test_slices_then_collect_equal_one_process(setup, tmp_path):
    """Two processes' worth of slices into one folder, then collect: the same summary (and
    the same figures in results.csv) as one process running everything -- the runs are
    deterministic at a fixed thread count."""
    single, sliced = tmp_path / "single", tmp_path / "sliced"
    assert sweep(setup, single) == 0
    for index in range(3):
        assert sweep(setup, sliced, "--index", str(index), "--count", "3") == 0
    assert not (sliced / "summary.md").exists()  # slices leave the summary to collect
    assert main(["sweep", "collect", str(sliced)]) == 0
    assert (sliced / "summary.md").read_text() == (single / "summary.md").read_text()

    def figures(out):
        return [
            {k: v for k, v in r.items() if k not in TIMING and not k.endswith("ms_per_image")}
            for r in rows(out)
        ]

    assert figures(sliced) == figures(single)


def test_a_failing_run_is_recorded_and_the_others_finish(setup, tmp_path, capsys):
    out = tmp_path / "fail"
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    code = sweep(setup, out, "--variant", "ok", "--variant", "bad", f"model.checkpoint_path={bad}")
    assert code == 1
    table = {(r["combination"], r["seed"]): r for r in rows(out)}
    assert len(table) == 8
    failed = [r for r in table.values() if r["status"] == "failed"]
    assert {r["combination"] for r in failed} == {"bad,train.lr=1e-3", "bad,train.lr=1e-2"}
    assert all("broken.pth" in r["error"] and r["val/mean_best_iou"] == "" for r in failed)
    assert all(r["status"] == "finished" for k, r in table.items() if k[0].startswith("ok"))
    error = json.loads((out / failed[0]["run"] / "error.json").read_text())
    assert "Traceback" in error["traceback"]
    summary = (out / "summary.md").read_text()
    assert "## Failed runs" in summary and "| bad,train.lr=1e-3 | 0 | " in summary
    # fixed input: a re-run retries the failed runs only, and their error files go away
    shutil.copy(setup["root"] / "cfg.yaml", bad)  # still not a checkpoint: fails again
    assert (
        sweep(setup, out, "--variant", "ok", "--variant", "bad", f"model.checkpoint_path={bad}")
        == 1
    )
    assert "4 skipped" in capsys.readouterr().out


def test_folder_and_argument_checks(setup, tmp_path, capsys):
    out = tmp_path / "checks"
    assert sweep(setup, out, "--count", "2", "--index", "0") == 0
    # another config into the same folder is refused, naming the first difference
    assert sweep(setup, out, "--set", "train.epochs=2") == 2
    assert "train.epochs (2 here, 1 in the folder)" in capsys.readouterr().err
    # a misspelled grid key fails before any run starts
    assert (
        main(["sweep", str(setup["config"]), "--grid", "train.lrr=1", "--out", str(tmp_path / "x")])
        == 2
    )
    assert "did you mean 'train.lr'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["sweep", str(setup["config"]), *GRID]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
    assert main(["sweep", "collect", str(tmp_path)]) == 2
    assert "is not a sweep folder" in capsys.readouterr().err
    # collect of a half-done job array: what finished, the rest listed as not run yet
    assert main(["sweep", "collect", str(out)]) == 0
    summary = (out / "summary.md").read_text()
    assert "2 runs finished, 0 failed, 2 not run yet" in summary
    assert "## Not run yet" in summary


def test_each_run_uses_the_configured_thread_count(setup, tmp_path, monkeypatch):
    """The figures depend on the thread count (the order of float sums): every run gets
    --threads, whatever the process had, and the process's setting comes back afterwards."""
    seen = []

    def record_threads(sweep, run):
        seen.append(torch.get_num_threads())
        metrics = {name: {"mean_best_iou": 0.5} for name in sweep.evals}
        return {
            "combination": run.combination.name,
            "overrides": [],
            "seed": run.seed,
            "metrics": metrics,
        }

    monkeypatch.setattr(runner, "_train_and_evaluate", record_threads)
    torch.set_num_threads(2)
    assert (
        main(["sweep", str(setup["config"]), "--out", str(tmp_path / "a"), "--seeds", "0,1"]) == 0
    )
    assert seen == [1, 1] and torch.get_num_threads() == 2
    args = ["sweep", str(setup["config"]), "--out", str(tmp_path / "b"), "--threads", "0"]
    assert main(args) == 0
    assert seen[-1] == 2  # 0: torch's own setting
