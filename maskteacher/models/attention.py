"""segment-anything's ViT attention through ``F.scaled_dot_product_attention`` (SDPA).

``segment_anything.modeling.image_encoder.Attention`` materialises the softmax of every head
(``(q * scale) @ k^T``, plus the decomposed relative-position term, ``softmax``, ``@ v``). The
relative-position term is additive before the softmax, so it can be handed to SDPA as a float
``attn_mask``: ``bias[b, (h, w), (h', w')] = q[b, (h, w)] . Rh[h, h'] + q[b, (h, w)] . Rw[w, w']``
with ``Rh`` / ``Rw`` segment-anything's own ``get_rel_pos`` tables, and SDPA's ``scale`` the
module's. :class:`SDPAAttention` does that with the original module's parameters (same
``qkv``, ``proj``, ``rel_pos_h``, ``rel_pos_w``; same state-dict keys), so a model's outputs
stay equal to float rounding (``tests/models/test_models_attention.py`` reports the max abs
difference). segment-anything-hq's encoder has the same ``Attention`` (same code and names).

:func:`sdpa_attention` swaps every such module of an image encoder for the duration of a
``with`` block and puts the originals back; the swap is a few attribute assignments.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import get_rel_pos
from torch import nn


def rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """segment-anything's ``add_decomposed_rel_pos`` term alone: (B, H * W, H * W).

    q: (B, H * W, C) queries (unscaled, as segment-anything passes them); rel_pos_h / _w: the
    module's tables; size: (H, W) of the query (= key) grid.
    """
    h, w = size
    rh = get_rel_pos(h, h, rel_pos_h)
    rw = get_rel_pos(w, w, rel_pos_w)
    r_q = q.reshape(q.shape[0], h, w, q.shape[-1])
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
    return (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(q.shape[0], h * w, h * w)


class SDPAAttention(nn.Module):
    """A segment-anything image-encoder ``Attention`` computed with SDPA (module docstring);
    holds the original's parameters, not copies."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.num_heads = original.num_heads
        self.scale = original.scale
        self.qkv = original.qkv
        self.proj = original.proj
        self.use_rel_pos = original.use_rel_pos
        if self.use_rel_pos:
            self.rel_pos_h = original.rel_pos_h
            self.rel_pos_w = original.rel_pos_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C), as the original module."""
        b, h, w, _ = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, C / heads)
        bias = None
        if self.use_rel_pos:
            flat_q = q.reshape(b * heads, h * w, -1)
            bias = rel_pos_bias(flat_q, self.rel_pos_h, self.rel_pos_w, (h, w))
            bias = bias.reshape(b, heads, h * w, h * w).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = out.view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)


def _is_vit_attention(module: nn.Module) -> bool:
    """segment-anything's (or segment-anything-hq's) image-encoder ``Attention``."""
    names = ("qkv", "proj", "num_heads", "scale", "use_rel_pos")
    return type(module).__name__ == "Attention" and all(hasattr(module, n) for n in names)


@contextlib.contextmanager
def sdpa_attention(encoder: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, every ViT ``Attention`` of ``encoder`` runs as :class:`SDPAAttention`;
    yields how many were swapped (0 for an encoder without them, e.g. TinyViT, which uses SDPA
    already). The originals are put back on exit."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    if enabled:
        for parent in list(encoder.modules()):
            for name, child in parent.named_children():
                if _is_vit_attention(child):
                    swapped.append((parent, name, child))
    try:
        for parent, name, child in swapped:
            setattr(parent, name, SDPAAttention(child))
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
