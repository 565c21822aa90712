"""Fixtures for the data tests: one small synthetic dataset per format, written once."""

from __future__ import annotations

from pathlib import Path

import pytest

from maskteacher.data.sample import SyntheticImage, generate_sample, make_sample

SAMPLE_IMAGES = 6
SAMPLE_SEED = 3


@pytest.fixture(scope="session")
def sample_truth() -> list[SyntheticImage]:
    """The in-memory ground truth that ``make_sample`` writes for SAMPLE_IMAGES / SAMPLE_SEED."""
    return generate_sample(SAMPLE_IMAGES, SAMPLE_SEED)


@pytest.fixture(scope="session")
def sample_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """format -> root of a sample dataset written by make_sample (read-only for tests)."""
    base = tmp_path_factory.mktemp("samples")
    return {
        fmt: make_sample(base / fmt, format=fmt, images=SAMPLE_IMAGES, seed=SAMPLE_SEED)
        for fmt in ("folder", "sa1b", "coco")
    }
