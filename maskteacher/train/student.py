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

Point-sampled decoding (``point_decoding``, used when the losses sample ``train.loss_points``
pixels): the decoder's transformer runs with gradients, the (P, K, L, L) logits for matching and
IoU targets come from a no-grad pass of the output upscaling (chunk by chunk), and the losses'
gradients flow only through :meth:`PointHead.logits_at` at the sampled pixels -- exact, because
the upscaling is pixel-local (:mod:`maskteacher.models.upscale`). The full upscaled map, and
its activations per prompt, are never kept for the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from segment_anything.modeling import Sam
from torch import nn
from torch.utils.checkpoint import checkpoint

from maskteacher.models import DecoderOutput, decode_points, preprocess
from maskteacher.models.decode import (
    DecoderState,
    decode_points_state,
    run_decoder,
    upscale_masks,
)
from maskteacher.models.prompt_features import decode_prompt_batch
from maskteacher.models.upscale import check_pixel_local, logits_at
from maskteacher.train.data.batch import Batch


def decode_prompts_state(
    model: Sam,
    image_embeddings: torch.Tensor,
    *,
    points: torch.Tensor | None,
    labels: torch.Tensor | None,
    boxes: torch.Tensor | None,
    image_index: torch.Tensor,
    multimask_output: bool,
    return_tokens: bool = False,
) -> DecoderState:
    """:func:`decode_prompts` up to the mask upscaling (same arguments)."""
    pts = None if points is None else (points, labels)
    sparse, dense = model.prompt_encoder(points=pts, boxes=boxes, masks=None)
    src = image_embeddings.index_select(0, image_index) + dense
    return run_decoder(
        model, src, sparse, multimask_output=multimask_output, return_tokens=return_tokens
    )


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
    state = decode_prompts_state(
        model, image_embeddings, points=points, labels=labels, boxes=boxes,
        image_index=image_index, multimask_output=multimask_output, return_tokens=return_tokens,
    )  # fmt: skip
    return DecoderOutput(upscale_masks(model.mask_decoder, state), state.iou_pred, state.tokens)


