"""maskteacher eval end to end on sample data with a tiny random student."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from maskteacher.cli import main
from maskteacher.config import config_from_dict
from maskteacher.data import make_sample
from maskteacher.errors import UserError
from maskteacher.eval.run import evaluate_checkpoint
from maskteacher.models import build_sam, export_official


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("eval")
    val = make_sample(root / "val", format="sa1b", images=3, seed=3)
    torch.manual_seed(0)
    ckpt = root / "student.pth"
    export_official(build_sam("vit_t_tiny", image_size=64), ckpt)
    raw = {
        "dataset": {"val_dataset": str(val), "mode": "everything"},
        "model": {"type": "vit_t_tiny", "image_size": 64, "save_path": str(root / "run")},
        "train": {"device": "cpu"},
        "precompute": {
            "points_per_side": 4,
            "pred_iou_thresh": 0.0,
            "stability_score_thresh": 0.0,
            "box_nms_thresh": 0.9,
        },
    }
    return {"root": root, "ckpt": ckpt, "raw": raw, "val": val}


def test_eval_writes_metrics_csv_and_overlays(setup: dict, tmp_path: Path) -> None:
    cfg = config_from_dict(setup["raw"])
    metrics = evaluate_checkpoint(cfg, setup["ckpt"], tmp_path, overlays=2)
    assert metrics.images == 3
    assert metrics.masks_per_image > 0
    assert 0.0 <= metrics.mean_best_iou <= 1.0
    assert metrics.teacher_agreement is None
    data = json.loads((tmp_path / "metrics.json").read_text())
    for key in (
        "mean_best_iou",
        "ar10",
        "ar100",
        "boundary_iou",
        "masks_per_image",
        "ms_per_image",
    ):
        assert key in data
    assert data["generation"]["points_per_side"] == 4
    rows = list(csv.DictReader((tmp_path / "per_image.csv").open()))
    assert len(rows) == 3 and rows[0]["image_id"]
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 2


def test_eval_cli_and_errors(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps(setup["raw"]))
    code = main(
        [
            "eval",
            str(config),
            "--checkpoint",
            str(setup["ckpt"]),
            "--out",
            str(tmp_path / "o"),
            "--limit",
            "1",
            "--overlays",
            "0",
        ]
    )
    assert code == 0
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["images"] == 1
    # wrong backbone checkpoint: one line, exit 2
    assert (
        main(
            [
                "eval",
                str(config),
                "--checkpoint",
                str(setup["ckpt"]),
                "--set",
                "model.type=vit_b_tiny",
            ]
        )
        == 2
    )
    assert "vit_b_tiny" in capsys.readouterr().err
    cfg = config_from_dict({**setup["raw"], "dataset": {"mode": "everything"}})
    with pytest.raises(UserError, match="val_dataset is not set"):
        evaluate_checkpoint(cfg, setup["ckpt"], tmp_path)


def test_teacher_agreement_only_against_a_cache_of_the_same_images(
    setup: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The cache's val split is used when it was made from the evaluated images; another
    dataset whose image ids coincide (sa_1, sa_2, ...) gets no agreement and a warning."""
    from maskteacher.precompute import PrecomputeJob, run_precompute

    raw = {
        **setup["raw"],
        "mask_teacher": {
            "teacher_type": "vit_t_tiny",
            "checkpoint_path": str(setup["ckpt"]),
            "cache_path": str(tmp_path / "cache"),
        },
        "precompute": {**setup["raw"]["precompute"], "device": "cpu", "num_workers": 0},
    }
    assert run_precompute(PrecomputeJob.from_config(config_from_dict(raw))).exit_code == 0
    same = evaluate_checkpoint(config_from_dict(raw), setup["ckpt"], tmp_path / "a", overlays=0)
    assert same.teacher_agreement is not None and 0.0 < same.teacher_agreement <= 1.0
    other = make_sample(tmp_path / "other", format="sa1b", images=3, seed=9)
    raw["dataset"] = {**raw["dataset"], "val_dataset": str(other)}
    with caplog.at_level("WARNING"):
        metrics = evaluate_checkpoint(config_from_dict(raw), setup["ckpt"], tmp_path / "b")
    assert metrics.teacher_agreement is None
    assert "made from other images" in caplog.text
