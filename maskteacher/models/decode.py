"""Batched image preprocessing and point-prompt mask decoding for SAM models.

:func:`decode_points` decodes many single-point prompts over many images in one call: the same
computation as segment-anything's ``MaskDecoder.forward`` (``predict_masks`` + multimask slicing),
except that each prompt gathers its own image's embedding through ``image_index`` instead of
repeating one image's embedding. It is built from the model's own submodules, so any
``segment_anything.modeling.Sam`` (and therefore any registry model) works, with gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from segment_anything.modeling import PromptEncoder, Sam


def preprocess(model: Sam, images: torch.Tensor, input_hw: torch.Tensor) -> torch.Tensor:
    """Normalise padded images for the image encoder.

    images: (B, 3, S, S) uint8 in the model input frame (resized, zero-padded bottom/right),
    S == ``model.image_encoder.img_size``; input_hw: (B, 2) int, (h, w) of the unpadded region.
    Returns (B, 3, S, S) float32 on the model's device: ``(x - pixel_mean) / pixel_std`` inside
    the image and exactly 0 in the padding -- what ``Sam.preprocess`` gives for the unpadded image.
    """
    size = int(model.image_encoder.img_size)
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (size, size):
        raise ValueError(f"images must be (B, 3, {size}, {size}), got {tuple(images.shape)}")
    if input_hw.shape != (images.shape[0], 2):
        raise ValueError(f"input_hw must be ({images.shape[0]}, 2), got {tuple(input_hw.shape)}")
    device = model.pixel_mean.device
    images = images.to(device, non_blocking=True)
    input_hw = input_hw.to(device)
    normed = (images - model.pixel_mean) / model.pixel_std
    coords = torch.arange(size, device=device)
    rows = coords[None, :] < input_hw[:, 0:1]  # (B, S)
    cols = coords[None, :] < input_hw[:, 1:2]  # (B, S)
    inside = rows[:, None, :, None] & cols[:, None, None, :]  # (B, 1, S, S)
    return torch.where(inside, normed, torch.zeros((), dtype=normed.dtype, device=device))


@dataclass
class DecoderOutput:
    """Mask-decoder outputs for P prompts (K = 3 with multimask output, else 1; L = S / 4).

    low_res_logits: (P, K, L, L) float mask logits in the low-res frame.
    iou_pred: (P, K) float predicted IoU.
    tokens: (P, K, C) mask-decoder output tokens of the returned masks (C = decoder width),
    or None unless requested.
    """

    low_res_logits: torch.Tensor
    iou_pred: torch.Tensor
    tokens: torch.Tensor | None = None


def decode_points(
    model: Sam,
    image_embeddings: torch.Tensor,
    points: torch.Tensor,
    *,
    image_index: torch.Tensor | None = None,
    multimask_output: bool,
    return_tokens: bool = False,
) -> DecoderOutput:
    """Decode one positive point prompt per row of ``points`` against its image's embedding.

    image_embeddings: (B, C, E, E) image-encoder output. points: (P, 2) float (x, y) in the
    model input frame. image_index: (P,) long, the image of each prompt (None: all on image 0,
    only when B == 1). Equal to ``model.mask_decoder`` run image by image (same multimask
    slicing: masks 1..3 with ``multimask_output``, else mask 0).
    """
    num_images = image_embeddings.shape[0]
    num_prompts = points.shape[0]
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must be (P, 2), got {tuple(points.shape)}")
    if image_index is None:
        if num_images != 1:
            raise ValueError(f"image_index is required with {num_images} image embeddings")
        image_index = torch.zeros(num_prompts, dtype=torch.long, device=points.device)
    elif image_index.shape != (num_prompts,):
        raise ValueError(f"image_index must be ({num_prompts},), got {tuple(image_index.shape)}")

    decoder = model.mask_decoder
    if num_prompts == 0:
        k = decoder.num_mask_tokens - 1 if multimask_output else 1
        return _empty_output(model, image_embeddings, k, return_tokens)
    state = decode_points_state(
        model,
        image_embeddings,
        points,
        image_index=image_index,
        multimask_output=multimask_output,
        return_tokens=return_tokens,
    )
    return DecoderOutput(upscale_masks(decoder, state), state.iou_pred, state.tokens)


@dataclass
class DecoderState:
    """The mask decoder's outputs before the mask upscaling, for P prompts (K masks each).

    src: (P, C, E, E) the transformer's image features (a view in image layout); hyper_in:
    (P, K, C/8) the hypernetwork output of each returned mask token; iou_pred: (P, K); tokens:
    (P, K, C) mask-token outputs or None. :func:`upscale_masks` turns it into (P, K, L, L)
    logits; :func:`maskteacher.models.upscale.logits_at` gives them at chosen pixels only.
    """

    src: torch.Tensor
    hyper_in: torch.Tensor
    iou_pred: torch.Tensor
    tokens: torch.Tensor | None = None


def decode_points_state(
    model: Sam,
    image_embeddings: torch.Tensor,
    points: torch.Tensor,
    *,
    image_index: torch.Tensor,
    multimask_output: bool,
    return_tokens: bool = False,
) -> DecoderState:
    """:func:`decode_points` up to the mask upscaling (P >= 1 prompts, same arguments)."""
    sparse, dense = point_prompt_embeddings(model.prompt_encoder, points)
    src = image_embeddings.index_select(0, image_index.to(image_embeddings.device)) + dense
    return run_decoder(
        model, src, sparse, multimask_output=multimask_output, return_tokens=return_tokens
    )


def output_tokens(decoder: torch.nn.Module) -> torch.Tensor:
    """(T, C) the decoder's own output tokens: the IoU token, the mask tokens and, for a SAM-HQ
    decoder, its HQ token (``hf_token``) after them, as ``predict_masks`` concatenates them."""
    weights = [decoder.iou_token.weight, decoder.mask_tokens.weight]
    if hasattr(decoder, "hf_token"):  # SAM-HQ
        weights.append(decoder.hf_token.weight)
    return torch.cat(weights, dim=0)


def run_transformer(
    model: Sam, src: torch.Tensor, sparse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-way transformer step of ``predict_masks``. src: (P, C, E, E) each prompt's image
    embedding plus its dense prompt embedding; sparse: (P, T, C) the prompt encoder's sparse
    embeddings. Returns hs (P, T', C), the output tokens then the prompt tokens, and the
    image-side output (P, C, E, E) -- the prompt-conditioned image embedding."""
    decoder = model.mask_decoder
    num = sparse.shape[0]
    tokens = torch.cat([output_tokens(decoder).expand(num, -1, -1), sparse], dim=1)
    pos = model.prompt_encoder.get_dense_pe().expand(num, -1, -1, -1)
    p, c, h, w = src.shape
    hs, out = decoder.transformer(src, pos, tokens)
    return hs, out.transpose(1, 2).reshape(p, c, h, w)


