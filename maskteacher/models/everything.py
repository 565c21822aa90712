"""Segment-everything generation with a SAM teacher, filtered on the device in the low-res frame.

:func:`generate_everything` is the one function that turns padded model-input images into the
teacher's everything-mode masks; ``maskteacher precompute`` writes its output to the cache, the
trainer's online-teacher mode and evaluation call it directly, so cached and online teachers are
the same computation.

What it computes (``SamAutomaticMaskGenerator`` with ``crop_n_layers=0`` and
``min_mask_region_area=0``, minus the full-resolution work):

1. the image encoder once per image, batched over the images;
2. one positive point prompt per grid point (``points_per_side`` squared, the generator's grid
   in the model input frame, see :func:`maskteacher.data.point_grid`) or per given point,
   decoded ``points_per_batch`` prompts at a time *across* images (one
   :func:`~maskteacher.models.decode_points` call per chunk), with multimask output;
3. per candidate mask: keep it if ``predicted IoU > pred_iou_thresh`` (only when the threshold
   is > 0), then if ``stability >= stability_score_thresh`` (only when > 0), stability being
   segment-anything's ``calculate_stability_score`` (mask threshold 0, ``offset``);
4. box NMS per image (torchvision ``batched_nms`` with the image as category, scores = predicted
   IoU, ``box_nms_thresh``), then optionally the ``max_masks_per_image`` best by predicted IoU.

Differences from the reference, by design: stability and boxes are computed on the low-res
logits (L = image_size / 4) instead of masks upsampled to the original image, and nothing is
RLE-encoded. Low-res pixels outside the image -- beyond ``lowres_valid_hw(input_hw) =
(ceil(h_in / 4), ceil(w_in / 4))``, i.e. blocks made only of padding -- are excluded from
stability and boxes (their logits count as -inf there); the returned logits are the decoder's
raw output everywhere, so upsampling them (:func:`lowres_to_masks`) gives exactly the masks the
reference would produce for the same prompt.

Box mapping (:func:`lowres_boxes_to_original`): a low-res box spanning rows ``r0..r1`` and
columns ``c0..c1`` (inclusive, as ``batched_mask_to_box`` reports them) covers input-frame pixels
``[4 c0, 4 c1 + 4) x [4 r0, 4 r1 + 4)``; with ``sx = W / w_in`` and ``sy = H / h_in`` it maps to
the original-frame box ``(4 c0 sx, 4 r0 sy, min(4 (c1 + 1) sx, W), min(4 (r1 + 1) sy, H))``.
Boxes are XYXY in pixel-edge coordinates: a mask covering the whole image has box
``(0, 0, W, H)`` (segment-anything's ``batched_mask_to_box`` reports the last pixel's index
instead, i.e. one pixel less on x1 / y1). An empty mask has box ``(0, 0, 0, 0)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.amg import batched_mask_to_box, calculate_stability_score
from torchvision.ops import batched_nms

from maskteacher.data.transforms import point_grid
from maskteacher.models.decode import decode_points, preprocess

#: Recorded in cache headers: version of the generation semantics of this module.
GENERATOR = "maskteacher.everything/1"


@dataclass(frozen=True)
class GenerationParams:
    """Everything-mode settings of :func:`generate_everything` (the ``precompute`` config
    section's values; precompute, eval and the trainer's online teacher all read them here)."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    max_masks_per_image: int | None = None
    multimask_output: bool = True
    bf16: bool = False

    @classmethod
    def from_config(cls, precompute: Any) -> GenerationParams:
        """From a ``precompute`` config section (any object with these attributes)."""
        return cls(**{f.name: getattr(precompute, f.name) for f in dataclasses.fields(cls)})

    def generator_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``generate_everything``."""
        return dataclasses.asdict(self)

    def header_params(self) -> dict[str, Any]:
        """What the cache header records and a resumed / merged run must match."""
        params = {k: v for k, v in dataclasses.asdict(self).items() if k != "points_per_batch"}
        params["generator"] = GENERATOR
        params["mask_threshold"] = 0.0
        return params


@dataclass
class EverythingOutput:
    """One image's teacher masks after filtering (N masks, best predicted IoU first).

    logits: (N, L, L) float32 mask logits, low-res frame (L = image_size / 4), raw decoder output.
    points: (N, 2) float32 (x, y) prompt point of each mask, model input frame.
    iou: (N,) float32 predicted IoU. stability: (N,) float32 stability score (low-res frame).
    boxes: (N, 4) float32 XYXY, original frame, pixel-edge coordinates (module docstring).
    embedding: (C, E, E) float32 image embedding (E = image_size / 16) or None.
    tokens: (N, C) float32 mask-decoder output token of each mask, or None.
    All tensors live on the model's device.
    """

    logits: torch.Tensor
    points: torch.Tensor
    iou: torch.Tensor
    stability: torch.Tensor
    boxes: torch.Tensor
    embedding: torch.Tensor | None = None
    tokens: torch.Tensor | None = None

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
        )


@dataclass
class _Kept:
    """Candidates of one decoder chunk that passed the IoU and stability filters (K rows)."""

    logits: torch.Tensor  # (K, L, L) float32
    points: torch.Tensor  # (K, 2)
    iou: torch.Tensor  # (K,)
    stability: torch.Tensor  # (K,)
    lowres_boxes: torch.Tensor  # (K, 4) inclusive low-res indices
    image: torch.Tensor  # (K,) long
    tokens: torch.Tensor | None  # (K, C)


def model_device(model: Sam) -> torch.device:
    """The device the model's buffers live on."""
    return model.pixel_mean.device


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device`` when ``bf16``, else a no-op context."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def encode_images(
    model: Sam, images: torch.Tensor, input_hw: torch.Tensor, *, bf16: bool = False
) -> torch.Tensor:
    """(B, 3, S, S) uint8 padded model-input images -> (B, C, E, E) float32 image embeddings."""
    device = model_device(model)
    with autocast(device, bf16):
        return model.image_encoder(preprocess(model, images, input_hw)).float()


