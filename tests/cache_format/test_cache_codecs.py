"""Logit codec bounds, mask bit-packing, and chunk byte codecs against zarr / HDF5 themselves."""

from __future__ import annotations

import h5py
import numcodecs
import numpy as np
import pytest
import torch

from maskteacher.cache_format import CacheError, Codec, dequantize_torch, logits_to_float
from maskteacher.cache_format.codecs import (
    ChunkCodec,
    ChunkError,
    encode_logits,
    fletcher32,
    pack_masks,
    unpack_masks,
    zstd_content_size,
)
from maskteacher.cache_format.layout import chunk_codec


def test_int8_error_bound_and_clipping_stats():
    rng = np.random.default_rng(0)
    x = rng.uniform(-30, 30, (7, 16, 16)).astype(np.float32)
    codec = Codec("int8", clip=12.0)
    stored, stats = encode_logits(x, codec)
    assert stored.dtype == np.int8
    back = logits_to_float(stored, codec)
    inside = np.abs(x) <= 12
    assert np.abs(back - x)[inside].max() <= 12 / 254 + 1e-6
    assert np.all(back[x > 12] == pytest.approx(12.0))
    assert stats["clipped"] == int((np.abs(x) > 12).sum())
    band = np.abs(x) < 8
    assert stats["band_pixels"] == int(band.sum())
    assert stats["max_err_band"] == pytest.approx(float(np.abs(back - x)[band].max()))
    assert stats["max_err_band"] < 0.05


def test_clip_is_configurable():
    x = np.full((1, 4, 4), 20.0, np.float32)
    stored, stats = encode_logits(x, Codec("int8", clip=24.0))
    assert logits_to_float(stored, Codec("int8", clip=24.0)).max() == pytest.approx(20.0, abs=0.1)
    assert stats["clipped"] == 0


def test_fp16_error_bound():
    x = np.linspace(-7.999, 7.999, 4096, dtype=np.float32).reshape(1, 64, 64)
    stored, stats = encode_logits(x, Codec("fp16"))
    assert stored.dtype == np.float16
    assert np.abs(logits_to_float(stored, Codec("fp16")) - x).max() <= 0.002
    assert stats["max_err_band"] <= 0.002


def test_encoded_logits_pass_through_and_bad_input_refused():
    codes = np.arange(-5, 11, dtype=np.int8).reshape(1, 4, 4)
    stored, stats = encode_logits(codes, Codec("int8"))
    assert stored is not None and (stored == codes).all() and stats["max_err_band"] is None
    with pytest.raises(CacheError, match="NaN"):
        encode_logits(np.full((1, 2, 2), np.nan, np.float32), Codec("int8"))
    with pytest.raises(CacheError, match="float32 or the stored dtype"):
        encode_logits(np.zeros((1, 2, 2), np.int32), Codec("int8"))


def test_dequantize_torch_matches_numpy():
    codes = np.array([[-127, -1, 0, 5, 127]], np.int8)
    codec = Codec("int8", clip=12.0)
    got = dequantize_torch(torch.from_numpy(codes), codec.scale)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), logits_to_float(codes, codec), rtol=1e-6)


@pytest.mark.parametrize("low", [16, 15, 1])
def test_pack_unpack_roundtrip(low):
    rng = np.random.default_rng(low)
    m = rng.uniform(size=(3, low, low)) < 0.5
    packed = pack_masks(m)
    assert packed.shape == (3, (low * low + 7) // 8) and packed.dtype == np.uint8
    assert (unpack_masks(packed, low) == m).all()
    assert unpack_masks(pack_masks(np.zeros((0, low, low), bool)), low).shape == (0, low, low)
    with pytest.raises(CacheError, match="bool"):
        pack_masks(m.astype(np.uint8))


@pytest.mark.parametrize("n", [1, 2, 3, 719, 720, 721, 5000, 65537])
def test_fletcher32_matches_hdf5(tmp_path, n):
    rng = np.random.default_rng(n)
    data = rng.integers(0, 256, n, dtype=np.uint8)
    if n == 5000:
        data[:] = 255  # sums that are multiples of 65535
    with h5py.File(tmp_path / "f.h5", "w") as f:
        d = f.create_dataset("d", data=data, chunks=(n,), fletcher32=True)
        _, raw = d.id.read_direct_chunk((0,))
    assert raw[:-4] == data.tobytes()
    assert int.from_bytes(raw[-4:], "little") == fletcher32(data.tobytes())


def test_shuffle_matches_hdf5_shuffle_filter(tmp_path):
    x = np.random.default_rng(1).normal(size=(4, 8, 8)).astype(np.float16)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        d = f.create_dataset("d", data=x, chunks=x.shape, shuffle=True)
        _, raw = d.id.read_direct_chunk((0, 0, 0))
    assert raw == numcodecs.Shuffle(elementsize=2).encode(x).tobytes()


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
@pytest.mark.parametrize("dtype", ["|i1", "<f2", "<f4", "|u1"])
def test_chunk_codec_roundtrip_and_corruption(backend, dtype):
    rng = np.random.default_rng(0)
    raw = (rng.normal(0, 20, (4, 16, 16))).astype(dtype)
    codec = chunk_codec(backend, dtype, 6)
    data = codec.encode(raw)
    out = np.empty_like(raw)
    codec.decode_into(data, out)
    assert (out == raw).all()
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0x10
    with pytest.raises(ChunkError, match="checksum"):
        codec.decode_into(bytes(flipped), out)
    with pytest.raises(ChunkError):
        codec.decode_into(data[:3], out)
    with pytest.raises(ChunkError, match="expected"):
        codec.decode_into(data, np.empty((5, 16, 16), dtype))


def test_zstd_content_size_parses_frames():
    for n in (0, 1, 255, 256, 300, 70_000, 2**20):
        frame = np.frombuffer(numcodecs.Zstd(level=1).encode(np.zeros(n, np.uint8)), np.uint8)
        assert zstd_content_size(frame) == n
    with pytest.raises(ChunkError, match="zstd"):
        zstd_content_size(np.zeros(10, np.uint8))


def test_unknown_codec_names_refused():
    with pytest.raises(CacheError):
        ChunkCodec("lz77", "crc32c", 1, 1)
    with pytest.raises(CacheError):
        Codec("int4")
    with pytest.raises(CacheError):
        Codec("int8", clip=0)
