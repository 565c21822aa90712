"""Batched point-prompt decoding for SAM-HQ models (segment-anything-hq's ``MaskDecoderHQ``).

The same computation as ``MaskDecoderHQ.forward`` (``predict_masks`` + its output selection),
rearranged like :func:`maskteacher.models.decode_points`: many single-point prompts over many
images in one call, each prompt gathering its own image's embedding and HQ features through
``image_index``. Built from the model's own submodules.

What SAM-HQ returns per prompt (one mask, K = 1):

- ``multimask_output``: SAM's three multimask candidates (mask tokens 1..3) are scored by the IoU
  head and only the best one is kept, with its predicted IoU; without it, mask token 0;
- the HQ token's mask is computed on the HQ features (:func:`hq_features`) and either added to
  that SAM mask (``hq_token_only=False``, what the package's ``SamAutomaticMaskGenerator`` and
  ``SamPredictor`` use by default) or returned alone (``hq_token_only=True``).

Decoder tokens (for feature distillation) are the output token of the selected SAM mask token --
the role a SAM student's mask tokens have (they go through the same hypernetwork MLPs onto
SAM's upscaled embedding). The HQ output token is not returned: it maps through ``hf_mlp``
onto the HQ features, which a SAM student does not have.
"""

from __future__ import annotations

import torch
from torch import nn

from maskteacher.models.decode import DecoderOutput, point_prompt_embeddings


def hq_features(
    model: nn.Module, embeddings: torch.Tensor, interm_embeddings: list[torch.Tensor]
) -> torch.Tensor:
    """SAM-HQ's fused features of B images, as ``MaskDecoderHQ.forward`` computes them.

    embeddings: (B, C, E, E) image-encoder output; interm_embeddings: the encoder's list of
    (B, E, E, V) channels-last early features (the first one is used). Returns (B, C/8, 4E, 4E)
    (low-res frame): ``embedding_encoder(embeddings) + compress_vit_feat(early feature)``.
    """
    decoder = model.mask_decoder
    early = interm_embeddings[0].permute(0, 3, 1, 2)
    return decoder.embedding_encoder(embeddings) + decoder.compress_vit_feat(early)


def decode_points_hq(
    model: nn.Module,
    image_embeddings: torch.Tensor,
    image_hq_features: torch.Tensor,
    points: torch.Tensor,
    *,
    image_index: torch.Tensor,
    multimask_output: bool,
    hq_token_only: bool = False,
    return_tokens: bool = False,
) -> DecoderOutput:
    """Decode one positive point prompt per row of ``points`` with SAM-HQ's decoder.

    image_embeddings: (B, C, E, E); image_hq_features: (B, C/8, L, L) from :func:`hq_features`;
    points: (P, 2) float (x, y) in the model input frame; image_index: (P,) long, the image of
    each prompt. Returns low_res_logits (P, 1, L, L), iou_pred (P, 1) and tokens (P, 1, C) when
    asked (module docstring). Equal to ``model.mask_decoder`` run image by image.
    """
    decoder = model.mask_decoder
    num_prompts = points.shape[0]
    n_sam = decoder.num_mask_tokens - 1  # SAM's mask tokens; the last output token is HQ's
    if num_prompts == 0:
        return _empty(image_embeddings, decoder.transformer_dim, return_tokens)
    index = image_index.to(image_embeddings.device)

    sparse, dense = point_prompt_embeddings(model.prompt_encoder, points)
    output_tokens = torch.cat(
        [decoder.iou_token.weight, decoder.mask_tokens.weight, decoder.hf_token.weight], dim=0
    )
    tokens = torch.cat([output_tokens.expand(num_prompts, -1, -1), sparse], dim=1)
    src = image_embeddings.index_select(0, index) + dense
    pos = model.prompt_encoder.get_dense_pe().expand(num_prompts, -1, -1, -1)
    p, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos, tokens)
    iou_all = decoder.iou_prediction_head(hs[:, 0, :])  # (P, n_sam)
    mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens, :]

    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(p, c, h, w))
    upscaled_hq = decoder.embedding_maskfeature(upscaled) + image_hq_features.index_select(0, index)
    if multimask_output:
        iou, best = iou_all[:, 1:n_sam].max(dim=1)
        chosen = best + 1
    else:
        iou, chosen = iou_all[:, 0], torch.zeros(p, dtype=torch.long, device=hs.device)
    rows = torch.arange(p, device=hs.device)
    hyper_sam = torch.stack(
        [decoder.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in range(n_sam)], 1
    )[rows, chosen]  # (P, C/8): the selected SAM token's
    hyper_hq = decoder.hf_mlp(mask_tokens_out[:, n_sam, :])  # (P, C/8)
    _, c8, lh, lw = upscaled.shape
    masks = (hyper_hq[:, None] @ upscaled_hq.reshape(p, c8, lh * lw)).reshape(p, 1, lh, lw)
    if not hq_token_only:
        sam = (hyper_sam[:, None] @ upscaled.reshape(p, c8, lh * lw)).reshape(p, 1, lh, lw)
        masks = sam + masks
    out_tokens = mask_tokens_out[rows, chosen][:, None] if return_tokens else None
    return DecoderOutput(low_res_logits=masks, iou_pred=iou[:, None], tokens=out_tokens)


def _empty(image_embeddings: torch.Tensor, dim: int, return_tokens: bool) -> DecoderOutput:
    low = 4 * image_embeddings.shape[-1]
    kwargs = {"dtype": image_embeddings.dtype, "device": image_embeddings.device}
    return DecoderOutput(
        low_res_logits=torch.zeros(0, 1, low, low, **kwargs),
        iou_pred=torch.zeros(0, 1, **kwargs),
        tokens=torch.zeros(0, 1, dim, **kwargs) if return_tokens else None,
    )
