"""Mask losses: small pure functions, one value per pair (reduction is the criterion's job).

Inputs are flattened pixels: ``logits`` (N, K) and ``targets`` (N, K) with K = all low-res
pixels (L * L) or K sampled pixels per pair. Every function computes in fp32 whatever the
input dtype (bf16 autocast included) and returns an (N,) float32 tensor.

Soft mask losses of dual supervision (``mask_teacher.soft_loss.type``, :data:`SOFT_LOSSES`),
on the logits of N (student, teacher) pairs; the teacher side is a constant (detached):

- ``l2``: ``mean_k (s - t)^2`` of the logits;
- ``kl``: Bernoulli ``KL(sigmoid(s) || sigmoid(t))`` per pixel, averaged over pixels::

      p (log p - log q) + (1 - p) (log(1 - p) - log(1 - q)),  p = sigmoid(s), q = sigmoid(t)

  with ``log p = logsigmoid(s)`` and ``log(1 - p) = logsigmoid(-s)``, so that it stays finite
  for logits of any size (an int8 cache saturates at +-clip, an online teacher does not).
  This is the spec's direction. Its gradient ``dKL/ds = p (1 - p) (s - t)`` vanishes where the
  student is confidently wrong: ``s = -8``, ``t = +8`` gives -0.005 per pixel;
- ``kl_teacher``: the other direction, ``KL(sigmoid(t) || sigmoid(s))`` -- the teacher's
  distribution first, as knowledge distillation uses it::

      q (log q - log p) + (1 - q) (log(1 - q) - log(1 - p))

  (the BCE of the student against the soft target ``q`` minus the teacher's entropy). Its
  gradient is ``dKL/ds = p - q``, bounded by 1 and largest where the student is most wrong:
  -0.999 for ``s = -8``, ``t = +8``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
DICE_SMOOTH = 1.0


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, mean over pixels. (N, K), (N, K) -> (N,)."""
    return F.binary_cross_entropy_with_logits(
        logits.float(), targets.float(), reduction="none"
    ).mean(-1)


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float = FOCAL_ALPHA,
    gamma: float = FOCAL_GAMMA,
) -> torch.Tensor:
    """Sigmoid focal loss (torchvision), mean over pixels. (N, K), (N, K) -> (N,).

    ``alpha < 0`` disables the class weighting, as in torchvision.
    """
    per_pixel = sigmoid_focal_loss(
        logits.float(), targets.float(), alpha=alpha, gamma=gamma, reduction="none"
    )
    return per_pixel.mean(-1)


def dice_loss(
    logits: torch.Tensor, targets: torch.Tensor, *, smooth: float = DICE_SMOOTH
) -> torch.Tensor:
    """``1 - (2 sum(s t) + smooth) / (sum s + sum t + smooth)``, s = sigmoid. (N, K) -> (N,)."""
    s = logits.float().sigmoid()
    t = targets.float()
    return 1 - (2 * (s * t).sum(-1) + smooth) / (s.sum(-1) + t.sum(-1) + smooth)


@torch.no_grad()
def binary_mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of (logits > 0) with the targets, per row; empty union -> 0. (N, K) -> (N,).

    Soft (floating) targets count as set where they are >= 0.5.
    """
    p = logits > 0
    t = targets >= 0.5 if targets.is_floating_point() else targets.bool()
    inter = (p & t).sum(-1).float()
    union = (p | t).sum(-1).float()
    return inter / union.clamp(min=1.0)


def iou_loss(iou_pred: torch.Tensor, iou_actual: torch.Tensor) -> torch.Tensor:
    """Squared error between the predicted-IoU head and the actual IoU. (N,), (N,) -> (N,).

    ``iou_actual`` is a target: it is detached.
    """
    return (iou_pred.float() - iou_actual.detach().float()) ** 2


def cls_loss(iou_pred: torch.Tensor) -> torch.Tensor:
    """Squared distance of unmatched predictions' IoU scores from 0. (U,) -> (U,).

    The predicted-IoU head is the objectness score everything-mode inference filters on, so
    predictions matched to nothing are taught to score low.
    """
    return iou_pred.float() ** 2


def sample_pixels(
    num_pixels: int,
    num_samples: int,
    *,
    rows: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(rows, num_samples) long pixel indices drawn uniformly (with replacement) per row.

    One number drawn from ``generator`` (the trainer's checkpointed CPU generator; the global
    one when None) seeds a generator on ``device`` that draws the indices there, so a run is
    reproducible and resumes exactly without drawing rows * num_samples numbers on the CPU and
    copying them over: at 512 pairs x 16384 points that costs ~165 ms per step on one CPU core.
    """
    device = torch.device(device)
    seed = int(torch.randint(2**62, (1,), generator=generator))
    local = torch.Generator(device=device)
    local.manual_seed(seed)
    return torch.randint(num_pixels, (rows, num_samples), generator=local, device=device)


# ----------------------------------------------------------------------------- soft mask losses


def soft_l2(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error of logits over pixels. (N, K), (N, K) -> (N,)."""
    return (student.float() - teacher.detach().float()).pow(2).mean(-1)


def soft_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Bernoulli KL(sigmoid(student) || sigmoid(teacher)) per pixel, mean over pixels, from
    logits (module docstring). (N, K), (N, K) -> (N,)."""
    s = student.float()
    t = teacher.detach().float()
    log_p, log_not_p = F.logsigmoid(s), F.logsigmoid(-s)
    log_q, log_not_q = F.logsigmoid(t), F.logsigmoid(-t)
    p, not_p = torch.sigmoid(s), torch.sigmoid(-s)
    return (p * (log_p - log_q) + not_p * (log_not_p - log_not_q)).mean(-1)


def soft_kl_teacher(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Bernoulli KL(sigmoid(teacher) || sigmoid(student)) per pixel, mean over pixels, from
    logits (module docstring); gradient ``sigmoid(s) - sigmoid(t)``. (N, K), (N, K) -> (N,)."""
    s = student.float()
    t = teacher.detach().float()
    log_p, log_not_p = F.logsigmoid(s), F.logsigmoid(-s)
    log_q, log_not_q = F.logsigmoid(t), F.logsigmoid(-t)
    q, not_q = torch.sigmoid(t), torch.sigmoid(-t)
    return (q * (log_q - log_p) + not_q * (log_not_q - log_not_p)).mean(-1)


#: ``mask_teacher.soft_loss.type`` -> per-pair loss.
SOFT_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "l2": soft_l2,
    "kl": soft_kl,
    "kl_teacher": soft_kl_teacher,
}
