"""The task criterion: named loss terms over matched pairs, and the one place weights apply.

``MaskCriterion`` turns a mini-batch's matched pairs (and its unmatched predictions) into a dict
of named terms (``bce``, ``focal``, ``dice``, ``iou``, ``cls``). Each term is a *sum* over pairs
divided by a normaliser the caller supplies -- the number of matched pairs in the mini-batch,
all-reduced (and averaged over ranks) under DDP, as DETR does -- so the loss is the mean over
matched pairs whatever the rank count. ``cls`` is normalised by the unmatched count likewise.

:func:`weighted_total` multiplies terms by their weights. A weighted key that was not computed is
an error (a typo in a weight would otherwise silently train nothing); terms without a weight are
logged but not added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from maskteacher.train.supervision import losses

if TYPE_CHECKING:
    from maskteacher.train.student import PointHead


@dataclass
class PairBatch:
    """Matched pairs of a mini-batch, concatenated over images.

    logits: (N, L, L) predicted logits; iou_pred: (N,) predicted IoU; targets: (N, L, L) bool (or
    float in [0, 1] for soft targets); unmatched_iou_pred: (U,) predicted IoU of the predictions
    matched to nothing. Under point-sampled decoding ``logits`` carry no gradient and ``head``
    gives the differentiable logits of prediction ``rows`` (N,) at chosen pixels.
    """

    logits: torch.Tensor
    iou_pred: torch.Tensor
    targets: torch.Tensor
    unmatched_iou_pred: torch.Tensor
    rows: torch.Tensor | None = None
    head: PointHead | None = None

    @property
    def num_pairs(self) -> int:
        return int(self.logits.shape[0])

    def logits_at(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, S) long flat low-res pixel indices -> (N, S) predicted logits there."""
        return sampled_logits(self.logits, pixels, rows=self.rows, head=self.head)


def sampled_logits(
    logits: torch.Tensor,
    pixels: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    head: PointHead | None = None,
) -> torch.Tensor:
    """N predictions' logits at (N, S) flat low-res pixels: gathered from the (N, L, L)
    ``logits``, or under point-sampled decoding decoded there by ``head`` for prediction
    ``rows`` (N,) -- the same values, with gradients."""
    if head is None:
        return logits.flatten(1).gather(1, pixels)
    return head.logits_at(rows, pixels)


def require_dense(head: PointHead | None, what: str) -> None:
    """Point-sampled decoding gives gradients only at sampled pixels: a loss over all pixels
    would silently train nothing through the masks."""
    if head is not None:
        raise RuntimeError(
            f"{what} needs every pixel's logits with gradients, but the student decoded at "
            "sampled pixels only (point decoding is for losses on train.loss_points pixels)"
        )


class MaskCriterion:
    """BCE / focal / dice / IoU / cls terms over a :class:`PairBatch`.

    loss_points: compute the pixel losses on this many uniformly sampled pixels per pair instead
    of all L * L (the IoU target always uses every pixel).
    """

    def __init__(
        self,
        *,
        loss_points: int | None = None,
        focal_alpha: float = losses.FOCAL_ALPHA,
        focal_gamma: float = losses.FOCAL_GAMMA,
    ) -> None:
        self.loss_points = loss_points
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def __call__(
        self,
        pairs: PairBatch,
        *,
        pair_count: float,
        unmatched_count: float,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Named terms, each a sum over pairs divided by :func:`pair_normalizer` of its count.

        pair_count / unmatched_count: the mini-batch's matched / unmatched counts averaged over
        the DDP ranks (the local counts without DDP).
        """
        logits = pairs.logits.flatten(1)
        targets = pairs.targets.flatten(1)
        actual_iou = losses.binary_mask_iou(logits, targets)
        if self.loss_points is not None and self.loss_points < logits.shape[1]:
            idx = losses.sample_pixels(
                logits.shape[1],
                self.loss_points,
                rows=logits.shape[0],
                generator=generator,
                device=logits.device,
            )
            logits = pairs.logits_at(idx)
            targets = targets.gather(1, idx)
        else:
            require_dense(pairs.head, "the mask losses on all pixels")
        norm = pair_normalizer(pair_count)
        unmatched_norm = pair_normalizer(unmatched_count)
        return {
            "bce": losses.bce_loss(logits, targets).sum() / norm,
            "focal": losses.focal_loss(
                logits, targets, alpha=self.focal_alpha, gamma=self.focal_gamma
            ).sum()
            / norm,
            "dice": losses.dice_loss(logits, targets).sum() / norm,
            "iou": losses.iou_loss(pairs.iou_pred, actual_iou).sum() / norm,
            "cls": losses.cls_loss(pairs.unmatched_iou_pred).sum() / unmatched_norm,
        }


def pair_normalizer(mean_count: float) -> float:
    """Divisor of a sum over pairs: the pair count averaged over the ranks (``ctx.reduce_count``),
    or 1 when there is no pair anywhere (the sum is 0 then). Not clamped to >= 1: with fewer
    pairs than ranks a clamp would make the DDP loss differ from the one-process loss."""
    return float(mean_count) if mean_count > 0 else 1.0


def weighted_total(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """``sum(weights[k] * terms[k])`` over the weights that are not zero.

    Raises KeyError when a non-zero weight names a term that was not computed.
    """
    missing = sorted(k for k, w in weights.items() if w != 0 and k not in terms)
    if missing:
        raise KeyError(
            f"loss weights given for terms that were not computed: {', '.join(missing)} "
            f"(computed: {', '.join(sorted(terms)) or 'none'})"
        )
    total = None
    for key, weight in weights.items():
        if weight == 0:
            continue
        value = terms[key] * weight
        total = value if total is None else total + value
    if total is None:
        anchor = next(iter(terms.values()), None)
        return anchor * 0 if anchor is not None else torch.zeros(())
    return total
