"""Decoding any prompts (points with labels, or boxes) across images, with the decoder's features.

:func:`decode_features` is segment-anything's ``MaskDecoder.forward`` (``predict_masks`` and the
multimask slicing) for prompts gathered from several images through ``image_index``, returning
besides the masks what the decoder computes on the way: every mask token's output and the
two-way transformer's image-side output -- the *prompt-conditioned image embedding* the output
upscaling reads. :func:`decode_prompt_batch` runs it over a batch's prompts as the trainer
stores them (point sets with ``-1`` padding, or a box per prompt), in chunks, in prompt order.

Both work on any object with SAM's ``prompt_encoder`` and ``mask_decoder``: a full registry model
(the student, a teacher run online) or a :class:`~maskteacher.models.prompt_decoder.PromptDecoder`
on cached embeddings. For a SAM-HQ decoder the transformer runs with the HQ output token, as
``MaskDecoderHQ`` does (so its mask tokens and image tokens are the HQ teacher's), and the
masks are not computed (they also need the HQ features of the image encoder's early layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from maskteacher.models.decode import decoder_state, run_transformer, upscale_masks


@dataclass
class PromptDecoding:
    """Mask-decoder outputs for P prompts (K = 3 with multimask output, else 1; L = S / 4).

    low_res_logits: (P, K, L, L) and iou_pred: (P, K), None for a SAM-HQ decoder;
    tokens: (P, K, C) the output tokens of the returned masks (None for SAM-HQ);
    mask_tokens: (P, T, C) every mask token's output (T = 4 for SAM; 5 for SAM-HQ: SAM's four,
    then the HQ token); image_tokens: (P, C, E, E) the transformer's image-side output.
    """

    low_res_logits: torch.Tensor | None
    iou_pred: torch.Tensor | None
    tokens: torch.Tensor | None
    mask_tokens: torch.Tensor
    image_tokens: torch.Tensor


def decode_features(
    model: nn.Module,
    image_embeddings: torch.Tensor,
    *,
    points: torch.Tensor | None,
    labels: torch.Tensor | None,
    boxes: torch.Tensor | None,
    image_index: torch.Tensor,
    multimask_output: bool,
) -> PromptDecoding:
    """Decode P prompts against their images' embeddings (see the module docstring).

    image_embeddings: (B, C, E, E); points: (P, Kp, 2) float (x, y) input frame with labels
    (P, Kp) int64 (1 positive, 0 negative, -1 padding), or None; boxes: (P, 4) float input
    frame or None; image_index: (P,) long.
    """
    pts = None if points is None else (points, labels)
    sparse, dense = model.prompt_encoder(points=pts, boxes=boxes, masks=None)
    decoder = model.mask_decoder
    src = image_embeddings.index_select(0, image_index.to(image_embeddings.device)) + dense
    hs, image_tokens = run_transformer(model, src, sparse)
    mask_tokens = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
    if hasattr(decoder, "hf_token"):
        return PromptDecoding(None, None, None, mask_tokens, image_tokens)
    state = decoder_state(
        decoder, hs, image_tokens, multimask_output=multimask_output, return_tokens=True
    )
    masks = upscale_masks(decoder, state)
    return PromptDecoding(masks, state.iou_pred, state.tokens, mask_tokens, image_tokens)


def _cat(parts: list[PromptDecoding], order: torch.Tensor) -> PromptDecoding:
    def joined(name: str) -> torch.Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)[order]

    return PromptDecoding(
        *(
            joined(n)
            for n in ("low_res_logits", "iou_pred", "tokens", "mask_tokens", "image_tokens")
        )
    )


def decode_prompt_batch(
    model: nn.Module,
    image_embeddings: torch.Tensor,
    *,
    points: torch.Tensor,
    labels: torch.Tensor,
    boxes: torch.Tensor | None,
    has_box: torch.Tensor,
    prompt_image: torch.Tensor,
    multimask_output: bool,
    chunk: int = 256,
) -> PromptDecoding:
    """Decode a batch's P prompts (the trainer's :class:`~maskteacher.train.data.batch.Batch`
    fields: points (P, Kp, 2), labels (P, Kp), boxes (P, 4) or None, has_box (P,) bool,
    prompt_image (P,) long) in prompt order: point prompts and box prompts in separate calls (a
    box prompt's points are all padding), at most ``chunk`` prompts per call."""
    rows = torch.arange(points.shape[0], device=points.device)
    groups = (
        [(rows[~has_box], False), (rows[has_box], True)] if boxes is not None else [(rows, False)]
    )
    groups = [(r, box) for r, box in groups if r.numel()] or [(rows, False)]
    parts, order = [], []
    for group, box in groups:
        for start in range(0, max(group.numel(), 1), chunk):
            idx = group[start : start + chunk]
            parts.append(
                decode_features(
                    model,
                    image_embeddings,
                    points=None if box else points[idx],
                    labels=None if box else labels[idx],
                    boxes=boxes[idx] if box else None,
                    image_index=prompt_image[idx],
                    multimask_output=multimask_output,
                )
            )
            order.append(idx)
    return _cat(parts, torch.argsort(torch.cat(order)))
