"""The report's reading of the result, on hand-made figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from maskteacher.demo.reading import compare, reading_paragraphs
from maskteacher.sweep.results import RunRecord, SweepResults, mean_spread


def record(method: str, seed: int, fine: dict, original: dict | None = None) -> RunRecord:
    metrics = {"fine": fine, "original": original or {"mean_best_iou": 0.3}}
    return RunRecord(method, seed, f"runs/{method}/seed_{seed}", "finished", {"metrics": metrics})


def results(records: list[RunRecord]) -> SweepResults:
    header = {"evals": {"fine": "f", "original": "o"}, "combinations": [], "seeds": [0, 1, 2]}
    return SweepResults(Path("."), header, records, [])


REFERENCE = {
    "teacher": {"fine": {"mean_best_iou": 0.45}, "original": {"mean_best_iou": 0.40}},
    "student_base": {"fine": {"mean_best_iou": 0.20}, "original": {"mean_best_iou": 0.25}},
}


def test_compare_uses_the_two_spreads_together():
    assert compare((0.5, 0.01, 3), (0.4, 0.02, 3)) == (pytest.approx(0.1), True)
    assert compare((0.5, 0.06, 3), (0.4, 0.05, 3)) == (pytest.approx(0.1), False)
    assert compare(None, (0.4, 0.0, 1)) is None
    assert mean_spread([0.1, None, float("nan"), 0.3]) == (
        pytest.approx(0.2),
        pytest.approx(0.1414, abs=1e-4),
        2,
    )


def test_reading_states_every_difference_and_the_spec_claim():
    rows = []
    for seed, jitter in enumerate((-0.01, 0.0, 0.01)):
        rows.append(
            record(
                "gt_only",
                seed,
                {
                    "mean_best_iou": 0.30 + jitter,
                    "boundary_iou": 0.50 + jitter,
                    "ar100": 0.20 + jitter,
                },
            )
        )
        # clearly better boundaries, the same recall: the claim holds
        rows.append(
            record(
                "dual_kl",
                seed,
                {
                    "mean_best_iou": 0.31 + jitter,
                    "boundary_iou": 0.60 + jitter,
                    "ar100": 0.20 + jitter,
                },
            )
        )
        # worse recall beyond the spreads: the claim does not hold
        rows.append(
            record(
                "dual_l2",
                seed,
                {
                    "mean_best_iou": 0.25 + jitter,
                    "boundary_iou": 0.52 + jitter,
                    "ar100": 0.10 + jitter,
                },
            )
        )
    logs = {  # (first quarter, last quarter) of the runs
        "gt_only": {"train/task_loss": (1.0, 0.8), "train/matched_per_image": (0.5, 1.5)},
        "dual_l2": {
            "train/task_loss": (3.0, 0.0),
            "train/soft": (4.0, 0.0),
            "train/teacher_pairs": (6.0, 0.0),
            "train/matched_per_image": (0.4, 0.0),
        },
        "dual_kl": {
            "train/task_loss": (1.1, 1.0),
            "train/soft": (0.2, 0.1),
            "train/teacher_pairs": (6.5, 7.0),
        },
    }
    text = "\n".join(
        reading_paragraphs(results(rows), REFERENCE, logs, ["gt_only", "dual_l2", "dual_kl"], 0.5)
    )
    assert "teacher 0.450, student base 0.200 (+0.250)" in text
    assert "dual_kl 0.310 (+0.010, within the spreads)" in text
    assert "dual_l2 0.250 (-0.050, larger than the spreads)" in text
    assert "dual_kl: boundary IoU +0.100, AR@100 +0.000 vs gt_only -- the claim holds" in text
    assert (
        "dual_l2: boundary IoU +0.020, AR@100 -0.100 vs gt_only -- the claim does not hold" in text
    )
    assert (
        "dual_l2's weighted soft term is 67% -> - of its task loss, on 6.0 -> 0.0 teacher pairs"
        in text
    )
    assert "dual_kl's weighted soft term is 9% -> 5% of its task loss, on 6.5 -> 7.0" in text
    assert "per image (what the task losses act on): gt_only 0.5 -> 1.5, dual_l2 0.4 -> 0.0" in text


def test_noise_is_called_noise():
    rows = [
        record("gt_only", s, {"boundary_iou": 0.5 + d, "ar100": 0.2 + d, "mean_best_iou": 0.3})
        for s, d in enumerate((-0.05, 0.0, 0.05))
    ]
    rows += [
        record("dual_kl", s, {"boundary_iou": 0.52 + d, "ar100": 0.2 + d, "mean_best_iou": 0.3})
        for s, d in enumerate((-0.05, 0.0, 0.05))
    ]
    text = "\n".join(reading_paragraphs(results(rows), REFERENCE, {}, ["gt_only", "dual_kl"], 0.5))
    assert "the claim cannot be told from seed noise" in text
