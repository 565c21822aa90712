"""Validation: mean best-match IoU of the student's everything-mode masks against ground truth.

For every ground-truth object of the validation set, the best IoU reached by any predicted mask
of its image (grid prompts, all of them, decoded in chunks) is taken; the score is the mean over
all objects (summed over DDP ranks before dividing). Masks are compared in the low-res frame.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from segment_anything.modeling import Sam

from maskteacher.models import decode_points, preprocess
from maskteacher.train.data.batch import Batch
from maskteacher.train.distributed import sum_tensor
from maskteacher.train.supervision.matcher import pairwise_mask_iou


@torch.no_grad()
def best_match_iou_sums(
    sam: Sam,
    batch: Batch,
    *,
    points_per_batch: int,
    multimask_output: bool,
    bf16: bool = False,
) -> tuple[float, int]:
    """(sum over GT objects of their best IoU, number of GT objects) for one device batch."""
    device = batch.images.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        emb = sam.image_encoder(preprocess(sam, batch.images, batch.input_hw))
    total, count = 0.0, 0
    offsets = batch.prompt_offsets.tolist()
    for i, gt in enumerate(batch.gt_masks):
        if gt.shape[0] == 0:
            continue
        best = torch.zeros(gt.shape[0], device=device)
        for start in range(offsets[i], offsets[i + 1], points_per_batch):
            stop = min(start + points_per_batch, offsets[i + 1])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = decode_points(
                    sam,
                    emb,
                    batch.points[start:stop, 0, :],
                    image_index=batch.prompt_image[start:stop],
                    multimask_output=multimask_output,
                )
            iou = pairwise_mask_iou(out.low_res_logits.flatten(0, 1), gt)
            best = torch.maximum(best, iou.max(dim=0).values)
        total += float(best.sum())
        count += int(gt.shape[0])
    return total, count


@torch.no_grad()
def validate(
    sam: Sam,
    loader: Iterable[Batch],
    *,
    device: torch.device,
    points_per_batch: int,
    multimask_output: bool,
    bf16: bool = False,
) -> float:
    """Mean best-match IoU over every GT object the loader yields (all ranks); 0 when none.

    The model is put in eval mode for the pass and restored to its previous mode afterwards.
    """
    was_training = sam.training
    sam.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for batch in loader:
            total, count = best_match_iou_sums(
                sam,
                batch.to(device),
                points_per_batch=points_per_batch,
                multimask_output=multimask_output,
                bf16=bf16,
            )
            sums[0] += total
            sums[1] += count
    finally:
        sam.train(was_training)
    sum_tensor(sums)
    return float(sums[0] / sums[1]) if sums[1] > 0 else 0.0