@torch.no_grad()
def generate_everything(
    model: Sam,
    images: torch.Tensor | None,
    input_hw: torch.Tensor | Sequence[Sequence[int]],
    orig_hw: torch.Tensor | Sequence[Sequence[int]],
    *,
    points_per_side: int = 32,
    points_per_batch: int = 64,
    pred_iou_thresh: float = 0.88,
    stability_score_thresh: float = 0.95,
    stability_score_offset: float = 1.0,
    box_nms_thresh: float = 0.7,
    max_masks_per_image: int | None = None,
    multimask_output: bool = True,
    bf16: bool = False,
    return_embedding: bool = False,
    return_tokens: bool = False,
    points: Sequence[torch.Tensor] | None = None,
    image_embeddings: torch.Tensor | None = None,
) -> list[EverythingOutput]:
    """Everything-mode teacher masks for a batch of images (see the module docstring).

    images: (B, 3, S, S) uint8, model input frame (resized, zero-padded bottom/right; e.g.
    :func:`maskteacher.data.to_model_input`), S = the model's image size. input_hw: (B, 2) (h, w)
    of the unpadded region; orig_hw: (B, 2) (H, W) of the original images (for boxes).
    points: optional per-image (n_i, 2) float (x, y) prompts in the model input frame, used
    instead of the ``points_per_side`` grid. image_embeddings: optional (B, C, E, E) encoder
    output to reuse (the encoder is then not run; ``images`` may be None).
    Runs under ``torch.no_grad()`` in eval mode (a model in train mode is switched to eval
    for the call and back); with ``bf16`` the encoder and decoder run under bfloat16 autocast,
    filtering always in float32. Returns one :class:`EverythingOutput` per image.
    """
    if points_per_batch < 1:
        raise ValueError(f"points_per_batch must be >= 1, got {points_per_batch}")
    device = model_device(model)
    in_hw = _as_hw(input_hw, "input_hw").to(device)
    og_hw = _as_hw(orig_hw, "orig_hw").to(device)
    num_images = in_hw.shape[0]
    if og_hw.shape[0] != num_images:
        raise ValueError(f"orig_hw has {og_hw.shape[0]} rows, input_hw {num_images}")
    if points is not None and len(points) != num_images:
        raise ValueError(f"points has {len(points)} entries for {num_images} images")
    was_training = model.training
    model.eval()
    try:
        if image_embeddings is None:
            if images is None or images.shape[0] != num_images:
                raise ValueError(f"images must be ({num_images}, 3, S, S)")
            image_embeddings = encode_images(model, images, in_hw, bf16=bf16)
        prompts = _prompts(points, points_per_side, in_hw, device)
        kept = [
            _decode_and_filter(
                model,
                image_embeddings,
                chunk_points,
                chunk_image,
                in_hw,
                multimask_output=multimask_output,
                bf16=bf16,
                return_tokens=return_tokens,
                pred_iou_thresh=pred_iou_thresh,
                stability_score_thresh=stability_score_thresh,
                stability_score_offset=stability_score_offset,
                mask_threshold=float(model.mask_threshold),
            )
            for chunk_points, chunk_image in _chunks(*prompts, points_per_batch)
        ]
    finally:
        model.train(was_training)
    return _select(
        kept,
        num_images,
        in_hw,
        og_hw,
        image_embeddings=image_embeddings if return_embedding else None,
        return_tokens=return_tokens,
        box_nms_thresh=box_nms_thresh,
        max_masks_per_image=max_masks_per_image,
        low_res=int(image_embeddings.shape[-1]) * 4,
        token_dim=int(model.mask_decoder.transformer_dim),
    )


