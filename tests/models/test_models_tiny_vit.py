"""Our TinyViT (vit_t): official key/shape list, architecture facts, stale-bias trap, reference."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import pytest
import torch

from maskteacher.models import build_sam, decode_points, load_checkpoint
from maskteacher.models.tiny_vit import TinyViT, relative_offset_index

FIXTURE = Path(__file__).parent / "fixtures" / "vit_t_keys.json"


def _pinned() -> dict[str, list[int]]:
    return json.loads(FIXTURE.read_text())["keys"]


def test_vit_t_keys_and_shapes_equal_the_pinned_official_list():
    pinned = _pinned()
    assert len(pinned) == 439
    state = build_sam("vit_t").state_dict()
    ours = {k: list(v.shape) for k, v in state.items()}
    assert sorted(set(ours) - set(pinned)) == []
    assert sorted(set(pinned) - set(ours)) == []
    assert {k: s for k, s in ours.items() if pinned[k] != s} == {}
    assert list(ours) == list(pinned)  # same order, too: exports diff cleanly


def test_pinned_list_agrees_with_the_architecture_facts():
    """The hand check of the fixture, written down: counts and shapes implied by TinyViT-5M."""
    pinned = _pinned()
    enc = {
        k[len("image_encoder.") :]: s for k, s in pinned.items() if k.startswith("image_encoder.")
    }
    assert len(enc) == 302
    # 27 conv-BNs x 6 tensors (conv weight; BN weight, bias, mean, var, count): stem 2,
    # MBConv 2 x 3, patch merging 3 x 3, local convs 10 -> 162; 10 transformer blocks x 13
    # (bias table; qkv, proj, fc1, fc2 weight + bias; 2 LayerNorms x 2) -> 130; neck 2 convs +
    # 2 LayerNorm2d x 2 -> 6; unused classifier norm_head + head -> 4. 162 + 130 + 6 + 4 = 302.
    conv_bn = sum(1 for k in enc if k.endswith(".c.weight"))
    assert conv_bn == 27 and sum(1 for k in enc if ".bn." in k) == 27 * 5
    blocks = [k for k in enc if k.endswith("attn.attention_biases")]
    assert len(blocks) == 10
    assert sum(1 for k in enc if ".attn." in k) == 10 * 7
    assert sum(1 for k in enc if ".mlp." in k) == 10 * 6
    assert sum(1 for k in enc if k.startswith(("neck.", "head.", "norm_head."))) == 10
    assert enc["patch_embed.seq.0.c.weight"] == [32, 3, 3, 3]
    assert enc["patch_embed.seq.2.c.weight"] == [64, 32, 3, 3]
    assert enc["layers.0.blocks.1.conv1.c.weight"] == [256, 64, 1, 1]  # MBConv expand x4
    assert enc["layers.0.blocks.1.conv2.c.weight"] == [256, 1, 3, 3]  # depthwise
    widths, depths, heads, windows = (64, 128, 160, 320), (2, 2, 6, 2), (2, 4, 5, 10), (7, 7, 14, 7)
    for stage in range(1, 4):
        dim = widths[stage]
        blocks = {int(k.split(".")[3]) for k in enc if k.startswith(f"layers.{stage}.blocks.")}
        assert blocks == set(range(depths[stage]))
        for b in range(depths[stage]):
            prefix = f"layers.{stage}.blocks.{b}."
            assert enc[prefix + "attn.attention_biases"] == [heads[stage], windows[stage] ** 2]
            assert enc[prefix + "attn.qkv.weight"] == [3 * dim, dim]
            assert enc[prefix + "attn.proj.weight"] == [dim, dim]
            assert enc[prefix + "mlp.fc1.weight"] == [4 * dim, dim]
            assert enc[prefix + "mlp.fc2.weight"] == [dim, 4 * dim]
            assert enc[prefix + "local_conv.c.weight"] == [dim, 1, 3, 3]
    for stage, (dim, out) in enumerate(zip(widths[:-1], widths[1:])):
        assert enc[f"layers.{stage}.downsample.conv1.c.weight"] == [out, dim, 1, 1]
        assert enc[f"layers.{stage}.downsample.conv2.c.weight"] == [out, 1, 3, 3]
        assert enc[f"layers.{stage}.downsample.conv3.c.weight"] == [out, out, 1, 1]
    assert "layers.3.downsample.conv1.c.weight" not in enc
    assert enc["neck.0.weight"] == [256, 320, 1, 1] and enc["neck.2.weight"] == [256, 256, 3, 3]
    assert enc["neck.1.weight"] == [256] and enc["neck.3.bias"] == [256]
    assert enc["head.weight"] == [1000, 320] and enc["norm_head.weight"] == [320]
    rest = {k for k in pinned if not k.startswith("image_encoder.")}
    assert len(rest) == 439 - 302 and {k.split(".")[0] for k in rest} == {
        "prompt_encoder",
        "mask_decoder",
    }


def test_relative_offset_index_is_dy_times_window_plus_dx():
    idx = relative_offset_index(3)
    assert idx.shape == (9, 9)
    # token 0 = (0, 0), token 5 = (1, 2), token 7 = (2, 1)
    assert idx[0, 5] == 1 * 3 + 2 and idx[5, 0] == idx[0, 5]
    assert idx[5, 7] == 1 * 3 + 1 and idx[4, 4] == 0
    assert set(idx.unique().tolist()) == set(range(9))


def test_classifier_head_is_carried_but_never_trained():
    encoder = build_sam("vit_t_tiny", image_size=64).image_encoder
    names = {n for n, _ in encoder.named_parameters()}
    assert not any(n.startswith(("head.", "norm_head.")) for n in names)
    assert {"head.weight", "head.bias", "norm_head.weight", "norm_head.bias"} <= set(
        encoder.state_dict()
    )


@pytest.mark.parametrize("size", [64, 128, 192])
def test_tiny_vit_output_is_image_over_16(size):
    encoder = TinyViT(
        img_size=size,
        embed_dims=(16, 32, 48, 64),
        depths=(1, 1, 1, 1),
        num_heads=(1, 2, 2, 4),
        window_sizes=(7, 7, 7, 7),
        out_chans=32,
        classifier_classes=0,
    )
    with torch.no_grad():
        out = encoder.eval()(torch.randn(2, 3, size, size))
    assert out.shape == (2, 32, size // 16, size // 16)


def test_drop_path_is_random_in_training_only():
    encoder = TinyViT(
        img_size=64,
        embed_dims=(16, 32, 48, 64),
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 2, 4),
        out_chans=16,
        drop_path_rate=0.5,
        classifier_classes=0,
    )
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        encoder.eval()
        assert torch.equal(encoder(x), encoder(x))
        encoder.train()
        torch.manual_seed(0)
        first = encoder(x)
        assert not torch.equal(first, encoder(x))


def _outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(11)
    image = torch.randn(1, 3, model.image_size, model.image_size)
    points = torch.tensor([[5.0, 9.0], [40.0, 30.0]])
    with torch.no_grad():
        emb = model.image_encoder(image)
        out = decode_points(model, emb, points, multimask_output=True)
    return emb, out.low_res_logits


def test_weights_loaded_after_eval_are_used(randomize, tmp_path):
    """The stale-bias trap: .eval() first, then load, must equal load first, then .eval()."""
    source = build_sam("vit_t_tiny", image_size=128)
    state = randomize(source, seed=4)
    assert all(state[k].abs().sum() > 0 for k in state if k.endswith("attention_biases"))
    path = tmp_path / "student.pth"
    torch.save(state, path)

    eval_then_load = build_sam("vit_t_tiny", image_size=128)
    eval_then_load.eval()
    load_checkpoint(eval_then_load, path)
    load_then_eval = build_sam("vit_t_tiny", image_size=128).train()
    load_checkpoint(load_then_eval, path)
    load_then_eval.eval()

    emb_a, masks_a = _outputs(eval_then_load)
    emb_b, masks_b = _outputs(load_then_eval)
    assert torch.equal(emb_a, emb_b) and torch.equal(masks_a, masks_b)

    # and an in-place change of the bias table after eval() shows up immediately
    with torch.no_grad():
        eval_then_load.image_encoder.layers[1].blocks[0].attn.attention_biases.add_(1.0)
    emb_c, _ = _outputs(eval_then_load)
    assert not torch.allclose(emb_a, emb_c)


# ----------------------------------------------------------------------------- reference


def _reference_vit_t(mobile_sam, state):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = mobile_sam.sam_model_registry["vit_t"]()
    reference.load_state_dict(state)
    return reference.eval()  # eval AFTER loading: the reference caches its bias tables here


@pytest.mark.ref
def test_pinned_list_equals_the_reference_build(mobile_sam):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = mobile_sam.sam_model_registry["vit_t"]()
    assert {k: list(v.shape) for k, v in reference.state_dict().items()} == _pinned()


@pytest.mark.ref
def test_vit_t_matches_the_mobile_sam_reference_at_1024(mobile_sam, randomize):
    """Same random weights in both; image encoder and mask outputs agree. ~10 s on 2 cores."""
    ours = build_sam("vit_t")
    state = randomize(ours, seed=9)
    reference = _reference_vit_t(mobile_sam, state)
    ours_idx = [m.attention_bias_idxs for m in ours.modules() if hasattr(m, "attention_bias_idxs")]
    ref_idx = [
        m.attention_bias_idxs for m in reference.modules() if hasattr(m, "attention_bias_idxs")
    ]
    assert len(ours_idx) == len(ref_idx) == 10
    assert all(torch.equal(a, b) for a, b in zip(ours_idx, ref_idx))

    torch.manual_seed(12)
    image = torch.rand(1, 3, 1024, 1024) * 255
    points = torch.tensor([[[100.0, 200.0]], [[700.0, 512.0]], [[1000.0, 20.0]]])
    labels = torch.ones(3, 1, dtype=torch.int64)
    with torch.no_grad():
        start = time.perf_counter()
        emb_ours = ours.image_encoder(ours.preprocess(image))
        ours_s = time.perf_counter() - start
        emb_ref = reference.image_encoder(reference.preprocess(image))
        masks = {}
        for name, model, emb in (("ours", ours, emb_ours), ("ref", reference, emb_ref)):
            sparse, dense = model.prompt_encoder(points=(points, labels), boxes=None, masks=None)
            masks[name] = model.mask_decoder(
                image_embeddings=emb,
                image_pe=model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=True,
            )
    enc_diff = (emb_ours - emb_ref).abs().max().item()
    mask_diff = (masks["ours"][0] - masks["ref"][0]).abs().max().item()
    iou_diff = (masks["ours"][1] - masks["ref"][1]).abs().max().item()
    print(
        f"vit_t vs reference: encoder max|diff| {enc_diff:.2e}, masks {mask_diff:.2e}, "
        f"iou {iou_diff:.2e}; our encoder {ours_s:.2f} s"
    )
    assert emb_ours.shape == (1, 256, 64, 64) and masks["ours"][0].shape == (3, 3, 256, 256)
    assert enc_diff < 1e-4 and mask_diff < 1e-4 and iou_diff < 1e-4
