"""Issue 12 item 5: one list of what a cache must match (cache_format.identity), used by
init_cache (precompute joining / resuming), cache merge and the trainer's check."""

from __future__ import annotations

import dataclasses

import pytest

from maskteacher.cache_format import (
    CONTENT_FIELDS,
    GENERATION_KEYS,
    LAYOUT_FIELDS,
    CacheError,
    CacheMismatch,
    Codec,
    StoreFlags,
    expectation_mismatch,
    init_cache,
)
from maskteacher.cache_format.merge import merge_caches

FULL_PARAMS = {
    "points_per_side": 8,
    "pred_iou_thresh": 0.88,
    "stability_score_thresh": 0.95,
    "stability_score_offset": 1.0,
    "box_nms_thresh": 0.7,
    "max_masks_per_image": None,
    "multimask_output": True,
    "bf16": False,
    "mask_threshold": 0.0,
    "generator": "maskteacher.everything/1",
    "hq_token_only": False,
    "strategy": "hierarchical",
    "hierarchical_stride": 4,
    "hierarchical_logit_thresh": 8.5,
}


def _other(value):
    if isinstance(value, bool):
        return not value
    if value is None:
        return 50
    if isinstance(value, (int, float)):
        return value + 1
    return value + "-other"


def changed(header, name: str):
    """``header`` with the listed field ``name`` set to another value."""
    replace = dataclasses.replace
    if name.startswith("params."):
        key = name.removeprefix("params.")
        return replace(header, params={**header.params, key: _other(header.params[key])})
    if name.startswith("store."):
        flag = name.removeprefix("store.")
        store = header.store.to_json()
        store[flag] = not store[flag]
        if flag == "teacher":
            store["tokens"] = False
        return replace(header, store=StoreFlags(**store))
    codec = header.codec
    return {
        "teacher_type": lambda: replace(header, teacher_type="vit_h"),
        "checkpoint_sha256": lambda: replace(header, checkpoint_sha256="cd" * 32),
        "image_size": lambda: replace(header, image_size=128),
        "codec.name": lambda: replace(header, codec=Codec("fp16", codec.clip, codec.zstd_level)),
        "codec.clip": lambda: replace(header, codec=Codec(codec.name, 8.0, codec.zstd_level)),
        "codec.zstd_level": lambda: replace(header, codec=Codec(codec.name, codec.clip, 3)),
        "format_version": lambda: replace(header, format_version=1),
        "backend": lambda: replace(header, backend="hdf5"),
        "rows_per_chunk": lambda: replace(header, rows_per_chunk=8),
    }[name]()


UNLISTED = {
    "params.points_per_batch": lambda h: dataclasses.replace(
        h, params={**h.params, "points_per_batch": 7}
    ),
    "params.note": lambda h: dataclasses.replace(h, params={**h.params, "note": "made on node 7"}),
    "dataset_roots": lambda h: dataclasses.replace(h, dataset_roots={"train": "/elsewhere"}),
    "a new split": lambda h: dataclasses.replace(
        h, fingerprints={**h.fingerprints, "val": "sha256:v"}
    ),
}


@pytest.fixture
def base(make_header):
    return make_header(params=dict(FULL_PARAMS), store=StoreFlags(embedding=True))


def test_the_lists_cover_every_generation_key():
    assert [f for f in CONTENT_FIELDS if f.startswith("params.")] == [
        f"params.{k}" for k in GENERATION_KEYS
    ]
    assert "params.bf16" in CONTENT_FIELDS and "params.points_per_batch" not in CONTENT_FIELDS
    assert not set(CONTENT_FIELDS) & set(LAYOUT_FIELDS)


@pytest.mark.parametrize("name", [*CONTENT_FIELDS, *LAYOUT_FIELDS, "fingerprints.train"])
def test_init_cache_and_merge_refuse_each_listed_field(tmp_path, base, name):
    other = (
        dataclasses.replace(base, fingerprints={"train": "sha256:other"})
        if name == "fingerprints.train"
        else changed(base, name)
    )
    init_cache(tmp_path / "a", base)
    with pytest.raises(CacheMismatch, match=name.replace(".", r"\.")) as info:
        init_cache(tmp_path / "a", other)
    assert info.value.field == name
    if name != "format_version":  # merge refuses format-1 inputs earlier (upgrade first)
        init_cache(tmp_path / "b", other)
        with pytest.raises(CacheError, match=f"cannot merge .*: {name.replace('.', '[.]')} is "):
            merge_caches(tmp_path / "m", [tmp_path / "a", tmp_path / "b"])


@pytest.mark.parametrize("name", sorted(UNLISTED))
def test_unlisted_fields_are_not_compared(tmp_path, base, name):
    other = UNLISTED[name](base)
    init_cache(tmp_path / "a", base)
    init_cache(tmp_path / "a", other)  # a writer with this difference may join
    init_cache(tmp_path / "b", other)
    merged = merge_caches(tmp_path / "m", [tmp_path / "a", tmp_path / "b"])
    assert merged.images == 0


def _expect(header, **change):
    kw = dict(
        teacher_type=header.teacher_type,
        image_size=header.image_size,
        params=dict(header.params),
        codec_name=header.codec.name,
        codec_clip=header.codec.clip,
        checkpoint_sha256=header.checkpoint_sha256,
        fingerprints=dict(header.fingerprints),
    )
    kw.update(change)
    return expectation_mismatch(header, **kw)


def test_the_trainer_check_refuses_each_content_field(base):
    assert _expect(base) is None
    assert _expect(base, checkpoint_sha256=None) is None  # no weights at hand: not checked
    assert _expect(base, params={**base.params, "points_per_batch": 3}) is None
    for name in CONTENT_FIELDS:
        other = changed(base, name)
        found = _expect(
            base,
            teacher_type=other.teacher_type,
            image_size=other.image_size,
            params=other.params,
            codec_name=other.codec.name,
            codec_clip=other.codec.clip,
            checkpoint_sha256=other.checkpoint_sha256,
        )
        assert found is not None and found.field == name, name
    found = _expect(base, fingerprints={"train": "sha256:new"})
    assert (found.field, found.have, found.want) == ("fingerprints.train", "sha256:t", "sha256:new")
    sam = dataclasses.replace(
        base, params={k: v for k, v in base.params.items() if k != "hq_token_only"}
    )
    assert _expect(sam, params=dict(sam.params)) is None  # recorded only for SAM-HQ teachers
    assert _expect(base, teacher_type=None) is None  # the caller checks the type its own way
    with pytest.raises(ValueError, match="params lacks bf16"):
        _expect(base, params={k: v for k, v in base.params.items() if k != "bf16"})
