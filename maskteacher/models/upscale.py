"""SAM's mask upscaling at chosen low-res pixels, exactly, without the full map.

segment-anything's ``MaskDecoder.output_upscaling`` is ``Sequential(ConvTranspose2d(C, C/4,
k=2, s=2), LayerNorm2d(C/4), GELU, ConvTranspose2d(C/4, C/8, k=2, s=2), GELU)``; a mask is
``hyper_in . upscaled`` per pixel (``predict_masks``). Every step is pixel-local: a transposed
convolution with kernel 2 and stride 2 writes each input pixel to its own 2x2 output block
(the blocks do not overlap), the channel LayerNorm and the activations act on one pixel's
channels. So low-res pixel ``(r, c)`` (L = 4 E) depends on exactly one pixel of the
transformer's output, ``(r // 4, c // 4)``, through tap ``((r >> 1) & 1, (c >> 1) & 1)`` of the
first transposed convolution and tap ``(r & 1, c & 1)`` of the second.

:func:`logits_at` computes the logits at N x S chosen pixels that way: it gathers the S source
pixels per row, runs each transposed convolution on them as matmuls with the one kernel tap
each sample uses (samples sorted by tap) and every other layer as it is, then takes the dot
product with the row's hypernetwork output. Gradients flow to the transformer output, the hypernetwork output
and the upscaling weights exactly as through the dense map restricted to those pixels. Memory
and work scale with the N x S samples (about 2 C floats of activations each are kept for the
backward pass) instead of the P prompts' full maps (about C L^2 / 2 floats each: the upscaling's
intermediate maps at L / 2 and L); the win is largest when S is well below L^2 and the matched
pairs N are fewer than the prompts.

:func:`check_pixel_local` refuses an upscaling stack this does not hold for.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from segment_anything.modeling.common import LayerNorm2d
from torch import nn
from torch.func import functional_call

#: Layers that act on each pixel's channels alone (besides the 2x2 / stride-2 transposed convs).
PIXEL_LOCAL = (LayerNorm2d, nn.GELU, nn.ReLU, nn.SiLU, nn.Identity)


def check_pixel_local(upscaling: nn.Sequential) -> int:
    """Number of 2x2 / stride-2 transposed convolutions in ``upscaling``; ValueError when a
    layer is not one of those or :data:`PIXEL_LOCAL`."""
    convs = 0
    for i, layer in enumerate(upscaling):
        if isinstance(layer, nn.ConvTranspose2d):
            plain = (
                layer.kernel_size == (2, 2)
                and layer.stride == (2, 2)
                and layer.padding == (0, 0)
                and layer.output_padding == (0, 0)
                and layer.dilation == (1, 1)
                and layer.groups == 1
            )
            if not plain:
                raise ValueError(f"upscaling layer {i} is not a 2x2 / stride-2 transposed conv")
            convs += 1
        elif not isinstance(layer, PIXEL_LOCAL):
            raise ValueError(
                f"upscaling layer {i} ({type(layer).__name__}) is not known to be pixel-local"
            )
    return convs


def _taps(rows: torch.Tensor, cols: torch.Tensor, convs: int) -> torch.Tensor:
    """(N, S) pixel rows / columns -> (N, S) key: the taps of every transposed convolution,
    two bits per level, the first level most significant."""
    key = torch.zeros_like(rows)
    for level in range(convs):
        shift = convs - 1 - level
        key = key * 4 + ((rows >> shift) & 1) * 2 + ((cols >> shift) & 1)
    return key


def _conv_taps(
    x: torch.Tensor, key: torch.Tensor, level: int, convs: int, weight, bias
) -> torch.Tensor:
    """A 2x2 / stride-2 transposed convolution on (M, C) samples sorted by ``key``: each run
    of samples sharing this level's tap is one matmul with that tap's (C, C') kernel."""
    prefix = key >> (2 * (convs - 1 - level))  # sorted; its lowest 2 bits: this level's tap
    counts = torch.bincount(prefix, minlength=4 ** (level + 1)).tolist()
    kernels = weight.permute(2, 3, 0, 1).reshape(4, weight.shape[0], weight.shape[1])
    parts, start = [], 0
    for group, count in enumerate(counts):
        if count:
            parts.append(x[start : start + count] @ kernels[group & 3])
            start += count
    out = torch.cat(parts) if parts else x.new_zeros(0, weight.shape[1])
    return out if bias is None else out + bias


def upscaled_at(
    upscaling: nn.Sequential,
    src: torch.Tensor,
    prompt: torch.Tensor,
    pixels: torch.Tensor,
    *,
    params: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``upscaling(src)`` at chosen pixels: (N, S, C') features.

    src: (P, C, E, E) transformer output (image layout); prompt: (N,) long, the row of ``src``
    each output row reads; pixels: (N, S) long flat indices ``r * L + c`` into the (L, L) output
    (L = E * 2^convs). params: tensors to use instead of ``upscaling``'s own parameters (same
    names as ``upscaling.named_parameters()``), e.g. views a DDP-wrapped forward returned.
    The samples are sorted by their taps, so that each transposed convolution is a few
    matmuls with one kernel tap each (no work for the taps a sample does not use).
    """
    convs = check_pixel_local(upscaling)
    side = src.shape[-1] << convs
    n, s = pixels.shape
    rows, cols = pixels // side, pixels % side
    key, order = _taps(rows, cols, convs).flatten().sort(stable=True)
    flat_src = ((rows >> convs) * src.shape[-1] + (cols >> convs)).flatten()[order]
    sample_prompt = prompt[:, None].expand(n, s).flatten()[order]
    x = src.flatten(2).transpose(1, 2)[sample_prompt, flat_src]  # (M, C), sorted by key
    params = dict(upscaling.named_parameters()) if params is None else params
    level = 0
    for i, layer in enumerate(upscaling):
        own = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith(f"{i}.")}
        if isinstance(layer, nn.ConvTranspose2d):
            x = _conv_taps(x, key, level, convs, own["weight"], own.get("bias"))
            level += 1
        else:  # pixel-local: the layer itself on (M, C, 1, 1)
            image = x[:, :, None, None]
            x = (functional_call(layer, own, (image,)) if own else layer(image))[:, :, 0, 0]
    out = torch.empty_like(x).index_copy(0, order, x)  # back to the samples' order
    return out.reshape(n, s, x.shape[1])


def logits_at(
    upscaling: nn.Sequential,
    src: torch.Tensor,
    hyper: torch.Tensor,
    prompt: torch.Tensor,
    pixels: torch.Tensor,
    *,
    params: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mask logits at chosen pixels: (N, S), equal to ``(hyper_in @ upscaling(src))`` of the
    dense decoder at those pixels (module docstring).

    hyper: (N, C') the hypernetwork output of each row's mask; src / prompt / pixels / params:
    as :func:`upscaled_at`.
    """
    features = upscaled_at(upscaling, src, prompt, pixels, params=params)  # (N, S, C')
    return (features @ hyper[:, :, None].to(features.dtype))[..., 0]
