"""What a cache must match: the one list, used by precompute (joining / resuming a cache), by
``cache merge`` and by the trainer (refusing a cache made with other settings).

* :data:`CONTENT_FIELDS` -- what the cached numbers depend on: teacher type, checkpoint sha256,
  image_size, logit codec (name, clip) and the generation parameters :data:`GENERATION_KEYS`
  (``params.<key>``), plus the dataset fingerprint of every split both sides know
  (``fingerprints.<split>``). A reader (the trainer) checks these.
* :data:`LAYOUT_FIELDS` -- how the bytes are laid out: format version, backend, rows per chunk,
  zstd level and the store flags. Writers that add shards to one cache, and caches merged into
  one, must agree on these as well.

Everything else is not compared: ``dataset_roots`` (the same data may live elsewhere), params
keys outside :data:`GENERATION_KEYS`, and settings that only change how the work is done
(``points_per_batch``, batch sizes, workers, devices). ``bf16`` is listed: bfloat16 autocast
changes the teacher's logits (by up to ~0.5 logit units) and therefore which masks pass the
thresholds, so a bf16 cache is another teacher output, not the same one computed faster.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from maskteacher.cache_format.errors import CacheError
from maskteacher.cache_format.schema import CacheHeader

#: Generation parameters a cache must match (``params.<key>``; precompute config keys).
#: ``maskteacher.models.everything.GenerationParams.header_params`` writes exactly these
#: (``hq_token_only`` only for SAM-HQ teachers).
GENERATION_KEYS = (
    "points_per_side",
    "pred_iou_thresh",
    "stability_score_thresh",
    "stability_score_offset",
    "box_nms_thresh",
    "max_masks_per_image",
    "multimask_output",
    "bf16",
    "mask_threshold",
    "generator",
    "hq_token_only",
    "strategy",
    "hierarchical_stride",
    "hierarchical_logit_thresh",
)
#: Listed keys a header records only where they change the output (``hq_token_only``: SAM-HQ
#: teachers; ``strategy`` and its parameters: only when not the full ``grid``, so caches made
#: before the key existed still match); absent on both sides they agree, and callers may leave
#: them out.
OPTIONAL_GENERATION_KEYS = (
    "hq_token_only",
    "strategy",
    "hierarchical_stride",
    "hierarchical_logit_thresh",
)

#: What an optional key a header does not record means (compared and shown as this value).
ABSENT_MEANS = {"strategy": "grid"}

#: What the cache content depends on (see the module docstring), in the order they are checked.
CONTENT_FIELDS = (
    "teacher_type",
    "checkpoint_sha256",
    "image_size",
    "codec.name",
    "codec.clip",
    *(f"params.{k}" for k in GENERATION_KEYS),
)

#: What the byte layout depends on (checked in addition when shards are added or merged).
LAYOUT_FIELDS = (
    "format_version",
    "backend",
    "rows_per_chunk",
    "codec.zstd_level",
    "store.teacher",
    "store.gt",
    "store.embedding",
    "store.tokens",
)


@dataclass(frozen=True)
class Mismatch:
    """One differing field: its flat name (e.g. ``params.bf16``), the cache's value, the other."""

    field: str
    have: Any
    want: Any


def dataset_fingerprint(entries: list[tuple[str, int]]) -> str:
    """Hash of a dataset split: sha256 over the sorted ``(image_id, file size in bytes)`` pairs.

    Returns ``"sha256:<hex>"``. Order-independent; any added, removed, renamed or resized image
    changes it.
    """
    h = hashlib.sha256()
    for image_id, size in sorted((str(i), int(s)) for i, s in entries):
        h.update(json.dumps([image_id, size]).encode())
        h.update(b"\n")
    return "sha256:" + h.hexdigest()


def identity(header: CacheHeader, *, layout: bool = False) -> dict[str, Any]:
    """The header's values of :data:`CONTENT_FIELDS` (and :data:`LAYOUT_FIELDS`), flat."""
    values: dict[str, Any] = {
        "teacher_type": header.teacher_type,
        "checkpoint_sha256": header.checkpoint_sha256,
        "image_size": int(header.image_size),
        "codec.name": header.codec.name,
        "codec.clip": float(header.codec.clip),
    }
    values.update(
        {f"params.{k}": header.params.get(k, ABSENT_MEANS.get(k)) for k in GENERATION_KEYS}
    )
    if layout:
        values.update(
            {
                "format_version": int(header.format_version),
                "backend": header.backend,
                "rows_per_chunk": int(header.rows_per_chunk),
                "codec.zstd_level": int(header.codec.zstd_level),
            }
        )
        values.update({f"store.{k}": v for k, v in header.store.to_json().items()})
    return values


