"""The student's forward pass for training: encode the batch's images, decode all its prompts.

:class:`StudentForward` is the module that DDP wraps and ``torch.compile`` compiles: one
``forward`` runs the image encoder and the mask decoder so that gradients of both flow through
the wrapper (calling ``sam.image_encoder`` directly on a DDP-wrapped model would skip the
gradient all-reduce).

Decoding: everything-mode prompts (one positive point each) go through
:func:`maskteacher.models.decode_points` -- one decoder call for all images' prompts, in chunks
of ``points_per_batch``. Single-mode prompts (several points, or a box) go through
:func:`decode_prompts`, the same gather-by-image batching over the prompt encoder's sparse
embeddings (segment-anything's ``MaskDecoder.predict_masks`` repeats one image's embedding, so it
cannot mix images in one call). With ``checkpoint_decoder`` each chunk's activations are
recomputed in the backward pass instead of kept (``torch.utils.checkpoint``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from segment_anything.modeling import Sam
from torch import nn
from torch.utils.checkpoint import checkpoint

from maskteacher.models import DecoderOutput, decode_points, preprocess
from maskteacher.models.prompt_features import decode_prompt_batch
from maskteacher.train.data.batch import Batch


def decode_prompts(
    model: Sam,
    image_embeddings: torch.Tensor,
    *,
    points: torch.Tensor | None,
    labels: torch.Tensor | None,
    boxes: torch.Tensor | None,
    image_index: torch.Tensor,
    multimask_output: bool,
    return_tokens: bool = False,
) -> DecoderOutput:
    """Decode P sparse prompts (points with labels, or boxes) against their images' embeddings.

    image_embeddings: (B, C, E, E); points: (P, Kp, 2) float input frame with labels (P, Kp)
    int64 (1 positive, 0 negative, -1 padding), or None; boxes: (P, 4) float input frame or None;
    image_index: (P,) long. Equal to ``model.mask_decoder`` run image by image on the prompt
    encoder's embeddings (same multimask slicing as :func:`decode_points`).
    """
    pts = None if points is None else (points, labels)
    sparse, dense = model.prompt_encoder(points=pts, boxes=boxes, masks=None)
    decoder = model.mask_decoder
    selected = range(1, decoder.num_mask_tokens) if multimask_output else range(0, 1)
    num = sparse.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.expand(num, -1, -1), sparse], dim=1)
    src = image_embeddings.index_select(0, image_index) + dense
    pos = model.prompt_encoder.get_dense_pe().expand(num, -1, -1, -1)
    p, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos, tokens)
    mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(p, c, h, w))
    hyper_in = torch.stack(
        [decoder.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in selected], dim=1
    )
    _, c8, lh, lw = upscaled.shape
    masks = (hyper_in @ upscaled.reshape(p, c8, lh * lw)).reshape(p, len(selected), lh, lw)
    iou = decoder.iou_prediction_head(hs[:, 0, :])[:, selected.start : selected.stop]
    out_tokens = mask_tokens_out[:, selected.start : selected.stop, :] if return_tokens else None
    return DecoderOutput(low_res_logits=masks, iou_pred=iou, tokens=out_tokens)


@dataclass
class Predictions:
    """Student outputs for a batch (P prompts, K masks per prompt, L = S / 4).

    logits: (P, K, L, L); iou_pred: (P, K); tokens: (P, K, C) or None; embeddings: (B, C, E, E)
    image-encoder output (feature distillation reads it); mask_tokens: (P, 4, C) every mask
    token's output and image_tokens: (P, C, E, E) the decoder transformer's prompt-conditioned
    image embedding, or None (asked for by the prompt-dependent distillation blocks).
    """

    logits: torch.Tensor
    iou_pred: torch.Tensor
    tokens: torch.Tensor | None
    embeddings: torch.Tensor
    mask_tokens: torch.Tensor | None = None
    image_tokens: torch.Tensor | None = None

    @property
    def masks_per_prompt(self) -> int:
        return int(self.logits.shape[1])


def _cat_outputs(outs: list[DecoderOutput], order: torch.Tensor | None) -> DecoderOutput:
    logits = torch.cat([o.low_res_logits for o in outs])
    iou = torch.cat([o.iou_pred for o in outs])
    tokens = None if outs[0].tokens is None else torch.cat([o.tokens for o in outs])
    if order is not None:
        logits, iou = logits[order], iou[order]
        tokens = None if tokens is None else tokens[order]
    return DecoderOutput(logits, iou, tokens)


class StudentForward(nn.Module):
    """Image encoder + batched mask decoding of all prompts of a batch.

    ``forward(images, input_hw, points, labels, boxes, has_box, prompt_image)`` with the
    :class:`~maskteacher.train.batch.Batch` fields (on the model's device) returns
    ``(embeddings, logits, iou_pred, tokens)``; ``tokens`` is None unless ``return_tokens``.
    With ``return_features`` it decodes with :func:`~maskteacher.models.prompt_features.
    decode_prompt_batch` (the same values) and also returns ``(mask_tokens, image_tokens)``.
    """

    def __init__(
        self,
        sam: Sam,
        *,
        multimask_output: bool = False,
        points_per_batch: int = 256,
        return_tokens: bool = False,
        checkpoint_decoder: bool = False,
        return_features: bool = False,
    ) -> None:
        super().__init__()
        self.sam = sam
        self.multimask_output = multimask_output
        self.points_per_batch = points_per_batch
        self.return_tokens = return_tokens
        self.checkpoint_decoder = checkpoint_decoder
        self.return_features = return_features

    def forward(
        self,
        images: torch.Tensor,
        input_hw: torch.Tensor,
        points: torch.Tensor,
        labels: torch.Tensor,
        boxes: torch.Tensor | None,
        has_box: torch.Tensor,
        prompt_image: torch.Tensor,
    ):
        embeddings = self.sam.image_encoder(preprocess(self.sam, images, input_hw))
        if self.return_features:
            f = decode_prompt_batch(
                self.sam, embeddings, points=points, labels=labels, boxes=boxes, has_box=has_box,
                prompt_image=prompt_image, multimask_output=self.multimask_output,
                chunk=self.points_per_batch,
            )  # fmt: skip
            return embeddings, f.low_res_logits, f.iou_pred, f.tokens, f.mask_tokens, f.image_tokens
        simple = points.shape[1] == 1 and boxes is None
        if simple:
            out = self._chunks(self._decode_points, embeddings, points[:, 0, :], prompt_image)
        else:
            out = self._decode_mixed(embeddings, points, labels, boxes, has_box, prompt_image)
        return embeddings, out.low_res_logits, out.iou_pred, out.tokens

    # -- decoding ----------------------------------------------------------------------------
    def _decode_points(self, embeddings, points, image_index):
        out = decode_points(
            self.sam,
            embeddings,
            points,
            image_index=image_index,
            multimask_output=self.multimask_output,
            return_tokens=self.return_tokens,
        )
        return out.low_res_logits, out.iou_pred, out.tokens

    def _chunks(self, fn, embeddings, *per_prompt) -> DecoderOutput:
        total = per_prompt[0].shape[0]
        outs = []
        for start in range(0, max(total, 1), self.points_per_batch):
            args = [t[start : start + self.points_per_batch] for t in per_prompt]
            if self.checkpoint_decoder and torch.is_grad_enabled():
                res = checkpoint(fn, embeddings, *args, use_reentrant=False)
            else:
                res = fn(embeddings, *args)
            outs.append(DecoderOutput(*res))
        return _cat_outputs(outs, None)

    def _decode_mixed(self, embeddings, points, labels, boxes, has_box, prompt_image):
        groups, index_parts = [], []
        point_rows = (~has_box).nonzero().flatten()
        box_rows = has_box.nonzero().flatten()
        if point_rows.numel() or not box_rows.numel():

            def point_fn(emb, pts, lab, idx):
                out = decode_prompts(
                    self.sam, emb, points=pts, labels=lab, boxes=None, image_index=idx,
                    multimask_output=self.multimask_output, return_tokens=self.return_tokens,
                )  # fmt: skip
                return out.low_res_logits, out.iou_pred, out.tokens

            groups.append(
                self._chunks(
                    point_fn,
                    embeddings,
                    points[point_rows],
                    labels[point_rows],
                    prompt_image[point_rows],
                )  # fmt: skip
            )
            index_parts.append(point_rows)
        if box_rows.numel():

            def box_fn(emb, bxs, idx):
                out = decode_prompts(
                    self.sam, emb, points=None, labels=None, boxes=bxs, image_index=idx,
                    multimask_output=self.multimask_output, return_tokens=self.return_tokens,
                )  # fmt: skip
                return out.low_res_logits, out.iou_pred, out.tokens

            groups.append(self._chunks(box_fn, embeddings, boxes[box_rows], prompt_image[box_rows]))
            index_parts.append(box_rows)
        order = torch.argsort(torch.cat(index_parts))
        return _cat_outputs(groups, order)


def run_forward(module: nn.Module, batch: Batch) -> Predictions:
    """Run a (possibly DDP-wrapped or compiled) :class:`StudentForward` on a device batch."""
    out = module(
        batch.images,
        batch.input_hw,
        batch.points,
        batch.labels,
        batch.boxes,
        batch.has_box,
        batch.prompt_image,
    )
    emb, logits, iou, tokens, *features = out
    return Predictions(logits, iou, tokens, emb, *features)