def _as_hw(hw: torch.Tensor | Sequence[Sequence[int]], name: str) -> torch.Tensor:
    out = torch.as_tensor(hw, dtype=torch.long)
    if out.ndim != 2 or out.shape[1] != 2:
        raise ValueError(f"{name} must be (B, 2), got {tuple(out.shape)}")
    return out


def _prompts(
    points: Sequence[torch.Tensor] | None,
    points_per_side: int,
    input_hw: torch.Tensor,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All prompts of the batch: (P, 2) float32 points and (P,) long image index."""
    per_image = []
    for b, (h, w) in enumerate(input_hw.tolist()):
        if points is None:
            pts = torch.from_numpy(point_grid(points_per_side, (h, w)))
        else:
            pts = torch.as_tensor(points[b], dtype=torch.float32)
            if pts.ndim != 2 or pts.shape[1] != 2:
                raise ValueError(f"points[{b}] must be (n, 2), got {tuple(pts.shape)}")
        per_image.append(pts.to(device, torch.float32))
    image = torch.cat([torch.full((len(p),), b, dtype=torch.long) for b, p in enumerate(per_image)])
    return torch.cat(per_image), image.to(device)


def _chunks(
    points: torch.Tensor, image: torch.Tensor, size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, points.shape[0], size):
        yield points[start : start + size], image[start : start + size]


def valid_lowres_mask(input_hw: torch.Tensor, low_res: int) -> torch.Tensor:
    """(B, L, L) bool: low-res pixels that touch the image (rows < ceil(h/4), cols < ceil(w/4))."""
    valid = torch.div(input_hw + 3, 4, rounding_mode="floor")  # ceil(hw / 4)
    coords = torch.arange(low_res, device=input_hw.device)
    rows = coords[None, :] < valid[:, 0:1]
    cols = coords[None, :] < valid[:, 1:2]
    return rows[:, :, None] & cols[:, None, :]


def _decode_and_filter(
    model: Sam,
    embeddings: torch.Tensor,
    points: torch.Tensor,
    image: torch.Tensor,
    input_hw: torch.Tensor,
    *,
    multimask_output: bool,
    bf16: bool,
    return_tokens: bool,
    pred_iou_thresh: float,
    stability_score_thresh: float,
    stability_score_offset: float,
    mask_threshold: float,
) -> _Kept:
    """Decode one chunk of prompts and keep the candidates passing the IoU / stability filters."""
    with autocast(embeddings.device, bf16):
        out = decode_points(
            model,
            embeddings,
            points,
            image_index=image,
            multimask_output=multimask_output,
            return_tokens=return_tokens,
        )
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
    return _Kept(
        logits=logits[keep],
        points=cand_points[keep],
        iou=iou[keep],
        stability=stability,
        lowres_boxes=boxes,
        image=cand_image[keep],
        tokens=None if tokens is None else tokens[keep],
    )


def _empty_kept(low_res: int, token_dim: int | None, device: torch.device) -> _Kept:
    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, device=device)

    return _Kept(
        logits=zeros(0, low_res, low_res),
        points=zeros(0, 2),
        iou=zeros(0),
        stability=zeros(0),
        lowres_boxes=zeros(0, 4),
        image=torch.zeros(0, dtype=torch.long, device=device),
        tokens=None if token_dim is None else zeros(0, token_dim),
    )


def lowres_boxes_to_original(
    boxes: torch.Tensor, input_hw: torch.Tensor, orig_hw: torch.Tensor
) -> torch.Tensor:
    """(K, 4) inclusive low-res XYXY indices -> (K, 4) float32 original-frame pixel-edge XYXY.

    input_hw / orig_hw: (K, 2) per box (the box's image). Empty boxes (all zero, as
    ``batched_mask_to_box`` reports an empty mask) stay (0, 0, 0, 0). See the module docstring.
    """
    in_hw = input_hw.to(torch.float32)
    og_hw = orig_hw.to(torch.float32)
    scale_x = 4.0 * og_hw[:, 1] / in_hw[:, 1]
    scale_y = 4.0 * og_hw[:, 0] / in_hw[:, 0]
    out = torch.stack(
        [
            boxes[:, 0] * scale_x,
            boxes[:, 1] * scale_y,
            torch.minimum((boxes[:, 2] + 1) * scale_x, og_hw[:, 1]),
            torch.minimum((boxes[:, 3] + 1) * scale_y, og_hw[:, 0]),
        ],
        dim=1,
    )
    empty = (boxes == 0).all(dim=1, keepdim=True)
    return torch.where(empty, torch.zeros_like(out), out)


def _select(
    kept: list[_Kept],
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
) -> list[EverythingOutput]:
    """Box NMS per image over all chunks' survivors, cap, split into per-image outputs."""
    device = input_hw.device
    if not kept:  # no prompts at all
        kept = [_empty_kept(low_res, token_dim if return_tokens else None, device)]
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
            )
        )
    return outputs


def lowres_to_masks(
    logits: torch.Tensor,
    *,
    image_size: int,
    input_hw: Sequence[int],
    orig_hw: Sequence[int],
    threshold: float = 0.0,
    chunk: int = 16,
) -> torch.Tensor:
    """(N, L, L) low-res logits of one image -> (N, H, W) bool masks in the original frame.

    segment-anything's ``Sam.postprocess_masks``: bilinear to ``image_size`` square, crop the
    unpadded ``input_hw``, bilinear to ``orig_hw``, then ``> threshold``. For evaluation,
    agreement checks and pictures; done in chunks of ``chunk`` masks to bound memory.
    """
    h_in, w_in = (int(v) for v in input_hw)
    h, w = (int(v) for v in orig_hw)
    out = torch.zeros((logits.shape[0], h, w), dtype=torch.bool, device=logits.device)
    for start in range(0, logits.shape[0], chunk):
        x = logits[start : start + chunk, None].float()
        x = F.interpolate(x, (image_size, image_size), mode="bilinear", align_corners=False)
        x = F.interpolate(x[..., :h_in, :w_in], (h, w), mode="bilinear", align_corners=False)
        out[start : start + chunk] = x[:, 0] > threshold
    return out
