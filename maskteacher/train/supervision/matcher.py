"""Hungarian matching of predicted masks to target masks, one image at a time.

Pure and gradient-free (DETR's ``HungarianMatcher`` is the model): costs are built batched in
fp32 with autocast off (Mask2Former), moved to the CPU once for a whole batch, and solved with
``scipy.optimize.linear_sum_assignment``. Everything lives in the low-res frame.

The cost of pairing prediction p with target t is::

    cost_iou * (1 - IoU(p > 0, t)) + cost_dice * dice(p, t) + cost_bce * bce(p, t)

where IoU uses the binarised logits on all pixels, and the optional dice / BCE terms use
sigmoid probabilities on ``num_points`` pixels sampled once per image (the same pixels for every
pair). After the assignment, pairs whose IoU is below ``iou_threshold`` are dropped, as are pairs
made ineligible by ``requires_point`` (the target must contain the prediction's prompt point).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

# Cost given to ineligible pairs so the solver only picks them when nothing else is left; such
# pairs are removed afterwards.
_INELIGIBLE = 1e6


@dataclass(frozen=True)
class MatchSettings:
    """What the matcher needs (built from ``train.match_*`` by the wiring code)."""

    iou_threshold: float = 0.3
    requires_point: bool = False
    cost_iou: float = 1.0
    cost_dice: float = 0.0
    cost_bce: float = 0.0
    num_points: int | None = None


@dataclass(frozen=True)
class Match:
    """Index pairs for one image (CPU tensors).

    pred: (K,) long indices into the image's predictions; target: (K,) long indices into its
    targets; iou: (K,) float32 IoU of each kept pair (binarised prediction vs target).
    ``pred`` is sorted ascending; each prediction and each target appears at most once.
    """

    pred: torch.Tensor
    target: torch.Tensor
    iou: torch.Tensor

    def __len__(self) -> int:
        return int(self.pred.numel())

    @staticmethod
    def empty() -> Match:
        none = torch.zeros(0, dtype=torch.long)
        return Match(none, none.clone(), torch.zeros(0, dtype=torch.float32))


@torch.no_grad()
def pairwise_mask_iou(pred_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of every binarised prediction with every target.

    pred_logits: (P, H, W) logits (prediction = logit > 0); targets: (M, H, W) bool.
    Returns (P, M) float32 on the inputs' device; a pair whose union is empty has IoU 0.
    """
    with torch.autocast(pred_logits.device.type, enabled=False):
        p = (pred_logits > 0).flatten(1).float()
        t = targets.flatten(1).float()
        inter = p @ t.T
        union = p.sum(1, keepdim=True) + t.sum(1)[None, :] - inter
        return inter / union.clamp(min=1.0)