def header_mismatch(
    have: CacheHeader, want: CacheHeader, *, layout: bool = True
) -> Mismatch | None:
    """The first field (format version, content, the rest of the layout, then fingerprints of
    splits both headers know) where two headers disagree; None when a writer / merge may
    combine them."""
    a, b = identity(have, layout=layout), identity(want, layout=layout)
    order = (*LAYOUT_FIELDS[:1], *CONTENT_FIELDS, *LAYOUT_FIELDS[1:]) if layout else CONTENT_FIELDS
    for name in order:
        if not same_value(a[name], b[name]):
            return Mismatch(name, a[name], b[name])
    for split in sorted(set(have.fingerprints) & set(want.fingerprints)):
        if have.fingerprints[split] != want.fingerprints[split]:
            return Mismatch(
                f"fingerprints.{split}", have.fingerprints[split], want.fingerprints[split]
            )
    return None


def expectation_mismatch(
    header: CacheHeader,
    *,
    teacher_type: str | None,
    image_size: int,
    params: dict[str, Any],
    codec_name: str,
    codec_clip: float,
    checkpoint_sha256: str | None = None,
    fingerprints: dict[str, str] | None = None,
) -> Mismatch | None:
    """For a reader (the trainer): the first of :data:`CONTENT_FIELDS` where the cache differs
    from what the caller's settings would have produced, or None.

    ``params`` must hold every key of :data:`GENERATION_KEYS` but the optional ones
    (``GenerationParams.header_params(hq=...)`` gives them; a missing key is a programming
    error, ValueError). ``teacher_type`` None: not checked here (a caller with its own rule, e.g.
    for SAM-HQ variants, checks it). ``checkpoint_sha256`` None: not checked (training from a
    cache needs no teacher weights). ``fingerprints``: only the listed splits are compared.
    """
    missing = [k for k in GENERATION_KEYS if k not in params and k not in OPTIONAL_GENERATION_KEYS]
    if missing:
        raise ValueError(f"expectation_mismatch: params lacks {', '.join(missing)}")
    want: dict[str, Any] = {
        "teacher_type": teacher_type,
        "checkpoint_sha256": checkpoint_sha256,
        "image_size": int(image_size),
        "codec.name": codec_name,
        "codec.clip": float(codec_clip),
    }
    want.update({f"params.{k}": params.get(k, ABSENT_MEANS.get(k)) for k in GENERATION_KEYS})
    have = identity(header)
    for name in CONTENT_FIELDS:
        if want[name] is None and name in ("teacher_type", "checkpoint_sha256"):
            continue
        if not same_value(have[name], want[name]):
            return Mismatch(name, have[name], want[name])
    for split, fp in sorted((fingerprints or {}).items()):
        if header.fingerprints.get(split) != fp:
            return Mismatch(f"fingerprints.{split}", header.fingerprints.get(split), fp)
    return None


def same_value(have: Any, want: Any) -> bool:
    """Equality where numbers compare by value (``12 == 12.0``) but a bool is not a number."""

    if isinstance(have, bool) or isinstance(want, bool):
        return type(have) is type(want) and have == want
    if isinstance(have, (int, float)) and isinstance(want, (int, float)):
        return float(have) == float(want)
    if isinstance(have, list) and isinstance(want, tuple):
        want = list(want)
    return have == want


#: ``expect`` keys that name header fields directly (anything else is looked up in ``params``).
_EXPECT_FIELDS = {
    "format_version": lambda h: h.format_version,
    "teacher_type": lambda h: h.teacher_type,
    "checkpoint_sha256": lambda h: h.checkpoint_sha256,
    "image_size": lambda h: h.image_size,
    "backend": lambda h: h.backend,
    "codec": lambda h: h.codec.name,
    "clip": lambda h: float(h.codec.clip),
    "store.teacher": lambda h: h.store.teacher,
    "store.gt": lambda h: h.store.gt,
    "store.embedding": lambda h: h.store.embedding,
    "store.tokens": lambda h: h.store.tokens,
}


def check_expect(header: CacheHeader, expect: dict[str, Any], where: str) -> None:
    """Refuse the cache when a named field differs from what the caller expects.

    Keys: ``format_version, teacher_type, checkpoint_sha256, image_size, backend, codec`` (name),
    ``clip``, ``store.<flag>``, ``fingerprints`` (a dict split -> fingerprint; only the listed
    splits are compared), and any other key is a generation parameter looked up in ``params``
    (``params.`` prefix optional). The error names the field and both values.
    """
    for key, want in expect.items():
        if key == "fingerprints":
            if not isinstance(want, dict):
                raise CacheError("expect['fingerprints'] must be a dict split -> fingerprint")
            for split, fp in want.items():
                have = header.fingerprints.get(split)
                if have != fp:
                    raise CacheError(
                        f"{where}: dataset fingerprint of split {split!r} is {have!r} in the cache "
                        f"but {fp!r} was expected (the dataset changed since the cache was made)"
                    )
            continue
        if key in _EXPECT_FIELDS:
            have, name = _EXPECT_FIELDS[key](header), key
        else:
            pkey = key.removeprefix("params.")
            name = f"params.{pkey}"
            if pkey not in header.params:
                raise CacheError(
                    f"{where}: field {name!r} is missing from the cache but {want!r} was expected"
                )
            have = header.params[pkey]
        if not same_value(have, want):
            raise CacheError(
                f"{where}: field {name!r} is {have!r} in the cache but {want!r} was expected"
            )
