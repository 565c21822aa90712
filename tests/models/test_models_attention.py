"""SDPA attention for the ViT image encoder (maskteacher.models.attention) against
segment-anything's (and segment-anything-hq's) own Attention module."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

from maskteacher.models import build_sam
from maskteacher.models.attention import SDPAAttention, sdpa_attention

#: Largest |SDPA - original| seen on these tiny modules (outputs ~1-5): ~2e-7 (fp32; the two
#: paths sum in another order). vit_b @1024 end to end: 7.9e-6 (bench/precompute.py --sdpa).
TOLERANCE = 2e-5


@pytest.mark.parametrize("size,window", [((8, 8), False), ((5, 7), True), ((14, 14), True)])
def test_sdpa_equals_segment_anything_attention(size, window):
    torch.manual_seed(0)
    dim, heads = 48, 3
    original = Attention(dim, num_heads=heads, use_rel_pos=True, input_size=size)
    with torch.no_grad():  # zero-initialised tables would hide the relative-position term
        original.rel_pos_h.normal_(0, 0.5)
        original.rel_pos_w.normal_(0, 0.5)
    x = torch.randn(2, *size, dim)
    want = original(x).detach()
    got = SDPAAttention(original)(x).detach()
    diff = float((got - want).abs().max())
    print(f"SDPA vs segment-anything Attention {size}: max abs diff {diff:.2e}")
    assert diff <= TOLERANCE * max(1.0, float(want.abs().max()))
    plain = Attention(dim, num_heads=heads, use_rel_pos=False)
    assert torch.allclose(SDPAAttention(plain)(x), plain(x), atol=TOLERANCE)


@pytest.mark.parametrize("model_type", ["vit_b_tiny", "vit_b_tiny_hq"])
def test_encoder_outputs_and_parameters_unchanged(model_type):
    """The swap covers every block (windowed and global) of segment-anything's and
    segment-anything-hq's encoders, keeps the state dict's keys and tensors, and is undone."""
    torch.manual_seed(1)
    model = build_sam(model_type, image_size=128).eval()
    encoder = model.image_encoder
    with torch.no_grad():
        for block in encoder.blocks:
            block.attn.rel_pos_h.normal_(0, 0.5)
            block.attn.rel_pos_w.normal_(0, 0.5)
    keys = dict(encoder.state_dict())
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        want = encoder(x)
        with sdpa_attention(encoder) as swapped:
            assert swapped == len(encoder.blocks)
            assert all(isinstance(b.attn, SDPAAttention) for b in encoder.blocks)
            inside = encoder.state_dict()
            got = encoder(x)
    assert sorted(inside) == sorted(keys)
    assert all(inside[k].data_ptr() == keys[k].data_ptr() for k in keys)  # the same tensors
    assert not any(isinstance(b.attn, SDPAAttention) for b in encoder.blocks)
    pairs = list(zip(got, want)) if isinstance(want, tuple) else [(got, want)]
    for g, w in pairs:
        g, w = (g[0], w[0]) if isinstance(w, list) else (g, w)
        assert float((g - w).abs().max()) <= TOLERANCE * max(1.0, float(w.abs().max()))


def test_tinyvit_has_nothing_to_swap():
    model = build_sam("vit_t_tiny", image_size=64)
    with sdpa_attention(model.image_encoder) as swapped:
        assert swapped == 0
    with sdpa_attention(build_sam("vit_b_tiny", image_size=64).image_encoder, False) as swapped:
        assert swapped == 0