@dataclass
class PointHead:
    """Mask logits at chosen low-res pixels, with gradients (point-sampled decoding).

    upscaling: the student's ``mask_decoder.output_upscaling`` (its structure); src: (P, C, E, E)
    transformer output of every prompt; hyper_in: (P, K, C/8); params: the upscaling's
    parameters as the forward returned them (so that DDP sees them used); autocast: the dtype
    the forward ran under autocast with (None: none), applied again here.
    """

    upscaling: nn.Sequential
    src: torch.Tensor
    hyper_in: torch.Tensor
    params: dict[str, torch.Tensor]
    autocast: torch.dtype | None = None

    def logits_at(self, rows: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """rows: (N,) flat prediction indices (prompt * K + mask); pixels: (N, S) long flat
        low-res pixel indices -> (N, S) logits, equal to the dense decoder's at those pixels."""
        k = self.hyper_in.shape[1]
        rows = rows.to(self.src.device)
        hyper = self.hyper_in.flatten(0, 1).index_select(0, rows)
        device = self.src.device.type
        with torch.autocast(
            device, dtype=self.autocast or torch.bfloat16, enabled=bool(self.autocast)
        ):
            return logits_at(
                self.upscaling, self.src, hyper, rows // k, pixels.to(self.src.device),
                params=self.params,
            )  # fmt: skip


def use_point_decoding(enabled: bool, loss_points: int | None, image_size: int) -> bool:
    """Decode at sampled pixels only when the losses sample fewer pixels than the low-res map
    has (``train.point_decoding`` with ``train.loss_points``; otherwise every pixel has a loss
    and needs the dense map with gradients)."""
    return enabled and loss_points is not None and loss_points < (image_size // 4) ** 2


@dataclass
class Predictions:
    """Student outputs for a batch (P prompts, K masks per prompt, L = S / 4).

    logits: (P, K, L, L); iou_pred: (P, K); tokens: (P, K, C) or None; embeddings: (B, C, E, E)
    image-encoder output (feature distillation reads it). point_head: set under point-sampled
    decoding, when ``logits`` come from a no-grad pass (matching, IoU targets) and the losses'
    gradients flow through :meth:`PointHead.logits_at` only. mask_tokens: (P, 4, C) every mask
    token's output and image_tokens: (P, C, E, E) the decoder transformer's prompt-conditioned
    image embedding, or None (asked for by the prompt-dependent distillation blocks).
    """

    logits: torch.Tensor
    iou_pred: torch.Tensor
    tokens: torch.Tensor | None
    embeddings: torch.Tensor
    point_head: PointHead | None = None
    mask_tokens: torch.Tensor | None = None
    image_tokens: torch.Tensor | None = None

    @property
    def masks_per_prompt(self) -> int:
        return int(self.logits.shape[1])


def _cat(parts: list[tuple], order: torch.Tensor | None) -> tuple:
    """Concatenate per-chunk tuples of (P_i, ...) tensors position by position (None stays
    None), then reorder the rows by ``order`` when given."""
    out = []
    for column in zip(*parts):
        if column[0] is None:
            out.append(None)
            continue
        t = torch.cat(column)
        out.append(t if order is None else t[order])
    return tuple(out)


class StudentForward(nn.Module):
    """Image encoder + batched mask decoding of all prompts of a batch.

    ``forward(images, input_hw, points, labels, boxes, has_box, prompt_image)`` with the
    :class:`~maskteacher.train.batch.Batch` fields (on the model's device) returns
    ``(embeddings, logits, iou_pred, tokens)``; ``tokens`` is None unless ``return_tokens``.
    With ``point_decoding`` the logits come from a no-grad pass (chunked like the decoder) and
    three more outputs follow: the transformer output ``src`` (P, C, E, E), ``hyper_in``
    (P, K, C/8) and the upscaling's parameters (as views, so that DDP counts them as used);
    :func:`run_forward` turns them into a :class:`PointHead`.
    With ``return_features`` it decodes with :func:`~maskteacher.models.prompt_features.
    decode_prompt_batch` (the same values) and also returns ``(mask_tokens, image_tokens)``;
    point decoding is then off (the blocks read every prompt's dense logits with gradients).
    """

    def __init__(
        self,
        sam: Sam,
        *,
        multimask_output: bool = False,
        points_per_batch: int = 256,
        return_tokens: bool = False,
        checkpoint_decoder: bool = False,
        point_decoding: bool = False,
        return_features: bool = False,
    ) -> None:
        super().__init__()
        self.sam = sam
        self.multimask_output = multimask_output
        self.points_per_batch = points_per_batch
        self.return_tokens = return_tokens
        self.checkpoint_decoder = checkpoint_decoder
        self.return_features = return_features
        self.point_decoding = point_decoding and not return_features
        if self.point_decoding:
            check_pixel_local(sam.mask_decoder.output_upscaling)

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
            out = self._chunks(embeddings, points[:, 0, :], None, None, prompt_image)
        else:
            out = self._decode_mixed(embeddings, points, labels, boxes, has_box, prompt_image)
        if not self.point_decoding:
            return (embeddings, *out)
        views = tuple(p.view_as(p) for p in self.sam.mask_decoder.output_upscaling.parameters())
        return (embeddings, *out, views)

    # -- decoding ----------------------------------------------------------------------------
    def _decode(self, embeddings, points, labels, boxes, image_index) -> tuple:
        """One chunk: (logits, iou, tokens), or under point decoding (src, hyper_in, iou,
        tokens) -- what the decoder's activations are kept (or checkpointed) for. Single
        points (labels and boxes None) go through ``decode_points``, others ``decode_prompts``."""
        kwargs = {"multimask_output": self.multimask_output, "return_tokens": self.return_tokens}
        single = labels is None and boxes is None
        if not self.point_decoding:
            if single:
                out = decode_points(self.sam, embeddings, points, image_index=image_index, **kwargs)
            else:
                out = decode_prompts(
                    self.sam, embeddings, points=points, labels=labels, boxes=boxes,
                    image_index=image_index, **kwargs,
                )  # fmt: skip
            return out.low_res_logits, out.iou_pred, out.tokens
        if image_index.numel() == 0:
            return self._empty_state(embeddings)
        if single:
            state = decode_points_state(
                self.sam, embeddings, points, image_index=image_index, **kwargs
            )
        else:
            state = decode_prompts_state(
                self.sam, embeddings, points=points, labels=labels, boxes=boxes,
                image_index=image_index, **kwargs,
            )  # fmt: skip
        return state.src, state.hyper_in, state.iou_pred, state.tokens

    def _empty_state(self, embeddings) -> tuple:
        decoder = self.sam.mask_decoder
        k = decoder.num_mask_tokens - 1 if self.multimask_output else 1
        c, e = embeddings.shape[1], embeddings.shape[-1]
        new = embeddings.new_zeros
        tokens = new(0, k, decoder.transformer_dim) if self.return_tokens else None
        return new(0, c, e, e), new(0, k, c // 8), new(0, k), tokens

    def _chunks(self, embeddings, points, labels, boxes, image_index) -> tuple:
        """Decode in chunks of ``points_per_batch`` prompts; returns (logits, iou, tokens) and,
        under point decoding, (src, hyper_in) after them."""
        total = image_index.shape[0]
        outs = []
        for start in range(0, max(total, 1), self.points_per_batch):
            args = [
                None if t is None else t[start : start + self.points_per_batch]
                for t in (points, labels, boxes, image_index)
            ]
            if self.checkpoint_decoder and torch.is_grad_enabled():
                res = checkpoint(self._decode, embeddings, *args, use_reentrant=False)
            else:
                res = self._decode(embeddings, *args)
            if self.point_decoding:
                src, hyper_in, iou, tokens = res
                with torch.no_grad():
                    state = DecoderState(src.detach(), hyper_in.detach(), iou)
                    masks = upscale_masks(self.sam.mask_decoder, state)
                res = (masks, iou, tokens, src, hyper_in)
            outs.append(res)
        return _cat(outs, None)

    def _decode_mixed(self, embeddings, points, labels, boxes, has_box, prompt_image) -> tuple:
        groups, index_parts = [], []
        point_rows = (~has_box).nonzero().flatten()
        box_rows = has_box.nonzero().flatten()
        if point_rows.numel() or not box_rows.numel():
            groups.append(
                self._chunks(
                    embeddings,
                    points[point_rows],
                    labels[point_rows],
                    None,
                    prompt_image[point_rows],
                )  # fmt: skip
            )
            index_parts.append(point_rows)
        if box_rows.numel():
            groups.append(
                self._chunks(embeddings, None, None, boxes[box_rows], prompt_image[box_rows])
            )
            index_parts.append(box_rows)
        order = torch.argsort(torch.cat(index_parts))
        return _cat(groups, order)


def _unwrap(module: nn.Module) -> StudentForward:
    """The :class:`StudentForward` inside a DDP and / or torch.compile wrapper."""
    while not isinstance(module, StudentForward):
        module = getattr(module, "_orig_mod", None) or module.module
    return module


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
    inner = _unwrap(module)
    if inner.return_features:
        emb, logits, iou, tokens, mask_tokens, image_tokens = out
        return Predictions(
            logits, iou, tokens, emb, mask_tokens=mask_tokens, image_tokens=image_tokens
        )
    emb, logits, iou, tokens = out[:4]
    head = None
    if inner.point_decoding:
        src, hyper_in, views = out[4:]
        upscaling = inner.sam.mask_decoder.output_upscaling
        names = [name for name, _ in upscaling.named_parameters()]
        device = batch.images.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        head = PointHead(upscaling, src, hyper_in, dict(zip(names, views)), dtype)
    return Predictions(logits=logits, iou_pred=iou, tokens=tokens, embeddings=emb, point_head=head)
