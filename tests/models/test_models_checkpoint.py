"""Checkpoint reading / loading / detection / export, with tiny random models."""

from __future__ import annotations

import hashlib
import warnings

import pytest
import torch
from segment_anything import sam_model_registry

from maskteacher.errors import UserError
from maskteacher.models import (
    HQ_VARIANTS,
    SAM_TYPES,
    build_sam,
    detect_backbone,
    export_official,
    load_checkpoint,
    read_state_dict,
    sha256_file,
)
from maskteacher.models.backbone import registry_signatures


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text and "\n" not in text
    return text


def _assert_state_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    actual = model.state_dict()
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


@pytest.fixture
def tiny_state(randomize) -> dict[str, torch.Tensor]:
    """Random vit_b_tiny weights (image_size 64), cloned."""
    model = build_sam("vit_b_tiny", image_size=64)
    return {k: v.clone() for k, v in randomize(model, seed=3).items()}


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: sd, id="flat"),
        pytest.param(lambda sd: {"model": sd, "step": 7, "config": {"lr": 1e-4}}, id="model"),
        pytest.param(lambda sd: {"state_dict": sd, "epoch": 2}, id="state_dict"),
        pytest.param(lambda sd: {"model": {"state_dict": sd}}, id="nested"),
        pytest.param(lambda sd: {f"module.{k}": v for k, v in sd.items()}, id="ddp-prefix"),
        pytest.param(
            lambda sd: {"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}},
            id="wrapped-ddp-compile-prefix",
        ),
    ],
)
def test_wrapped_and_prefixed_checkpoints_load_exactly(wrap, tiny_state, tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(tiny_state), path)
    assert set(read_state_dict(path)) == set(tiny_state)
    model = build_sam("vit_b_tiny", image_size=64)
    report = load_checkpoint(model, path)
    assert report.exact and len(report.loaded) == len(tiny_state)
    _assert_state_equal(model, tiny_state)


def test_legacy_torch_format_is_read(tiny_state, tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save(tiny_state, path, _use_new_zipfile_serialization=False)
    model = build_sam("vit_b_tiny", path, image_size=64)
    _assert_state_equal(model, tiny_state)


def test_half_precision_checkpoint_loads_into_float_model(tiny_state, tmp_path):
    path = tmp_path / "fp16.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in tiny_state.items()}, path)
    model = build_sam("vit_b_tiny", path, image_size=64)
    weight = model.mask_decoder.iou_token.weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, tiny_state["mask_decoder.iou_token.weight"].half().float())


class _Payload:
    """A class a malicious checkpoint could pickle."""


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "checkpoint file not found: "),
        (b"", "is not a readable PyTorch checkpoint"),
        (b"definitely not a checkpoint" * 20, "is not a readable PyTorch checkpoint"),
        (b"PK\x03\x04truncated zip", "is not a readable PyTorch checkpoint"),
        ({"a": _Payload()}, "contains pickled Python objects (test_models_checkpoint._Payload)"),
        ({"step": 3, "lr": 0.1}, "is not a state dict: expected a non-empty mapping of names"),
        ({}, "is not a state dict"),
        (torch.zeros(3), "is not a state dict"),
    ],
    ids=[
        "missing",
        "empty",
        "garbage",
        "bad-zip",
        "pickled-object",
        "no-tensors",
        "empty-dict",
        "tensor",
    ],
)
def test_unreadable_checkpoints_give_one_line_user_error(content, message, tmp_path):
    path = tmp_path / "bad.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(UserError) as info:
        read_state_dict(path)
    text = _one_line(info)
    assert message in text and str(path) in text
    model = build_sam("vit_b_tiny", image_size=64)
    with pytest.raises(UserError):
        load_checkpoint(model, path)


def test_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError) as info:
        read_state_dict(tmp_path)
    assert _one_line(info) == f"checkpoint path is not a file: {tmp_path}"


# ----------------------------------------------------------------------------- strictness


def test_hq_style_checkpoint_strict_fails_and_non_strict_reports_extra_keys(tiny_state, tmp_path):
    extra = {
        "mask_decoder.hf_token.weight": torch.randn(1, 64),
        "mask_decoder.hf_mlp.layers.0.weight": torch.randn(64, 64),
        "mask_decoder.hf_mlp.layers.0.bias": torch.randn(64),
        "mask_decoder.compress_vit_feat.0.weight": torch.randn(64, 64, 2, 2),
        "mask_decoder.embedding_encoder.0.weight": torch.randn(16, 64, 2, 2),
    }
    path = tmp_path / "hq.pth"
    torch.save({"model": {**tiny_state, **extra}}, path)

    model = build_sam("vit_b_tiny", image_size=64)
    with pytest.raises(UserError) as info:
        load_checkpoint(model, path)
    text = _one_line(info)
    assert (
        "5 unexpected (mask_decoder.hf_token.weight, mask_decoder.hf_mlp.* (2), "
        "mask_decoder.compress_vit_feat.0.weight, mask_decoder.embedding_encoder.0.weight)"
    ) in text
    assert "strict: false" in text
    with pytest.raises(UserError):
        build_sam("vit_b_tiny", path, image_size=64)

    report = load_checkpoint(model, path, strict=False)
    assert sorted(report.unexpected) == sorted(extra)
    assert not report.missing and not report.mismatched and not report.exact
    assert report.checkpoint_type == "vit_b_tiny"
    _assert_state_equal(model, tiny_state)
    assert "not loaded: 5 unexpected" in report.summary()
    _assert_state_equal(build_sam("vit_b_tiny", path, image_size=64, strict=False), tiny_state)