def decoder_state(
    decoder: torch.nn.Module,
    hs: torch.Tensor,
    image: torch.Tensor,
    *,
    multimask_output: bool,
    return_tokens: bool,
) -> DecoderState:
    """The heads of ``predict_masks`` on :func:`run_transformer`'s outputs, with its multimask
    slicing (hypernetworks, IoU head; the upscaling is left to :func:`upscale_masks`)."""
    selected = range(1, decoder.num_mask_tokens) if multimask_output else range(0, 1)
    mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
    hyper_in = torch.stack(
        [decoder.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in selected], dim=1
    )  # (P, K, C/8)
    iou = decoder.iou_prediction_head(hs[:, 0, :])[:, selected.start : selected.stop]
    out_tokens = mask_tokens_out[:, selected.start : selected.stop, :] if return_tokens else None
    return DecoderState(src=image, hyper_in=hyper_in, iou_pred=iou, tokens=out_tokens)


def run_decoder(
    model: Sam,
    src: torch.Tensor,
    sparse: torch.Tensor,
    *,
    multimask_output: bool,
    return_tokens: bool,
) -> DecoderState:
    """segment-anything's ``MaskDecoder.predict_masks`` up to the upscaling, with its multimask
    slicing (arguments as :func:`run_transformer`)."""
    hs, image = run_transformer(model, src, sparse)
    return decoder_state(
        model.mask_decoder,
        hs,
        image,
        multimask_output=multimask_output,
        return_tokens=return_tokens,
    )


def upscale_masks(decoder: torch.nn.Module, state: DecoderState) -> torch.Tensor:
    """(P, K, L, L) mask logits of a :class:`DecoderState` (``predict_masks``' last step)."""
    upscaled = decoder.output_upscaling(state.src)
    p, c8, lh, lw = upscaled.shape
    k = state.hyper_in.shape[1]
    return (state.hyper_in @ upscaled.reshape(p, c8, lh * lw)).reshape(p, k, lh, lw)


def point_prompt_embeddings(
    prompt_encoder: PromptEncoder, points: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """segment-anything's ``PromptEncoder`` output for one positive point per prompt, no box.

    points: (P, 2) float (x, y) in the model input frame. Returns sparse (P, 2, C) -- the point's
    positional encoding (at the pixel centre, +0.5) plus the positive-point embedding, then the
    padding point's ``not_a_point_embed`` -- and dense (1, C, 1, 1), the ``no_mask_embed``
    (broadcast over prompts and pixels). The same values as ``prompt_encoder(points=(points[:,
    None], ones), boxes=None, masks=None)``, without its label-masked in-place updates, which
    torch.compile cannot trace (a graph break each, a dynamic-shape ``nonzero``).
    Under autocast the dtypes follow segment-anything's: the in-place adds keep the encoding's
    dtype (bf16), then the concatenation promotes to float32 -- so the values are bit-identical.
    """
    coords = prompt_encoder.pe_layer.forward_with_coords(
        (points + 0.5)[:, None, :], prompt_encoder.input_image_size
    )  # (P, 1, C)
    positive = (coords + prompt_encoder.point_embeddings[1].weight).to(coords.dtype)
    pad = prompt_encoder.not_a_point_embed.weight.to(coords.dtype).expand(points.shape[0], 1, -1)
    # segment-anything concatenates onto an empty float32 tensor: the result is at least float32
    sparse = torch.cat([positive, pad], dim=1).to(torch.promote_types(coords.dtype, torch.float32))
    dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    return sparse, dense


def _empty_output(
    model: Sam, image_embeddings: torch.Tensor, k: int, return_tokens: bool
) -> DecoderOutput:
    low = 4 * image_embeddings.shape[-1]
    kwargs = {"dtype": image_embeddings.dtype, "device": image_embeddings.device}
    dim = model.mask_decoder.transformer_dim
    return DecoderOutput(
        low_res_logits=torch.zeros(0, k, low, low, **kwargs),
        iou_pred=torch.zeros(0, k, **kwargs),
        tokens=torch.zeros(0, k, dim, **kwargs) if return_tokens else None,
    )
