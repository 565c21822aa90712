"""From a batch's predictions to matched pairs and task terms: the steps every everything-mode
strategy shares (split by image, Hungarian-match to targets, gather pairs, criterion terms)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maskteacher.train.data.batch import Batch
from maskteacher.train.student import PointHead, Predictions
from maskteacher.train.supervision.base import StepContext
from maskteacher.train.supervision.criterion import MaskCriterion, PairBatch
from maskteacher.train.supervision.matcher import (
    Match,
    MatchSettings,
    lowres_pixels,
    match_batch,
    unmatched,
)


@dataclass
class ImagePredictions:
    """One image's predictions with the K masks per prompt flattened (Q = P_i * K).

    logits: (Q, L, L); iou_pred: (Q,); prompt: (Q,) index of the prompt within the batch;
    points: (Q, 2) the prompt's first point (input frame); tokens: (Q, C) or None; rows: (Q,)
    flat index of each prediction in the batch (prompt * K + mask); head: the batch's
    :class:`~maskteacher.train.student.PointHead` under point-sampled decoding (``logits``
    then carry no gradient), else None.
    """

    logits: torch.Tensor
    iou_pred: torch.Tensor
    prompt: torch.Tensor
    points: torch.Tensor
    tokens: torch.Tensor | None
    rows: torch.Tensor | None = None
    head: PointHead | None = None


def image_predictions(preds: Predictions, batch: Batch) -> list[ImagePredictions]:
    """Split a batch's predictions by image, flattening the K masks of each prompt."""
    k = preds.masks_per_prompt
    out = []
    offsets = batch.prompt_offsets.tolist()
    for i in range(batch.num_images):
        lo, hi = offsets[i], offsets[i + 1]
        logits = preds.logits[lo:hi].flatten(0, 1)
        prompt = torch.arange(lo, hi, device=batch.points.device).repeat_interleave(k)
        tokens = None if preds.tokens is None else preds.tokens[lo:hi].flatten(0, 1)
        out.append(
            ImagePredictions(
                logits=logits,
                iou_pred=preds.iou_pred[lo:hi].flatten(),
                prompt=prompt,
                points=batch.points[prompt, 0, :],
                tokens=tokens,
                rows=torch.arange(lo * k, hi * k),
                head=preds.point_head,
            )
        )
    return out


def gather_pairs(
    images: list[ImagePredictions], targets: list[torch.Tensor], matches: list[Match]
) -> PairBatch:
    """Concatenate the matched (prediction, target) pairs and the unmatched predictions' IoU."""
    logits, iou_pred, tgts, free = [], [], [], []
    for img, tgt, match in zip(images, targets, matches):
        device = img.logits.device
        pred_idx = match.pred.to(device)
        logits.append(img.logits.index_select(0, pred_idx))
        iou_pred.append(img.iou_pred.index_select(0, pred_idx))
        tgts.append(tgt.index_select(0, match.target.to(tgt.device)))
        free.append(img.iou_pred.index_select(0, unmatched(img.logits.shape[0], match).to(device)))
    return PairBatch(
        logits=torch.cat(logits),
        iou_pred=torch.cat(iou_pred),
        targets=torch.cat(tgts),
        unmatched_iou_pred=torch.cat(free),
        rows=matched_rows(images, matches),
        head=images[0].head if images else None,
    )


def matched_rows(images: list[ImagePredictions], matches: list[Match]) -> torch.Tensor | None:
    """(N,) flat batch indices of the matched predictions, in pair order (None without a
    point head: the dense logits are gathered instead)."""
    if not images or images[0].head is None:
        return None
    return torch.cat([img.rows.index_select(0, m.pred) for img, m in zip(images, matches)])


def match_and_pair(
    images: list[ImagePredictions],
    targets: list[torch.Tensor],
    *,
    settings: MatchSettings,
    image_size: int,
    generator: torch.Generator | None = None,
) -> tuple[list[Match], PairBatch]:
    """Hungarian-match each image's predictions to ``targets[i]`` ((M_i, L, L)) and pair them."""
    pixels = None
    if settings.requires_point:
        pixels = [
            lowres_pixels(img.points, image_size=image_size, low_res_size=img.logits.shape[-1])
            for img in images
        ]
    matches = match_batch(
        [img.logits.detach() for img in images],
        targets,
        settings=settings,
        prompt_pixels=pixels,
        generator=generator,
    )
    return matches, gather_pairs(images, targets, matches)


def task_terms(
    criterion: MaskCriterion, pairs: PairBatch, ctx: StepContext
) -> dict[str, torch.Tensor]:
    """The criterion's terms on ``pairs``, normalised by the matched and unmatched counts
    averaged over DDP ranks (``ctx.reduce_count``)."""
    return criterion(
        pairs,
        pair_count=ctx.reduce_count(pairs.num_pairs),
        unmatched_count=ctx.reduce_count(pairs.unmatched_iou_pred.shape[0]),
        generator=ctx.generator,
    )


def pair_stats(matches: list[Match], num_images: int) -> dict[str, float]:
    """The logging stats of a strategy's matches (``matched``, ``matched_iou_sum``, ``images``)."""
    return {
        "matched": float(sum(len(m) for m in matches)),
        "matched_iou_sum": float(sum(float(m.iou.sum()) for m in matches)),
        "images": float(num_images),
    }
