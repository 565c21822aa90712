"""Everything-mode candidates -> kept masks, in the low-res frame (steps 2-4 of
:func:`maskteacher.models.everything.generate_everything`).

:func:`filter_candidates` keeps the candidates of one decoded chunk of prompts
(:func:`~maskteacher.models.features.prompt_decoder`) passing the predicted-IoU and stability
filters; :func:`select_masks` runs box NMS per image over all chunks' survivors, applies the
per-image cap and returns one :class:`EverythingOutput` per image. Pixels outside the image (padding) count as -inf for
stability and boxes (:func:`~maskteacher.models.lowres.valid_lowres_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from segment_anything.utils.amg import batched_mask_to_box, calculate_stability_score
from torchvision.ops import batched_nms

from maskteacher.models.decode import DecoderOutput
from maskteacher.models.lowres import lowres_boxes_to_original, valid_lowres_mask


@dataclass
class EverythingOutput:
    """One image's teacher masks after filtering (N masks, best predicted IoU first).

    logits: (N, L, L) float32 mask logits, low-res frame (L = image_size / 4), raw decoder output.
    points: (N, 2) float32 (x, y) prompt point of each mask, model input frame.
    iou: (N,) float32 predicted IoU. stability: (N,) float32 stability score (low-res frame).
    boxes: (N, 4) float32 XYXY, original frame, pixel-edge coordinates (module docstring).
    embedding: (C, E, E) float32 image embedding (E = image_size / 16) or None.
    tokens: (N, C) float32 mask-decoder output token of each mask, or None.
    decoded_prompts: how many prompts were decoded for this image (the grid's, or fewer with
    the hierarchical strategy). All tensors live on the model's device.
    """

    logits: torch.Tensor
    points: torch.Tensor
    iou: torch.Tensor
    stability: torch.Tensor
    boxes: torch.Tensor
    embedding: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    decoded_prompts: int | None = None

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def to(self, device: torch.device | str) -> EverythingOutput:
        """A copy with every tensor moved to ``device``."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return EverythingOutput(
            logits=self.logits.to(device),
            points=self.points.to(device),
            iou=self.iou.to(device),
            stability=self.stability.to(device),
            boxes=self.boxes.to(device),
            embedding=move(self.embedding),
            tokens=move(self.tokens),
            decoded_prompts=self.decoded_prompts,
        )


@dataclass
class Kept:
    """Candidates of one decoder chunk that passed the IoU and stability filters (K rows)."""

    logits: torch.Tensor  # (K, L, L) float32
    points: torch.Tensor  # (K, 2)
    iou: torch.Tensor  # (K,)
    stability: torch.Tensor  # (K,)
    lowres_boxes: torch.Tensor  # (K, 4) inclusive low-res indices
    image: torch.Tensor  # (K,) long
    tokens: torch.Tensor | None  # (K, C)


def filter_candidates(
    out: DecoderOutput,
    points: torch.Tensor,
    image: torch.Tensor,
    input_hw: torch.Tensor,
    *,
    pred_iou_thresh: float,
    stability_score_thresh: float,
    stability_score_offset: float,
    mask_threshold: float,
) -> Kept:
    """Keep the candidates of one decoded chunk passing the IoU / stability filters.

    out: the decoder's output for the chunk's P prompts (K masks each); points: (P, 2); image:
    (P,) long image index; input_hw: (B, 2) of the batch."""
    k = out.low_res_logits.shape[1]
    logits = out.low_res_logits.flatten(0, 1).float()  # (p*k, L, L), order (point, mask)
    iou = out.iou_pred.flatten().float()
    cand_image = image.repeat_interleave(k)
    cand_points = points.repeat_interleave(k, dim=0)
    tokens = out.tokens.flatten(0, 1).float() if out.tokens is not None else None

    keep = torch.arange(logits.shape[0], device=logits.device)
    if pred_iou_thresh > 0.0:
        keep = keep[iou[keep] > pred_iou_thresh]
    low_res = logits.shape[-1]
    valid = valid_lowres_mask(input_hw, low_res)[cand_image[keep]]
    masked = logits[keep].masked_fill(~valid, float("-inf"))
    stability = calculate_stability_score(masked, mask_threshold, stability_score_offset)
    stability = torch.nan_to_num(stability.float(), nan=0.0)  # no pixel above -offset: 0
    if stability_score_thresh > 0.0:
        stable = stability >= stability_score_thresh
        keep, masked, stability = keep[stable], masked[stable], stability[stable]
    boxes = batched_mask_to_box(masked > mask_threshold).float()
    return Kept(
        logits=logits[keep],
        points=cand_points[keep],
        iou=iou[keep],
        stability=stability,
        lowres_boxes=boxes,
        image=cand_image[keep],
        tokens=None if tokens is None else tokens[keep],
    )


def empty_kept(low_res: int, token_dim: int | None, device: torch.device) -> Kept:
    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, device=device)

    return Kept(
        logits=zeros(0, low_res, low_res),
        points=zeros(0, 2),
        iou=zeros(0),
        stability=zeros(0),
        lowres_boxes=zeros(0, 4),
        image=torch.zeros(0, dtype=torch.long, device=device),
        tokens=None if token_dim is None else zeros(0, token_dim),
    )


def select_masks(
    kept: list[Kept],
    num_images: int,
    input_hw: torch.Tensor,
    orig_hw: torch.Tensor,
    *,
    image_embeddings: torch.Tensor | None,
    return_tokens: bool,
    box_nms_thresh: float,
    max_masks_per_image: int | None,
    low_res: int,
    token_dim: int,
    decoded_prompts: list[int] | None = None,
) -> list[EverythingOutput]:
    """Box NMS per image over all chunks' survivors, cap, split into per-image outputs
    (decoded_prompts: per image, recorded in the outputs)."""
    device = input_hw.device
    if not kept:  # no prompts at all
        kept = [empty_kept(low_res, token_dim if return_tokens else None, device)]
    logits = torch.cat([c.logits for c in kept])
    points = torch.cat([c.points for c in kept])
    iou = torch.cat([c.iou for c in kept])
    stability = torch.cat([c.stability for c in kept])
    lowres_boxes = torch.cat([c.lowres_boxes for c in kept])
    image = torch.cat([c.image for c in kept])
    tokens = torch.cat([c.tokens for c in kept]) if return_tokens else None
    boxes = lowres_boxes_to_original(lowres_boxes, input_hw[image], orig_hw[image])
    order = batched_nms(boxes, iou, image, box_nms_thresh)  # best score first
    outputs = []
    for b in range(num_images):
        sel = order[image[order] == b]
        if max_masks_per_image is not None:
            sel = sel[:max_masks_per_image]
        outputs.append(
            EverythingOutput(
                logits=logits[sel],
                points=points[sel],
                iou=iou[sel],
                stability=stability[sel],
                boxes=boxes[sel],
                embedding=None if image_embeddings is None else image_embeddings[b],
                tokens=None if tokens is None else tokens[sel],
                decoded_prompts=None if decoded_prompts is None else decoded_prompts[b],
            )
        )
    return outputs
