"""The golden trace (:mod:`golden_trace`): the trainer's numbers do not change when its code is
reorganised. On the machine kind the fixture was recorded on (same torch build and CPU
capability) every loss, term, matched IoU, exported student and the cache content must be
bit-identical; elsewhere the floats must agree to 1e-4 relative (other SIMD kernels round
differently) and the hashes are not compared."""

from __future__ import annotations

import json
import math

import pytest
from golden_trace import FIXTURE, RUNS, environment, trace


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def now() -> dict:
    return trace()


def _value(text: str) -> float:
    return math.nan if text == "nan" else float.fromhex(text)


def _same_floats(got: list[str], want: list[str], exact: bool, what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} values, recorded {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        a, b = _value(g), _value(w)
        if math.isnan(a) or math.isnan(b):
            assert math.isnan(a) and math.isnan(b), f"{what}[{i}]: {a} vs recorded {b}"
        elif exact:
            assert g == w, f"{what}[{i}]: {a!r} vs recorded {b!r} (bit-identical expected)"
        else:
            assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6), f"{what}[{i}]: {a} vs {b}"


def test_fixture_covers_every_run(recorded):
    assert sorted(recorded["runs"]) == sorted(RUNS)


def test_trace_is_unchanged(recorded, now):
    exact = recorded["environment"] == environment()
    if exact:
        assert now["cache_sha256"] == recorded["cache_sha256"], "precompute cache content changed"
    for name, want in recorded["runs"].items():
        got = now["runs"][name]
        _same_floats(got["losses"], want["losses"], exact, f"{name} losses")
        _same_floats(got["matched_iou"], want["matched_iou"], exact, f"{name} matched_iou")
        assert sorted(got["scalars"]) == sorted(want["scalars"]), f"{name}: logged terms differ"
        for tag, values in want["scalars"].items():
            _same_floats(got["scalars"][tag], values, exact, f"{name} {tag}")
        if exact:
            assert got["student_sha256"] == want["student_sha256"], f"{name}: student differs"
