"""Random-weight SAM teachers with SAM-like outputs, and thresholds calibrated to them.

Shared by ``bench/precompute.py`` and ``bench/generation.py`` (their docstrings say why: random
weights give ~0.03 logits where every stability score is 0, and a checkerboard from the random
2x2 transposed-conv kernels). :func:`build_teacher` scales the mask head to a logit spread
(``args.logit_std``), centres the IoU head on 0.5 and (unless ``args.keep_upscaling``)
replaces each upscaling kernel by its mean over the taps; :func:`calibrate` picks thresholds
under which about ``args.masks`` masks per image survive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from maskteacher.data import to_model_input
from maskteacher.models import build_sam, is_hq_model
from maskteacher.models.everything import generate_everything


def scale_mask_logits(model: torch.nn.Module, factor: float) -> None:
    decoder = model.mask_decoder
    mlps = list(decoder.output_hypernetworks_mlps)
    if is_hq_model(model):
        mlps.append(decoder.hf_mlp)
    with torch.no_grad():
        for mlp in mlps:
            mlp.layers[-1].weight.mul_(factor)
            mlp.layers[-1].bias.mul_(factor)


def upscaling_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder's 2x2 transposed convolutions (SAM-HQ: those of the HQ features too)."""
    decoder = model.mask_decoder
    parts = [decoder.output_upscaling]
    if is_hq_model(model):
        parts += [decoder.embedding_encoder, decoder.compress_vit_feat]
    return [m for part in parts for m in part if isinstance(m, torch.nn.ConvTranspose2d)]


def build_teacher(
    args, device: torch.device, probe: np.ndarray, model_type: str | None = None
) -> tuple[torch.nn.Module, float]:
    """Random-weight teacher with SAM-like output ranges: the mask head scaled to logit std
    ``args.logit_std``, the IoU head's bias shifted so that predicted IoUs centre on 0.5 (random
    weights centre them on 0, where a positive pred_iou_thresh would keep nothing)."""
    torch.manual_seed(args.seed)
    model = build_sam(model_type or args.model, image_size=args.image_size).to(device).eval()
    model.requires_grad_(False)
    x, hw = to_model_input(probe, args.image_size)

    def probe_output():
        return generate_everything(
            model,
            x[None].to(device),
            [hw],
            [probe.shape[:2]],
            points_per_side=8,
            pred_iou_thresh=0.0,
            stability_score_thresh=0.0,
            box_nms_thresh=1.0,
        )[0]

    if not args.keep_upscaling:
        # random 2x2 transposed-conv kernels put a checkerboard into every mask (trained SAM
        # kernels do not): use each kernel's mean over its taps
        with torch.no_grad():
            for layer in upscaling_layers(model):
                layer.weight.copy_(
                    layer.weight.mean(dim=(2, 3), keepdim=True).expand_as(layer.weight)
                )
    factor = args.logit_std / float(probe_output().logits.std())
    scale_mask_logits(model, factor)
    with torch.no_grad():
        model.mask_decoder.iou_prediction_head.layers[-1].bias += 0.5 - probe_output().iou.median()
    return model, factor


@dataclass
class Thresholds:
    pred_iou_thresh: float
    stability_score_thresh: float
    box_nms_thresh: float
    note: str


def calibrate(model, images, args, device) -> Thresholds:
    """Thresholds under which ~args.masks masks per image survive (module docstring), from the
    predicted IoU and stability of every grid candidate of every image. The candidates' stability
    is ours (low-res); with the smoothed upscaling it ranks masks as the reference's
    full-resolution stability does (the agreement figure checks the outcome)."""
    target = args.masks * len(images)
    ious, stabs = [], []
    for image in images:
        x, hw = to_model_input(image, args.image_size)
        out = generate_everything(
            model,
            x[None].to(device),
            [hw],
            [image.shape[:2]],
            points_per_side=args.points_per_side,
            points_per_batch=args.points_per_batch,
            pred_iou_thresh=0.0,
            stability_score_thresh=0.0,
            box_nms_thresh=1.0,
        )[0]
        ious.append(out.iou.cpu())
        stabs.append(out.stability.cpu())
    iou, stab = torch.cat(ious), torch.cat(stabs)
    stab_t = 0.95
    if int((stab >= stab_t).sum()) < 1.5 * target:
        stab_t = float(torch.quantile(stab, 1.0 - min(1.0, 1.5 * target / len(stab))))
    kept = torch.sort(iou[stab >= stab_t], descending=True).values
    k = min(target, len(kept) - 1)
    iou_t = float(kept[k - 1] + kept[k]) / 2 if k > 0 else 0.0
    nms_t, note = 0.7, ""
    survivors = 0
    for image in images:
        x, hw = to_model_input(image, args.image_size)
        survivors += len(
            generate_everything(
                model,
                x[None].to(device),
                [hw],
                [image.shape[:2]],
                points_per_side=args.points_per_side,
                points_per_batch=args.points_per_batch,
                pred_iou_thresh=iou_t,
                stability_score_thresh=stab_t,
                box_nms_thresh=nms_t,
            )[0]
        )
    if survivors < target / 2:
        note = (
            f"box NMS at 0.7 keeps {survivors / len(images):.1f} masks/image of random weights' "
            "image-wide masks -> box_nms_thresh 1.0"
        )
        nms_t = 1.0
    return Thresholds(iou_t, stab_t, nms_t, note)
