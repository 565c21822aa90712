"""write -> read round trips on both backends, plain zarr/h5py readability, fsspec, DataLoader."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile

import fsspec
import h5py
import numcodecs
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maskteacher.cache_format import (
    CacheError,
    Codec,
    ShardWriter,
    StoreFlags,
    decode_raw,
    finalize,
    init_cache,
    logits_to_float,
    open_cache,
)
from maskteacher.cache_format.codecs import fletcher32, unpack_masks


def assert_same(got, want, codec: Codec) -> None:
    """Exact for metadata and GT; logits within the codec bound."""
    assert got.image_id == want.image_id and got.split == want.split and got.source == want.source
    assert got.orig_hw.tolist() == list(want.orig_hw) and got.input_hw.tolist() == list(
        want.input_hw
    )
    n = want.teacher_logits.shape[0]
    assert got.teacher_logits.shape == want.teacher_logits.shape
    assert got.teacher_logits.dtype == codec.stored_dtype
    if n:
        back = logits_to_float(got.teacher_logits, codec)
        if codec.name == "int8":
            ref = np.clip(want.teacher_logits, -codec.clip, codec.clip)
            assert np.abs(back - ref).max() <= codec.clip / 254 + 1e-5
        else:
            np.testing.assert_allclose(back, want.teacher_logits, rtol=2**-10, atol=1e-7)
    for name in ("teacher_points", "teacher_iou", "teacher_stability", "teacher_boxes"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
        assert getattr(got, name).dtype == np.float32
    assert got.gt_masks.dtype == np.bool_ and got.gt_masks.shape == want.gt_masks.shape
    np.testing.assert_array_equal(got.gt_masks, want.gt_masks)
    for name in ("embedding", "tokens"):
        w = getattr(want, name)
        g = getattr(got, name)
        if w is None:
            assert g is None
        else:
            assert g.dtype == np.float16
            np.testing.assert_array_equal(g, w.astype(np.float16))


masks_per_image = st.one_of(
    st.sampled_from([0, 1, 2, 3, 4, 5]), st.integers(0, 40), st.integers(200, 320)
)
image_spec = st.tuples(masks_per_image, st.integers(0, 12))


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    images=st.lists(image_spec, min_size=1, max_size=4),
    codec=st.sampled_from(["int8", "fp16"]),
    optional=st.sampled_from([(False, False), (True, False), (False, True), (True, True)]),
    rows=st.sampled_from([1, 3, 4, 32]),
    seed=st.integers(0, 2**16),
)
def test_property_write_read(
    make_header, make_record, backend, images, codec, optional, rows, seed
):
    header, record = make_header, make_record
    emb, tok = optional
    rng = np.random.default_rng(seed)
    hdr = header(
        backend,
        codec=Codec(codec),
        store=StoreFlags(embedding=emb, tokens=tok),
        rows_per_chunk=rows,
    )
    recs = [
        record(
            rng,
            f"im{k}",
            n=n,
            m=m,
            embed_dim=8 if emb else None,
            token_dim=6 if tok else None,
            source=f"d/{k}.jpg",
        )
        for k, (n, m) in enumerate(images)
    ]
    with tempfile.TemporaryDirectory() as root:
        init_cache(root, hdr)
        with ShardWriter(root, "w-00000", split="train") as w:
            for r in recs:
                w.add(r)
        finalize(root)
        reader = open_cache(root)
        assert len(reader) == len(recs) and reader.image_ids == [r.image_id for r in recs]
        for k in rng.permutation(len(recs)):
            assert_same(reader[int(k)], recs[k], hdr.codec)
            assert_same(reader[recs[k].image_id], recs[k], hdr.codec)
        reader.close()


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_gt_only_and_teacher_only_caches(tmp_path, backend, write_cache, make_header, make_record):
    header, record = make_header, make_record
    rng = np.random.default_rng(3)
    gt_only = header(backend, store=StoreFlags(teacher=False, gt=True))
    recs = [record(rng, "g0", n=0, m=4), record(rng, "g1", n=0, m=0)]
    write_cache(tmp_path / "gt", gt_only, {"s-00000": recs})
    reader = open_cache(tmp_path / "gt")
    got = reader["g0"]
    assert got.teacher_logits.shape == (0, 16, 16) and got.teacher_logits.dtype == np.int8
    np.testing.assert_array_equal(got.gt_masks, recs[0].gt_masks)
    assert reader.manifest.header.store.teacher is False
    with pytest.raises(CacheError, match="store.teacher is false"):
        write_cache(tmp_path / "gt2", gt_only, {"s-00000": [record(rng, "x", n=2, m=0)]})

    teacher_only = header(backend, store=StoreFlags(teacher=True, gt=False))
    recs = [record(rng, "t0", n=3, m=0)]
    write_cache(tmp_path / "t", teacher_only, {"s-00000": recs})
    got = open_cache(tmp_path / "t")["t0"]
    assert got.gt_masks.shape == (0, 16, 16) and got.num_masks == 3


def test_plain_zarr_reads_the_same_arrays(small_cache):
    root, manifest, shards = small_cache
    reader = open_cache(root)
    shard = os.path.join(root, "shards", "w0-00000.zarr")
    group = zarr.open_group(shard, mode="r")
    index = group.attrs["maskteacher_index"]
    logits = zarr.open_array(os.path.join(shard, "teacher_logits"), mode="r")
    meta = zarr.open_array(os.path.join(shard, "teacher_meta"), mode="r")
    gt = zarr.open_array(os.path.join(shard, "gt_masks"), mode="r")
    for k, image_id in enumerate(index["image_id"]):
        rec = reader[image_id]
        s, n = index["teacher_start"][k], index["teacher_count"][k]
        np.testing.assert_array_equal(logits[s : s + n], rec.teacher_logits)
        np.testing.assert_array_equal(meta[s : s + n, 2], rec.teacher_iou)
        gs, gn = index["gt_start"][k], index["gt_count"][k]
        np.testing.assert_array_equal(unpack_masks(gt[gs : gs + gn], 16), rec.gt_masks)


def test_plain_h5py_reads_raw_chunks(tmp_path, write_cache, make_header, make_record):
    header, record = make_header, make_record
    rng = np.random.default_rng(5)
    recs = [record(rng, "h0", n=6, m=2), record(rng, "h1", n=2, m=0)]
    write_cache(tmp_path / "c", header("hdf5"), {"s-00000": recs})
    reader = open_cache(tmp_path / "c")
    with h5py.File(tmp_path / "c" / "shards" / "s-00000.h5", "r") as f:
        index = json.loads(f["maskteacher_index"][()].tobytes())
        dset = f["teacher_logits"]
        k = index["image_id"].index("h0")
        start, count = index["teacher_start"][k], index["teacher_count"][k]
        rows = dset.chunks[0]
        parts = []
        for c0 in range(start, start + count, rows):
            mask, raw = dset.id.read_direct_chunk((c0, 0, 0))
            assert mask == 0 and int.from_bytes(raw[-4:], "little") == fletcher32(raw[:-4])
            parts.append(
                np.frombuffer(numcodecs.Zstd().decode(raw[:-4]), np.int8).reshape(rows, 16, 16)
            )
        np.testing.assert_array_equal(np.concatenate(parts)[:count], reader["h0"].teacher_logits)


def test_fsspec_memory_url(small_cache):
    root, manifest, shards = small_cache
    fs = fsspec.filesystem("memory")
    for folder, _dirs, names in os.walk(root):
        for name in names:
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            with open(full, "rb") as f:
                fs.pipe(f"/cachecopy/{rel}", f.read())
    local = open_cache(root)
    remote = open_cache("memory://cachecopy")
    assert remote.image_ids == local.image_ids
    for image_id in local.image_ids:
        a, b = local[image_id], remote[image_id]
        np.testing.assert_array_equal(a.teacher_logits, b.teacher_logits)
        np.testing.assert_array_equal(a.gt_masks, b.gt_masks)
    fs.rm("/cachecopy", recursive=True)


def test_file_url_and_split_filter(small_cache):
    root, manifest, _ = small_cache
    reader = open_cache(f"file://{root}", split="train")
    assert len(reader) == 5
    with pytest.raises(CacheError, match="no split 'val'"):
        open_cache(root, split="val")


def test_raw_records_pickle_and_decode(small_cache):
    root, _, shards = small_cache
    reader = open_cache(root)
    raw = reader.read_raw("a0")
    again = pickle.loads(pickle.dumps(raw))
    np.testing.assert_array_equal(decode_raw(again).teacher_logits, reader["a0"].teacher_logits)
    assert raw.nbytes < reader["a0"].teacher_logits.nbytes + 4096
    clone = pickle.loads(pickle.dumps(reader))  # spawn-style worker start
    np.testing.assert_array_equal(clone["b0"].gt_masks, reader["b0"].gt_masks)


def test_index_errors(small_cache):
    root, _, _ = small_cache
    reader = open_cache(root)
    with pytest.raises(IndexError):
        reader[len(reader)]
    with pytest.raises(CacheError, match="not in the cache"):
        reader["nope"]
    assert reader[-1].image_id == reader.image_ids[-1]


class _Items:
    def __init__(self, reader, raw: bool):
        self.reader, self.raw = reader, raw

    def __len__(self):
        return len(self.reader)

    def __getitem__(self, i):
        if self.raw:
            return self.reader.read_raw(i)
        rec = self.reader[i]
        return rec.image_id, rec.teacher_logits, rec.gt_masks


@pytest.mark.parametrize("small_cache", ["zarr", "hdf5"], indirect=True)
def test_dataloader_two_workers(small_cache):
    from torch.utils.data import DataLoader

    root, _, _ = small_cache
    reader = open_cache(root)
    want = {i: reader[i] for i in reader.image_ids}  # opened in the parent before the fork
    for raw in (False, True):
        loader = DataLoader(
            _Items(reader, raw), batch_size=2, num_workers=2, collate_fn=lambda b: b
        )
        seen = 0
        for batch in loader:
            for item in batch:
                if raw:
                    rec = decode_raw(item)
                    image_id, logits, gt = rec.image_id, rec.teacher_logits, rec.gt_masks
                else:
                    image_id, logits, gt = item
                np.testing.assert_array_equal(logits, want[image_id].teacher_logits)
                np.testing.assert_array_equal(gt, want[image_id].gt_masks)
                seen += 1
        assert seen == len(reader)


def test_cache_copied_elsewhere_still_reads(small_cache, tmp_path):
    root, _, _ = small_cache
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    assert open_cache(moved)["b0"].num_masks == 5


def test_both_splits_in_one_cache(tmp_path, write_cache, make_header, make_record):
    rng = np.random.default_rng(9)
    hdr = make_header(fingerprints={"train": "sha256:t", "val": "sha256:v"})
    write_cache(
        tmp_path / "c",
        hdr,
        {
            "t-00000": [make_record(rng, "same", n=1, m=0), make_record(rng, "t1", n=2, m=0)],
            "v-00000": [make_record(rng, "same", n=3, m=0, split="val")],
        },
    )
    both = open_cache(tmp_path / "c")
    assert len(both) == 3 and sorted(both.splits) == ["train", "train", "val"]
    with pytest.raises(CacheError, match="several splits"):
        both["same"]
    assert both[both.index_of("same", "val")].num_masks == 3
    val = open_cache(tmp_path / "c", split="val")
    assert val["same"].split == "val" and val["same"].num_masks == 3
    assert open_cache(tmp_path / "c", split="train")["same"].num_masks == 1
