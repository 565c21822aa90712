"""What a writer does to a record before storing it: check it, then encode it into array rows.

:func:`check_record` validates a :class:`~.schema.CacheRecord` against the header (ids, split,
sizes, shapes, which parts the cache stores) and raises CacheError naming the image and the
field; :func:`encode_record` turns a checked record into one block of rows per stored array
(quantised logits, ``teacher_meta`` columns as :mod:`.schema` lays them out, bit-packed masks,
float16 tokens / embedding) and the row count of each CSR row space.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from maskteacher.cache_format.codecs import encode_logits, pack_masks
from maskteacher.cache_format.errors import CacheError
from maskteacher.cache_format.schema import (
    EMBEDDING,
    GT_MASKS,
    META_FIELDS,
    TEACHER_LOGITS,
    TEACHER_META,
    TEACHER_TOKENS,
    CacheHeader,
    CacheRecord,
    pack_meta,
)


def check_record(rec: CacheRecord, header: CacheHeader, split: str) -> None:
    """CacheError naming the image and the field when ``rec`` cannot go into a shard of
    ``split`` of a cache made with ``header`` (shapes of the array fields are checked by
    :func:`encode_record`, which needs them anyway)."""
    if not isinstance(rec.image_id, str) or not rec.image_id or "\x00" in rec.image_id:
        raise CacheError(f"image_id must be a non-empty string, got {rec.image_id!r}")
    who = f"image {rec.image_id!r}"
    if rec.split != split:
        raise CacheError(f"{who}: split {rec.split!r} given to a writer of split {split!r}")
    if rec.source is not None and (not isinstance(rec.source, str) or "\x00" in rec.source):
        raise CacheError(f"{who}: source must be a string without NUL characters, or None")
    for name in ("orig_hw", "input_hw"):
        hw = np.asarray(getattr(rec, name))
        if hw.shape != (2,) or hw.dtype.kind not in "iu" or (hw <= 0).any() or (hw >= 2**31).any():
            raise CacheError(f"{who}: {name} must be two positive ints, got {hw!r}")
    if max(int(v) for v in rec.input_hw) > header.image_size:
        raise CacheError(
            f"{who}: input_hw {list(rec.input_hw)} exceeds image_size {header.image_size}"
        )
    store = header.store
    extra = [
        (
            not store.teacher and (rec.num_masks or rec.tokens is not None),
            "teacher masks",
            "teacher",
        ),
        (store.teacher and not store.tokens and rec.tokens is not None, "tokens", "tokens"),
        (not store.gt and rec.num_gt, "ground-truth masks", "gt"),
        (not store.embedding and rec.embedding is not None, "an embedding", "embedding"),
    ]
    for bad, what, flag in extra:
        if bad:
            raise CacheError(
                f"{who}: record has {what} but the cache does not store them (store.{flag} is false)"
            )
    for missing, what, flag in (
        (store.tokens and rec.tokens is None, "tokens", "tokens"),
        (store.embedding and rec.embedding is None, "embedding", "embedding"),
    ):
        if missing:
            raise CacheError(f"{who}: store.{flag} is set but the record has no {what}")


def encode_record(
    rec: CacheRecord, header: CacheHeader
) -> tuple[dict[str, np.ndarray], dict[str, int], dict[str, Any] | None]:
    """Rows per stored array, row counts per CSR space and the logit statistics (None when the
    cache stores no teacher) of a record that passed :func:`check_record`."""
    who = f"image {rec.image_id!r}"
    low, store = header.low_res, header.store
    arrays: dict[str, np.ndarray] = {}
    stats = None
    n = int(np.shape(rec.teacher_logits)[0]) if store.teacher else 0
    if store.teacher:
        _shape(who, "teacher_logits", rec.teacher_logits, (n, low, low))
        try:
            arrays[TEACHER_LOGITS], stats = encode_logits(rec.teacher_logits, header.codec)
            arrays[TEACHER_META] = pack_meta({k: getattr(rec, k) for k in META_FIELDS}, n)
        except CacheError as exc:
            raise CacheError(f"{who}: {exc}") from None
        if store.tokens:
            tokens = np.asarray(rec.tokens)
            _shape(who, "tokens", tokens, (n, tokens.shape[1] if tokens.ndim == 2 else -1))
            arrays[TEACHER_TOKENS] = _finite16(who, "tokens", tokens)
    m = int(np.shape(rec.gt_masks)[0]) if store.gt else 0
    if store.gt:
        _shape(who, "gt_masks", rec.gt_masks, (m, low, low))
        try:
            arrays[GT_MASKS] = pack_masks(np.asarray(rec.gt_masks))
        except CacheError as exc:
            raise CacheError(f"{who}: {exc}") from None
    if store.embedding:
        emb = np.asarray(rec.embedding)
        e = header.embed_size
        _shape(who, "embedding", emb, (emb.shape[0] if emb.ndim == 3 else -1, e, e))
        arrays[EMBEDDING] = _finite16(who, "embedding", emb)[None]
    counts = {"teacher": n, "gt": m, "image": 1 if store.embedding else 0}
    return arrays, counts, stats


def _shape(who: str, name: str, value: Any, shape: tuple[int, ...]) -> None:
    got = tuple(np.shape(value))
    if len(got) != len(shape) or any(w >= 0 and g != w for g, w in zip(got, shape)):
        want = str(tuple(shape)).replace("-1", "C")
        raise CacheError(f"{who}: {name} has shape {got}, expected {want}")


def _finite16(who: str, name: str, value: np.ndarray) -> np.ndarray:
    if value.dtype.kind != "f":
        raise CacheError(f"{who}: {name} must be floating point, got {value.dtype}")
    out = value.astype(np.float16)
    if not np.isfinite(out).all():
        raise CacheError(f"{who}: {name} has NaN or values beyond the float16 range")
    return out
