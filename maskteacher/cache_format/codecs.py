"""Value codecs (teacher logits, bit-packed masks) and the byte codecs of stored chunks.

Logit codec (:class:`~maskteacher.cache_format.schema.Codec`):

* ``int8``: ``code = round(clip(x, -C, C) * 127 / C)``; ``x ~= code * C / 127``. The error inside
  ``|x| <= C`` is at most ``C / 254`` (0.047 for C = 12); values beyond ``±C`` saturate.
* ``fp16``: ``x.astype(float16)``; relative error 2**-11 (<= 0.002 for ``|x| < 8``).

Decoding returns the stored dtype; :func:`logits_to_float` (numpy) or ``codes.float() * scale``
(torch, see :func:`dequantize_torch`) converts where the float values are needed.

Chunk byte codecs are the exact byte pipelines of the two backends, so the fast reader can
decode a chunk's bytes without going through zarr or HDF5:

* zarr v3: ``bytes -> zstd -> crc32c`` (float16: ``bytes -> blosc(zstd, byte shuffle) -> crc32c``),
  i.e. the zstd frame followed by the little-endian crc32c of the frame.
* HDF5: filters ``[shuffle (float16 only), zstd (id 32015), fletcher32]``: the zstd frame followed
  by HDF5's fletcher32 of the frame (little-endian).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import google_crc32c
import numcodecs
import numpy as np

from maskteacher.cache_format.errors import CacheError
from maskteacher.cache_format.schema import Codec

#: |logit| below this is where the quantisation error is measured and bounded.
ERROR_BAND = 8.0


class ChunkError(ValueError):
    """A stored chunk failed its checksum or did not decode (callers add shard/image names)."""


# --------------------------------------------------------------------------------------------
# Logits


def encode_logits(logits: np.ndarray, codec: Codec) -> tuple[np.ndarray, dict[str, Any]]:
    """Encode float logits (N, L, L) float32 (low-res frame) to the stored dtype.

    Returns ``(stored, stats)`` where stats counts ``pixels``, ``clipped`` (|x| > clip for int8,
    beyond the float16 range for fp16), ``band_pixels`` (|x| < 8) and ``max_err_band`` (max
    |decode(encode(x)) - x| over those pixels, or None when there are none).
    Already-encoded input (int8 / float16) is passed through with ``max_err_band`` None.
    """
    x = np.asarray(logits)
    if x.dtype == codec.stored_dtype:
        return np.ascontiguousarray(x), {
            "pixels": int(x.size),
            "clipped": None,
            "band_pixels": 0,
            "max_err_band": None,
        }
    if x.dtype.kind != "f":
        raise CacheError(
            f"teacher_logits must be float32 or the stored dtype {codec.stored_dtype}, got {x.dtype}"
        )
    x = x.astype(np.float32, copy=False)
    a = np.abs(x)
    if x.size and not np.isfinite(a.max()):
        raise CacheError("teacher_logits contain NaN or infinite values")
    band = a < ERROR_BAND
    xb = x[band]
    if codec.name == "int8":
        clipped = int(np.count_nonzero(a > np.float32(codec.clip)))
        del a
        scaled = np.clip(x, -codec.clip, codec.clip, out=np.empty_like(x))
        scaled *= np.float32(127.0 / codec.clip)
        np.rint(scaled, out=scaled)
        stored = scaled.astype(np.int8)
        decoded_band = scaled[band] * np.float32(codec.clip / 127.0)
    else:
        clipped = int(np.count_nonzero(a > np.finfo(np.float16).max))
        stored = x.astype(np.float16)
        decoded_band = stored[band].astype(np.float32)
    err = float(np.abs(decoded_band - xb).max()) if xb.size else None
    return stored, {
        "pixels": int(x.size),
        "clipped": clipped,
        "band_pixels": int(xb.size),
        "max_err_band": err,
    }


def logits_to_float(codes: np.ndarray, codec: Codec | float) -> np.ndarray:
    """Stored logits (int8 codes or float16) -> float32 logits: ``scale * codes``.

    ``codec`` is the cache's :class:`Codec` (``reader.manifest.header.codec``) or its scale.
    """
    scale = codec.scale if isinstance(codec, Codec) else float(codec)
    out = np.asarray(codes).astype(np.float32)
    if scale != 1.0:
        out *= np.float32(scale)
    return out


def dequantize_torch(codes: Any, scale: float) -> Any:
    """Torch tensor of stored logits -> float32 logits on the tensor's device.

    ``codes.float() * scale``; written without importing torch (this package reads caches with
    numpy alone), so it takes any tensor-like object with ``.float()``.
    """
    out = codes.float()
    return out * scale if scale != 1.0 else out


def merge_quant_stats(stats: list[dict[str, Any]], codec: Codec) -> dict[str, Any]:
    """Sum per-image :func:`encode_logits` stats into the per-shard statistics."""
    pixels = sum(s["pixels"] for s in stats)
    measured = [s for s in stats if s["clipped"] is not None]
    clipped = sum(s["clipped"] for s in measured)
    measured_pixels = sum(s["pixels"] for s in measured)
    errs = [s["max_err_band"] for s in stats if s["max_err_band"] is not None]
    return {
        "codec": codec.name,
        "clip": float(codec.clip),
        "pixels": int(pixels),
        "measured_pixels": int(measured_pixels),
        "clipped_fraction": (clipped / measured_pixels) if measured_pixels else None,
        "band_pixels": int(sum(s["band_pixels"] for s in stats)),
        "max_err_band": max(errs) if errs else None,
    }


# --------------------------------------------------------------------------------------------
# Bit-packed masks


def packed_row_bytes(low_res: int) -> int:
    """Bytes of one bit-packed (L, L) mask: ceil(L * L / 8)."""
    return (low_res * low_res + 7) // 8


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """(M, L, L) bool -> (M, ceil(L*L/8)) uint8, ``np.packbits`` of each flattened mask (big bit order)."""
    m = np.asarray(masks)
    if m.dtype != np.bool_:
        raise CacheError(f"gt_masks must be bool, got {m.dtype}")
    if m.ndim != 3:
        raise CacheError(f"gt_masks must be (M, L, L), got shape {m.shape}")
    return np.packbits(m.reshape(m.shape[0], m.shape[1] * m.shape[2]), axis=1)


def unpack_masks(packed: np.ndarray, low_res: int) -> np.ndarray:
    """Inverse of :func:`pack_masks`: (M, ceil(L*L/8)) uint8 -> (M, L, L) bool."""
    flat = np.unpackbits(packed, axis=1, count=low_res * low_res)
    return flat.view(np.bool_).reshape(packed.shape[0], low_res, low_res)


# --------------------------------------------------------------------------------------------
# Chunk byte codecs


def fletcher32(data: bytes | memoryview | np.ndarray) -> int:
    """HDF5's fletcher32 checksum (``H5_checksum_fletcher32``) of a byte string.

    HDF5 sums big-endian 16-bit words with end-around-carry reductions; the result equals
    ``f(S)`` for the plain sums S, with ``f(0) = 0`` and ``f(S) = (S - 1) % 65535 + 1``
    otherwise, which is what we compute (vectorised). Tested against h5py's own filter.
    """
    a = np.frombuffer(data, np.uint8)
    if a.size % 2:
        a = np.concatenate([a, np.zeros(1, np.uint8)])
    words = a.view(">u2").astype(np.int64)
    n = words.size
    if n == 0:
        return 0
    s1 = int(words.sum())
    # sum2 = sum over prefixes = sum_i (n - i) * w_i = n * s1 - sum_i i * w_i
    s2 = n * s1 - int(np.dot(words, _ramp(n)))

    def fold(s: int) -> int:
        return 0 if s == 0 else (s - 1) % 65535 + 1

    return (fold(s2) << 16) | fold(s1)


_RAMP = np.arange(0, dtype=np.int64)


def _ramp(n: int) -> np.ndarray:
    global _RAMP
    if _RAMP.size < n:
        _RAMP = np.arange(max(n, 2 * _RAMP.size), dtype=np.int64)
    return _RAMP[:n]


def _crc32c(body: Any) -> int:
    return google_crc32c.value(body)


#: integrity trailer name -> checksum function of the compressed body (4 bytes little-endian).
INTEGRITY = {"crc32c": _crc32c, "fletcher32": fletcher32}


@dataclass(frozen=True)
class ChunkCodec:
    """Byte pipeline of one stored array's chunks (see module docstring).

    ``compressor``: ``zstd`` | ``shuffle+zstd`` (HDF5 shuffle filter, then zstd) |
    ``blosc-zstd-shuffle`` (zarr ``blosc`` codec, zstd inside, byte shuffle);
    ``integrity``: ``crc32c`` | ``fletcher32``.
    """

    compressor: str
    integrity: str
    level: int
    itemsize: int

    def __post_init__(self) -> None:
        if self.compressor not in _COMPRESSORS:
            raise CacheError(f"unknown chunk compressor {self.compressor!r}")
        if self.integrity not in INTEGRITY:
            raise CacheError(f"unknown chunk integrity check {self.integrity!r}")

    def encode(self, raw: np.ndarray) -> bytes:
        """C-contiguous array -> stored chunk bytes (compressed body + 4-byte checksum)."""
        body = bytes(_COMPRESSORS[self.compressor][0](self, np.ascontiguousarray(raw)))
        return body + int(INTEGRITY[self.integrity](body)).to_bytes(4, "little")

    def check(self, data: bytes | memoryview) -> np.ndarray:
        """Verify the trailer and return the compressed body (a read-only uint8 view)."""
        buf = np.frombuffer(data, np.uint8)
        if buf.size < 5:
            raise ChunkError(f"chunk of {buf.size} bytes is too short")
        body = buf[:-4]
        stored = int.from_bytes(buf[-4:].tobytes(), "little")
        if INTEGRITY[self.integrity](body) != stored:
            raise ChunkError(f"{self.integrity} checksum mismatch")
        return body

    def decode_into(self, data: bytes | memoryview, out: np.ndarray) -> None:
        """Verify and decompress one chunk into ``out`` (C-contiguous, exactly the chunk's size)."""
        body = self.check(data)
        try:
            _COMPRESSORS[self.compressor][1](self, body, out)
        except ChunkError:
            raise
        except Exception as exc:  # the decompressors raise RuntimeError / ValueError on bad input
            raise ChunkError(f"{self.compressor} decode failed: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        return {"compressor": self.compressor, "integrity": self.integrity, "level": self.level}


def _zstd_enc(c: ChunkCodec, raw: np.ndarray) -> bytes:
    return numcodecs.Zstd(level=c.level).encode(raw)


def _zstd_dec(c: ChunkCodec, body: np.ndarray, out: np.ndarray) -> None:
    _expect_size(zstd_content_size(body), out)
    numcodecs.Zstd().decode(body, out=out.reshape(-1).view(np.uint8))


def _shuffle_zstd_enc(c: ChunkCodec, raw: np.ndarray) -> bytes:
    shuffled = numcodecs.Shuffle(elementsize=c.itemsize).encode(raw)
    return numcodecs.Zstd(level=c.level).encode(shuffled)


def _shuffle_zstd_dec(c: ChunkCodec, body: np.ndarray, out: np.ndarray) -> None:
    _expect_size(zstd_content_size(body), out)
    tmp = np.empty(out.nbytes, np.uint8)
    numcodecs.Zstd().decode(body, out=tmp)
    numcodecs.Shuffle(elementsize=c.itemsize).decode(tmp, out=out.reshape(-1).view(np.uint8))


def _blosc(c: ChunkCodec) -> numcodecs.Blosc:
    return numcodecs.Blosc(
        cname="zstd", clevel=min(c.level, 9), shuffle=numcodecs.Blosc.SHUFFLE, blocksize=0
    )


def _blosc_enc(c: ChunkCodec, raw: np.ndarray) -> bytes:
    # blosc takes the shuffle item size from the array's dtype
    return _blosc(c).encode(raw)


def _blosc_dec(c: ChunkCodec, body: np.ndarray, out: np.ndarray) -> None:
    if body.size < 16:
        raise ChunkError("blosc chunk shorter than its 16-byte header")
    # blosc1 header: version, versionlz, flags, typesize, nbytes (uint32 LE), blocksize, cbytes
    _expect_size(int.from_bytes(body[4:8].tobytes(), "little"), out)
    _blosc(c).decode(body, out=out.reshape(-1).view(np.uint8))


def _expect_size(size: int, out: np.ndarray) -> None:
    if size != out.nbytes:
        raise ChunkError(f"chunk holds {size} bytes, expected {out.nbytes}")


def zstd_content_size(frame: np.ndarray) -> int:
    """Decompressed size declared in a zstd frame header (RFC 8878, 3.1.1.1).

    numcodecs decodes into a larger buffer without complaint, so the size is checked first;
    frames without a declared size (streaming frames) are refused: our writers never make them.
    """
    if frame.size < 6 or frame[:4].tobytes() != b"\x28\xb5\x2f\xfd":
        raise ChunkError("not a zstd frame")
    fhd = int(frame[4])
    fcs_flag, single_segment, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    pos = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    nbytes = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if nbytes == 0:
        raise ChunkError("zstd frame does not declare its content size")
    if frame.size < pos + nbytes:
        raise ChunkError("truncated zstd frame header")
    size = int.from_bytes(frame[pos : pos + nbytes].tobytes(), "little")
    return size + 256 if nbytes == 2 else size


_COMPRESSORS = {
    "zstd": (_zstd_enc, _zstd_dec),
    "shuffle+zstd": (_shuffle_zstd_enc, _shuffle_zstd_dec),
    "blosc-zstd-shuffle": (_blosc_enc, _blosc_dec),
}
