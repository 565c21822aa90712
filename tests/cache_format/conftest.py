"""Fixtures for the cache format tests: tiny headers, random ragged records, written caches."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from maskteacher.cache_format import (
    CacheHeader,
    CacheRecord,
    Codec,
    ShardWriter,
    StoreFlags,
    finalize,
    init_cache,
)

IMAGE_SIZE = 64  # L = 16, E = 4


def header(backend: str = "zarr", **overrides) -> CacheHeader:
    kw = dict(
        teacher_type="vit_t",
        checkpoint_sha256="ab" * 32,
        image_size=IMAGE_SIZE,
        params={"points_per_side": 8, "pred_iou_thresh": 0.88},
        codec=Codec("int8", clip=12.0),
        store=StoreFlags(teacher=True, gt=True, embedding=False, tokens=False),
        backend=backend,
        fingerprints={"train": "sha256:t"},
        rows_per_chunk=4,
    )
    kw.update(overrides)
    return CacheHeader(**kw)


def record(
    rng: np.random.Generator,
    image_id: str,
    *,
    n: int,
    m: int,
    split: str = "train",
    image_size: int = IMAGE_SIZE,
    embed_dim: int | None = None,
    token_dim: int | None = None,
    source: str | None = None,
) -> CacheRecord:
    low = image_size // 4
    e = image_size // 16
    h, w = int(rng.integers(20, 200)), int(rng.integers(20, 200))
    s = image_size / max(h, w)
    return CacheRecord(
        image_id=image_id,
        split=split,
        orig_hw=np.array([h, w]),
        input_hw=np.array([max(1, round(h * s)), max(1, round(w * s))]),
        teacher_logits=rng.normal(0, 8, (n, low, low)).astype(np.float32),
        teacher_points=rng.uniform(0, image_size, (n, 2)).astype(np.float32),
        teacher_iou=rng.uniform(0, 1, n).astype(np.float32),
        teacher_stability=rng.uniform(0, 1, n).astype(np.float32),
        teacher_boxes=rng.uniform(0, 200, (n, 4)).astype(np.float32),
        gt_masks=rng.uniform(size=(m, low, low)) < 0.3,
        embedding=None
        if embed_dim is None
        else rng.normal(0, 1, (embed_dim, e, e)).astype(np.float32),
        tokens=None if token_dim is None else rng.normal(0, 1, (n, token_dim)).astype(np.float32),
        source=source,
    )


@pytest.fixture(scope="session")
def make_header():
    """make_header(backend="zarr", **overrides) -> a tiny CacheHeader (image_size 64)."""
    return header


@pytest.fixture(scope="session")
def make_record():
    """make_record(rng, image_id, *, n, m, ...) -> a random CacheRecord with n masks, m GT masks."""
    return record


@pytest.fixture
def write_cache():
    """write_cache(root, header, {shard_name: [records]}) -> Manifest (finalized)."""

    def write(root, hdr: CacheHeader, shards: dict[str, list[CacheRecord]]):
        init_cache(root, hdr)
        for name, records in shards.items():
            with ShardWriter(root, name, split=records[0].split) as w:
                for r in records:
                    w.add(r)
        return finalize(root)

    return write


@pytest.fixture
def small_cache(tmp_path, write_cache, request):
    """A finished cache with two shards (backend from the test's parametrisation or zarr)."""
    backend = getattr(request, "param", "zarr")
    rng = np.random.default_rng(0)
    root = os.fspath(tmp_path / f"cache-{backend}")
    shards = {
        "w0-00000": [
            record(rng, f"a{i}", n=n, m=m) for i, (n, m) in enumerate([(3, 2), (0, 1), (9, 0)])
        ],
        "w1-00000": [record(rng, f"b{i}", n=n, m=m) for i, (n, m) in enumerate([(5, 5), (1, 0)])],
    }
    manifest = write_cache(root, header(backend), shards)
    return root, manifest, shards


FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture
def v1_cache(tmp_path):
    """v1_cache(backend) -> a writable copy of the format-1 cache written by the format-1 code
    (fixtures/make_v1_caches.py); ``v1_expected(backend)`` gives its records' digests."""

    def copy(backend: str) -> str:
        dst = tmp_path / f"v1-{backend}"
        shutil.copytree(FIXTURES / "v1" / backend, dst)
        return os.fspath(dst)

    return copy


@pytest.fixture(scope="session")
def v1_expected():
    data = json.loads((FIXTURES / "v1" / "expected.json").read_text())
    return lambda key: data[key]


@pytest.fixture
def write_cache_with_duplicates(monkeypatch, write_cache):
    """write_cache_with_duplicates(root) -> root of a format-2 cache whose index lists image
    'a0' in two shards (finalized past the writer's refusal, as a foreign or broken tool could)."""
    import maskteacher.cache_format.writer as writer

    def make(root) -> str:
        rng = np.random.default_rng(11)
        init_cache(root, header())
        for name, ids in (("w0-00000", ["a0", "a1"]), ("w1-00000", ["a0", "b1"])):
            with ShardWriter(root, name, split="train") as w:
                for i in ids:
                    w.add(record(rng, i, n=2, m=1))
        real_scan = writer.scan_cache

        def unchecked(r, *, repair=False):
            hdr = writer.load_header(os.fspath(r))
            names = writer.finished_shards(os.fspath(r), hdr)
            shards = [writer.shard_entry(os.fspath(r), n, hdr, repair=repair) for n in names]
            return writer.CacheScan(hdr, shards, [])

        monkeypatch.setattr(writer, "scan_cache", unchecked)
        finalize(root)
        monkeypatch.setattr(writer, "scan_cache", real_scan)
        return os.fspath(root)

    return make