def test_missing_and_mismatched_keys(tiny_state, tmp_path):
    state = dict(tiny_state)
    del state["mask_decoder.iou_token.weight"]
    state["mask_decoder.mask_tokens.weight"] = torch.randn(5, 64)  # model has (4, 64)
    path = tmp_path / "partial.pth"
    torch.save(state, path)

    model = build_sam("vit_b_tiny", image_size=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as info:
        load_checkpoint(model, path)
    text = _one_line(info)
    assert "1 missing (mask_decoder.iou_token.weight)" in text
    assert "1 with another shape (mask_decoder.mask_tokens.weight [5, 64] vs model [4, 64])" in text
    _assert_state_equal(model, before)  # strict failure loads nothing

    report = load_checkpoint(model, path, strict=False)
    assert report.missing == ["mask_decoder.iou_token.weight"]
    assert report.mismatched == [("mask_decoder.mask_tokens.weight", (5, 64), (4, 64))]
    after = model.state_dict()
    for key in ("mask_decoder.iou_token.weight", "mask_decoder.mask_tokens.weight"):
        assert torch.equal(after[key], before[key])  # not loaded: the model keeps its own
    assert torch.equal(
        after["image_encoder.patch_embed.proj.weight"],
        tiny_state["image_encoder.patch_embed.proj.weight"],
    )
    assert len(report.loaded) == len(tiny_state) - 2


# ----------------------------------------------------------------------------- backbones


def test_detect_backbone_names_every_registry_entry():
    signatures = registry_signatures()
    assert len(set(signatures.values())) == len(SAM_TYPES)  # all distinguishable
    for model_type in SAM_TYPES:
        with torch.device("meta"):
            model = build_sam(model_type, image_size=64)
        assert detect_backbone(model.state_dict()) == model_type
    for model_type, hq_type in HQ_VARIANTS.items():  # SAM-HQ keeps its SAM type's encoder
        with torch.device("meta"):
            model = build_sam(hq_type, image_size=64)
        assert detect_backbone(model.state_dict()) == model_type
    decoder_only = {k: v for k, v in build_sam("vit_b_tiny", image_size=64).state_dict().items()}
    decoder_only = {k: v for k, v in decoder_only.items() if not k.startswith("image_encoder.")}
    assert detect_backbone(decoder_only) is None
    assert (
        detect_backbone({"image_encoder.patch_embed.proj.weight": torch.zeros(7, 3, 16, 16)})
        is None
    )


def _vit_h_like_state() -> dict[str, torch.Tensor]:
    """The encoder keys that identify SAM-H (32 blocks of width 1280), without its 2.5 GB."""
    state = {"image_encoder.patch_embed.proj.weight": torch.zeros(1280, 3, 1, 1)}
    for i in range(32):
        state[f"image_encoder.blocks.{i}.norm1.weight"] = torch.ones(1280)
    return state


def test_checkpoint_for_another_backbone_names_it_in_one_line(tmp_path):
    path = tmp_path / "sam_vit_h.pth"
    torch.save(_vit_h_like_state(), path)
    model = build_sam("vit_b", image_size=64)
    for strict in (True, False):
        with pytest.raises(UserError) as info:
            load_checkpoint(model, path, strict=strict)
        assert _one_line(info) == (
            f"checkpoint {path} has 32 encoder blocks of width 1280 (vit_h); "
            "model.type is vit_b (12 encoder blocks of width 768)"
        )


def test_tiny_vit_checkpoint_into_vit_model_is_refused(tmp_path):
    path = tmp_path / "student.pth"
    export_official(build_sam("vit_t_tiny", image_size=64), path)
    with pytest.raises(UserError) as info:
        build_sam("vit_b_tiny", path, image_size=64)
    assert _one_line(info) == (
        f"checkpoint {path} has a TinyViT encoder with 1/1/1/1 blocks per stage of widths "
        "16/32/48/64 (vit_t_tiny); model.type is vit_b_tiny (2 encoder blocks of width 64)"
    )


# ----------------------------------------------------------------------------- image size


def test_vit_checkpoint_for_another_image_size_is_resized(randomize, tmp_path):
    source = build_sam("vit_b_tiny", image_size=128)
    randomize(source, seed=5)
    with torch.no_grad():  # a per-channel constant position table stays constant when resized
        source.image_encoder.pos_embed.copy_(
            torch.arange(64.0).view(1, 1, 1, 64).expand(1, 8, 8, 64)
        )
    path = tmp_path / "at128.pth"
    export_official(source, path)

    target = build_sam("vit_b_tiny", image_size=64)
    report = load_checkpoint(target, path)
    assert report.exact
    assert report.resized == [
        ("image_encoder.pos_embed", (1, 8, 8, 64), (1, 4, 4, 64)),
        ("image_encoder.blocks.1.attn.rel_pos_h", (15, 32), (7, 32)),
        ("image_encoder.blocks.1.attn.rel_pos_w", (15, 32), (7, 32)),
    ]  # block 0 is windowed (window 4): its rel_pos does not depend on the image size
    pos = target.image_encoder.pos_embed
    assert torch.allclose(pos, torch.arange(64.0).view(1, 1, 1, 64).expand(1, 4, 4, 64), atol=1e-5)
    src_state, dst_state = source.state_dict(), target.state_dict()
    assert torch.equal(
        dst_state["image_encoder.blocks.0.attn.rel_pos_h"],
        src_state["image_encoder.blocks.0.attn.rel_pos_h"],
    )
    with torch.no_grad():
        assert torch.isfinite(target.image_encoder(torch.randn(1, 3, 64, 64))).all()


def test_tiny_vit_weights_do_not_depend_on_image_size(randomize, tmp_path):
    source = build_sam("vit_t_tiny", image_size=256)
    state = {k: v.clone() for k, v in randomize(source, seed=6).items()}
    path = tmp_path / "at256.pth"
    export_official(source, path)
    target = build_sam("vit_t_tiny", image_size=64)
    report = load_checkpoint(target, path)
    assert report.exact and report.resized == []
    _assert_state_equal(target, state)


# ----------------------------------------------------------------------------- export / hash


def test_export_official_is_atomic(tiny_state, tmp_path, monkeypatch):
    model = build_sam("vit_b_tiny", image_size=64)
    model.load_state_dict(tiny_state)
    path = tmp_path / "out" / "student.pth"
    export_official(model, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["student.pth"]
    first = path.read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_official(build_sam("vit_b_tiny", image_size=64), path)
    assert path.read_bytes() == first  # the old file is untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["student.pth"]  # no temp left


def test_exported_file_is_a_plain_flat_state_dict(tiny_state, tmp_path, caplog):
    model = build_sam("vit_b_tiny", image_size=64)
    model.load_state_dict(tiny_state)
    path = tmp_path / "plain.pth"
    with caplog.at_level("WARNING", logger="maskteacher.models.checkpoint"):
        export_official(model, path)
    assert "official builders expect 1024" in caplog.text  # vit_b_tiny at 64 is not 1024-shaped
    raw = torch.load(path, weights_only=True)
    assert type(raw) is dict and set(raw) == set(tiny_state)
    assert all(v.device.type == "cpu" for v in raw.values())


def test_export_strips_ddp_and_compile_prefixes(tiny_state, tmp_path):
    class Wrapper(torch.nn.Module):  # state-dict keys like DistributedDataParallel's
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = build_sam("vit_b_tiny", image_size=64)
    model.load_state_dict(tiny_state)
    path = tmp_path / "from_ddp.pth"
    export_official(Wrapper(model), path)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == set(tiny_state)


def test_export_loads_in_segment_anything_registry_vit_b(randomize, tmp_path):
    """segment-anything's own builder (1024 input) accepts our vit_b export; ~5 s on 2 cores."""
    ours = build_sam("vit_b")
    state = randomize(ours, seed=7)
    path = tmp_path / "vit_b.pth"
    export_official(ours, path)
    official = sam_model_registry["vit_b"](checkpoint=str(path))
    official_state = official.state_dict()
    assert set(official_state) == set(state)
    for key, value in state.items():
        assert torch.equal(official_state[key], value), key


@pytest.mark.ref
def test_export_loads_in_mobile_sam_registry_vit_t(mobile_sam, randomize, tmp_path):
    ours = build_sam("vit_t")
    state = randomize(ours, seed=8)
    path = tmp_path / "mobile_sam.pt"
    export_official(ours, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = mobile_sam.sam_model_registry["vit_t"](checkpoint=str(path))
    reference_state = reference.state_dict()
    assert set(reference_state) == set(state)
    for key, value in state.items():
        assert torch.equal(reference_state[key], value), key


def test_sha256_file_streams_the_file(tmp_path):
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 9000  # > 1 MiB chunk
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    with pytest.raises(UserError, match="file not found"):
        sha256_file(tmp_path / "nope.bin")


def test_non_strict_loading_that_matches_nothing_is_an_error(tmp_path):
    """``strict: false`` loads what matches; a file matching no tensor at all (another kind of
    model, renamed keys) would leave the model random while the run goes on: refused."""
    renamed = {
        f"backbone.{k}": v for k, v in build_sam("vit_b_tiny", image_size=64).state_dict().items()
    }
    path = tmp_path / "renamed.pth"
    torch.save(renamed, path)
    with pytest.raises(UserError) as info:
        build_sam("vit_b_tiny", path, image_size=64, strict=False)
    text = _one_line(info)
    assert "matches none of the" in text and "model.strict: false" in text
