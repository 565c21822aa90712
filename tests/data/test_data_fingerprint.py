"""Issue 11 item 5 (first half): the dataset fingerprint notices an edited annotation and an
image replaced by another of the same size, survives a copy of the dataset, and differs from the
size-only fingerprint of older caches."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskteacher.cache_format import dataset_fingerprint
from maskteacher.data import open_dataset

FORMATS = ("folder", "sa1b", "coco")


def _fp(root: Path, **kwargs) -> str:
    return dataset_fingerprint(open_dataset(root, **kwargs).fingerprint_entries())


def _entries(root: Path) -> dict[str, int]:
    return dict(open_dataset(root).fingerprint_entries())


@pytest.fixture
def copy_sample(sample_roots, tmp_path):
    return lambda fmt: Path(shutil.copytree(sample_roots[fmt], tmp_path / fmt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_entries_are_ids_and_integer_keys_in_order(fmt, sample_roots):
    ds = open_dataset(sample_roots[fmt])
    entries = ds.fingerprint_entries()
    assert [i for i, _ in entries] == ds.image_ids
    assert all(isinstance(k, int) for _, k in entries)
    assert len({k for _, k in entries}) == len(entries)
    assert open_dataset(sample_roots[fmt]).fingerprint_entries() == entries  # deterministic


@pytest.mark.parametrize("fmt", FORMATS)
def test_copy_and_touch_keep_the_fingerprint(fmt, sample_roots, tmp_path):
    """mtimes and paths are not hashed: a copied dataset still matches its cache."""
    copy = Path(
        shutil.copytree(sample_roots[fmt], tmp_path / "elsewhere", copy_function=shutil.copy)
    )
    for path in copy.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(1, 1))
    assert _fp(copy) == _fp(sample_roots[fmt])


def _jpeg(seed: int, shape: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    image = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _replace_keeping_size(path: Path, seed: int) -> None:
    """Write a different image of the same pixel size and the same byte size (the shorter JPEG
    is padded after its end marker, which decoders ignore)."""
    old = path.read_bytes()
    h, w = np.asarray(Image.open(path)).shape[:2]
    new = _jpeg(seed, (h, w, 3))[: len(old)]  # noise at quality 90 is larger: cut, then pad
    new = new if new.endswith(b"\xff\xd9") else new[:-2] + b"\xff\xd9"
    path.write_bytes(new + b"\0" * (len(old) - len(new)))
    assert path.stat().st_size == len(old)
    assert np.asarray(Image.open(path)).shape[:2] == (h, w)


@pytest.mark.parametrize("fmt", ["sa1b", "coco"])
def test_image_replaced_by_another_of_the_same_size(fmt, copy_sample):
    root = copy_sample(fmt)
    before = _entries(root)
    ds = open_dataset(root)
    path = ds.image_path(2)
    _replace_keeping_size(path, seed=123)
    after = _entries(root)
    changed = {i for i in before if before[i] != after[i]}
    assert changed == {ds.image_ids[2]}


def test_large_files_are_sampled_small_ones_hashed_whole():
    """The documented limit: only SAMPLE_BLOCKS blocks are read from a large file."""
    from maskteacher.data.fingerprint import SAMPLE_BLOCK, SAMPLE_BLOCKS, sample_offsets

    offsets = sample_offsets(10 * SAMPLE_BLOCKS * SAMPLE_BLOCK)
    assert len(offsets) == SAMPLE_BLOCKS and offsets[0] == 0
    assert offsets[-1] == 10 * SAMPLE_BLOCKS * SAMPLE_BLOCK - SAMPLE_BLOCK
    assert sample_offsets(SAMPLE_BLOCKS * SAMPLE_BLOCK) == [0]  # small files: hashed whole


def test_sa1b_edited_annotation_changes_its_image_key(copy_sample):
    root = copy_sample("sa1b")
    before = _entries(root)
    path = root / "sa_3.json"
    doc = json.loads(path.read_text())
    doc["annotations"] = doc["annotations"][:-1]  # an object deleted
    path.write_text(json.dumps(doc))
    after = _entries(root)
    assert {i for i in before if before[i] != after[i]} == {"sa_3"}


def test_folder_edited_or_added_mask_changes_its_image_key(copy_sample):
    root = copy_sample("folder")
    before = _entries(root)
    mask = root / "mask" / "sample_0001" / "0.png"
    values = np.asarray(Image.open(mask)).copy()
    values[0, 0] = 255 - values[0, 0]
    Image.fromarray(values).save(mask)
    edited = _entries(root)
    assert {i for i in before if before[i] != edited[i]} == {"sample_0001"}
    shutil.copy(root / "mask" / "sample_0004" / "0.png", root / "mask" / "sample_0004" / "99.png")
    added = _entries(root)
    assert {i for i in edited if edited[i] != added[i]} == {"sample_0004"}


def test_coco_edited_annotation_or_crowd_option_changes_the_fingerprint(copy_sample):
    root = copy_sample("coco")
    plain = _fp(root)
    assert _fp(root, include_crowd=True) != plain
    path = root / "annotations" / "instances.json"
    doc = json.loads(path.read_text())
    polygon = next(a for a in doc["annotations"] if isinstance(a["segmentation"], list))
    polygon["segmentation"][0][0] += 1.0  # one vertex moved by a pixel
    path.write_text(json.dumps(doc))
    assert _fp(root) != plain


@pytest.mark.parametrize("fmt", FORMATS)
def test_old_size_only_fingerprints_mismatch(fmt, sample_roots):
    """Caches made before fingerprint v2 recorded sha256 over (id, file size) pairs: they must
    not match (their ground truth may have been decoded by the older mask rule)."""
    ds = open_dataset(sample_roots[fmt])
    old = dataset_fingerprint(
        [(i, ds.image_path(k).stat().st_size) for k, i in enumerate(ds.image_ids)]
    )
    assert dataset_fingerprint(ds.fingerprint_entries()) != old
