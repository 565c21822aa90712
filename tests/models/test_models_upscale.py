"""Point-sampled mask upscaling (maskteacher.models.upscale): pixel-locality of
segment-anything's MaskDecoder, values and gradients equal to the dense decoder's at the
sampled pixels."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling import MaskDecoder, TwoWayTransformer
from torch import nn

from maskteacher.models import build_sam
from maskteacher.models.decode import DecoderState, upscale_masks
from maskteacher.models.upscale import check_pixel_local, logits_at

#: bf16 autocast: the two paths run different kernels (matmuls per kernel tap vs full transposed
#: convolutions) and round their intermediate maps to bf16 at different points, so the logits
#: differ by a few bf16 ulps: the bound is 4 ulps of the largest logit (4 * 2^-7 relative).
#: Measured on the CPU (20 seeds, C = 64 and 256, logits up to ~12): at most 1.4e-2 (~2 ulps).
BF16_REL_BOUND = 4 * 2**-7


def _decoder(dim: int) -> MaskDecoder:
    torch.manual_seed(dim)
    decoder = MaskDecoder(
        transformer_dim=dim,
        transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=2 * dim, num_heads=2),
    )
    with torch.no_grad():  # LayerNorm2d starts as the identity: give it real weights
        for p in decoder.output_upscaling.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return decoder


def _state(decoder: MaskDecoder, prompts: int, side: int, k: int) -> DecoderState:
    dim = decoder.transformer_dim
    src = torch.randn(prompts, dim, side, side)
    hyper = torch.randn(prompts, k, dim // 8)
    return DecoderState(src=src, hyper_in=hyper, iou_pred=torch.zeros(prompts, k))


def _rows_pixels(prompts: int, k: int, low: int, n: int, s: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(prompts * k, (n,), generator=gen)
    pixels = torch.randint(low * low, (n, s), generator=gen)
    return rows, pixels


def test_segment_anything_upscaling_is_pixel_local():
    """Changing one transformer-output pixel (i, j) changes exactly the 4x4 low-res block
    (4i..4i+3, 4j..4j+3) of segment-anything's own upscaling, nothing else."""
    decoder = _decoder(64)
    assert check_pixel_local(decoder.output_upscaling) == 2
    src = torch.randn(1, 64, 6, 6)
    base = decoder.output_upscaling(src)
    for i, j in [(0, 0), (2, 5), (5, 3)]:
        moved = src.clone()
        moved[0, :, i, j] += torch.randn(64)
        changed = (decoder.output_upscaling(moved) != base).any(dim=1)[0]  # (24, 24)
        expected = torch.zeros(24, 24, dtype=torch.bool)
        expected[4 * i : 4 * i + 4, 4 * j : 4 * j + 4] = True
        assert torch.equal(changed, expected)


@pytest.mark.parametrize("dim", [64, 256])
def test_sampled_logits_equal_dense_fp32(dim):
    decoder = _decoder(dim)
    state = _state(decoder, prompts=5, side=8, k=3)
    dense = upscale_masks(decoder, state).flatten(0, 1).flatten(1)  # (P*K, L*L)
    rows, pixels = _rows_pixels(5, 3, 32, n=7, s=300)
    hyper = state.hyper_in.flatten(0, 1)[rows]
    sampled = logits_at(decoder.output_upscaling, state.src, hyper, rows // 3, pixels)
    want = dense[rows].gather(1, pixels).detach()
    sampled = sampled.detach()
    assert sampled.shape == (7, 300)
    assert float((sampled - want).abs().max()) <= 1e-5 * max(1.0, float(want.abs().max()))


def test_sampled_logits_bf16_bound():
    decoder = _decoder(256)
    state = _state(decoder, prompts=4, side=8, k=1)
    rows, pixels = _rows_pixels(4, 1, 32, n=6, s=200)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = upscale_masks(decoder, state).flatten(0, 1).flatten(1)
        hyper = state.hyper_in.flatten(0, 1)[rows]
        sampled = logits_at(decoder.output_upscaling, state.src, hyper, rows, pixels)
    want = dense[rows].gather(1, pixels).float().detach()
    rel = float((sampled.detach().float() - want).abs().max()) / float(want.abs().max())
    assert rel <= BF16_REL_BOUND, rel


def test_gradients_equal_dense_restricted_to_the_points():
    """d(sum w * logits at the points) w.r.t. the transformer output, the hypernetwork output and
    the upscaling weights: sampled path == dense path."""
    decoder = _decoder(64)
    state = _state(decoder, prompts=4, side=6, k=3)
    rows, pixels = _rows_pixels(4, 3, 24, n=9, s=50, seed=1)
    weights = torch.randn(9, 50)

    def grads(sampled: bool) -> list[torch.Tensor]:
        src = state.src.clone().requires_grad_(True)
        hyper_in = state.hyper_in.clone().requires_grad_(True)
        decoder.zero_grad(set_to_none=True)
        if sampled:
            hyper = hyper_in.flatten(0, 1)[rows]
            values = logits_at(decoder.output_upscaling, src, hyper, rows // 3, pixels)
        else:
            dense = upscale_masks(decoder, DecoderState(src, hyper_in, state.iou_pred))
            values = dense.flatten(0, 1).flatten(1)[rows].gather(1, pixels)
        (weights * values).sum().backward()
        return [src.grad, hyper_in.grad] + [p.grad for p in decoder.output_upscaling.parameters()]

    for a, b in zip(grads(True), grads(False)):  # sums over many pixels: relative to the largest
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


def test_given_parameters_replace_the_modules_own():
    """``params`` (e.g. views a DDP forward returned) are what the computation uses and where the
    gradient goes."""
    model = build_sam("vit_t_tiny", image_size=64)
    upscaling = model.mask_decoder.output_upscaling
    state = _state(model.mask_decoder, prompts=2, side=4, k=1)
    rows, pixels = _rows_pixels(2, 1, 16, n=2, s=10)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in upscaling.named_parameters()}
    hyper = state.hyper_in.flatten(0, 1)[rows]
    logits_at(upscaling, state.src, hyper, rows, pixels, params=params).sum().backward()
    assert all(p.grad is not None for p in params.values())
    assert all(p.grad is None for p in upscaling.parameters())


def test_empty_rows_and_unknown_layers():
    decoder = _decoder(64)
    state = _state(decoder, prompts=2, side=4, k=1)
    empty = logits_at(
        decoder.output_upscaling,
        state.src,
        torch.zeros(0, 8),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, 5, dtype=torch.long),
    )
    assert empty.shape == (0, 5)
    with pytest.raises(ValueError, match="layer 1 .*Conv2d.* not known to be pixel-local"):
        check_pixel_local(nn.Sequential(nn.ConvTranspose2d(8, 4, 2, 2), nn.Conv2d(4, 4, 3)))
    with pytest.raises(ValueError, match="not a 2x2 / stride-2"):
        check_pixel_local(nn.Sequential(nn.ConvTranspose2d(8, 4, 3, 2)))