@torch.no_grad()
def pairwise_dice_cost(pred_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice cost ``1 - (2 <s, t> + 1) / (sum s + sum t + 1)`` with s = sigmoid(logits).

    pred_logits: (P, K) logits; targets: (M, K) bool/float on the same K pixels. Returns (P, M).
    """
    s = pred_logits.float().sigmoid()
    t = targets.float()
    numerator = 2 * s @ t.T
    denominator = s.sum(-1)[:, None] + t.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


@torch.no_grad()
def pairwise_bce_cost(pred_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of every prediction against every target.

    pred_logits: (P, K) logits; targets: (M, K) bool/float. Returns (P, M).
    """
    x = pred_logits.float()
    t = targets.float()
    pos = F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
    neg = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
    return (pos @ t.T + neg @ (1 - t).T) / x.shape[-1]


def lowres_pixels(points: torch.Tensor, *, image_size: int, low_res_size: int) -> torch.Tensor:
    """(P, 2) float (x, y) input-frame points -> (P, 2) long (col, row) low-res pixel indices."""
    scale = low_res_size / image_size
    return (points.float() * scale).floor().long().clamp(0, low_res_size - 1)


@torch.no_grad()
def match_cost(
    pred_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    settings: MatchSettings,
    prompt_pixels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cost and IoU matrices for one image.

    pred_logits: (P, L, L); targets: (M, L, L) bool; prompt_pixels: (P, 2) long (col, row) of
    each prediction's prompt point in the low-res frame (needed when ``requires_point``).
    Returns (cost (P, M) float32, iou (P, M) float32), ineligible pairs costed ``_INELIGIBLE``.
    """
    with torch.autocast(pred_logits.device.type, enabled=False):
        iou = pairwise_mask_iou(pred_logits, targets)
        cost = settings.cost_iou * (1 - iou)
        if settings.cost_dice or settings.cost_bce:
            flat_p = pred_logits.flatten(1).float()
            flat_t = targets.flatten(1)
            if settings.num_points is not None and settings.num_points < flat_p.shape[1]:
                idx = torch.randperm(flat_p.shape[1], generator=generator, device="cpu")
                idx = idx[: settings.num_points].to(flat_p.device)
                flat_p, flat_t = flat_p[:, idx], flat_t[:, idx]
            if settings.cost_dice:
                cost = cost + settings.cost_dice * pairwise_dice_cost(flat_p, flat_t)
            if settings.cost_bce:
                cost = cost + settings.cost_bce * pairwise_bce_cost(flat_p, flat_t)
        if settings.requires_point:
            if prompt_pixels is None:
                raise ValueError("requires_point matching needs prompt_pixels")
            inside = targets[:, prompt_pixels[:, 1], prompt_pixels[:, 0]].T  # (P, M)
            cost = torch.where(inside, cost, torch.full_like(cost, _INELIGIBLE))
    return cost, iou


def _assign(cost: np.ndarray, iou: np.ndarray, threshold: float) -> Match:
    if cost.size == 0:
        return Match.empty()
    rows, cols = linear_sum_assignment(cost)
    keep = (cost[rows, cols] < _INELIGIBLE) & (iou[rows, cols] >= threshold)
    rows, cols = rows[keep], cols[keep]
    return Match(
        torch.as_tensor(rows, dtype=torch.long),
        torch.as_tensor(cols, dtype=torch.long),
        torch.as_tensor(iou[rows, cols], dtype=torch.float32),
    )


@torch.no_grad()
def match_batch(
    pred_logits: list[torch.Tensor],
    targets: list[torch.Tensor],
    *,
    settings: MatchSettings,
    prompt_pixels: list[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> list[Match]:
    """Match every image of a batch; one device->CPU transfer for all cost matrices.

    pred_logits[i]: (P_i, L, L) logits; targets[i]: (M_i, L, L) bool; prompt_pixels[i]: (P_i, 2)
    long (col, row) low-res pixels of the prompts (only read when ``settings.requires_point``).
    Returns one :class:`Match` per image; an image with no predictions or no targets gets an
    empty match.
    """
    if len(pred_logits) != len(targets):
        raise ValueError(f"{len(pred_logits)} prediction sets for {len(targets)} target sets")
    costs, ious = [], []
    for i, (pred, tgt) in enumerate(zip(pred_logits, targets)):
        pixels = prompt_pixels[i] if prompt_pixels is not None else None
        cost, iou = match_cost(
            pred, tgt, settings=settings, prompt_pixels=pixels, generator=generator
        )
        costs.append(cost.flatten())
        ious.append(iou.flatten())
    flat_cost = torch.cat(costs).cpu().numpy() if costs else np.zeros(0, np.float32)
    flat_iou = torch.cat(ious).cpu().numpy() if ious else np.zeros(0, np.float32)
    matches, start = [], 0
    for pred, tgt in zip(pred_logits, targets):
        shape = (pred.shape[0], tgt.shape[0])
        n = shape[0] * shape[1]
        cost = flat_cost[start : start + n].reshape(shape)
        iou = flat_iou[start : start + n].reshape(shape)
        start += n
        matches.append(_assign(cost, iou, settings.iou_threshold))
    return matches


def unmatched(num_predictions: int, match: Match) -> torch.Tensor:
    """(U,) long indices of the predictions that ``match`` left without a target."""
    free = torch.ones(num_predictions, dtype=torch.bool)
    free[match.pred] = False
    return free.nonzero().flatten()
