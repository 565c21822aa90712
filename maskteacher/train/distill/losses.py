"""Feature-distillation losses: small pure functions, one value per row (reduction is the
caller's job, as in :mod:`maskteacher.train.supervision.losses`). Every function computes in
fp32 whatever the input dtype (bf16 autocast included), treats the teacher side as a constant
(detached) and returns float32.

Feature distillation (``distillation.*``); ``T`` is the block's temperature and every KL is
``KL(teacher || student)`` of temperature softmaxes, multiplied by ``T^2`` (Hinton et al.) so
that its gradient scale does not depend on T:

- :func:`spatial_kl` -- image embeddings (B, C, E, E): per image and channel, softmax over the
  E * E positions; mean over channels;
- :func:`channel_kl` / :func:`token_mse` / :func:`cosine_loss` -- decoder tokens (N, C);
- :func:`attention_map` / :func:`attention_kl` -- attention transfer (Zagoruyko & Komodakis):
  ``A = mean_c F^2`` over channels (so teacher and student may differ in width), standardised
  per image (zero mean, unit std over positions, so scale differences between networks do not
  matter), then softmax(A / T) over positions;
- :func:`rkd_distance` / :func:`rkd_angle` -- relational KD (Park et al.) on (B, D) pooled
  embedding vectors: pairwise distances normalised by their mean, and the cosines of the angles
  of every triplet of distinct images, compared with smooth L1. Both need at least 3 images
  (with 2 the normalised distance is always 1 and there is no triplet): fewer give exactly 0.

The origin's four blocks (:mod:`.prompt_blocks`) add, per row of any shape (N, ...):

- :func:`flat_cosine_loss` -- ``1 - cos`` of the two rows flattened to vectors;
- :func:`normalised_mse` -- MSE of features L2-normalised over their channel dim (dim 1);
- :func:`bernoulli_kl` -- per-pixel ``KL(sigmoid(t) || sigmoid(s))`` of mask logits (both
  outcomes), mean over pixels;
- :func:`soft_focal` -- the focal loss with a soft target ``q = sigmoid(t)``:
  ``-[q (1 - p)^g log p + (1 - q) p^g log(1 - p)]``, ``p = sigmoid(s)``, mean over pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maskteacher.train.supervision.losses import soft_kl_teacher

# ----------------------------------------------------------------------------- feature losses


def feature_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error per row over all other dims. (B, ...), (B, ...) -> (B,)."""
    diff = student.float() - teacher.detach().float()
    return diff.pow(2).flatten(1).mean(-1)


def _softmax_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t / T) || softmax(s / T)) * T^2 over the last dim. (..., K) -> (...)."""
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1) * temperature**2


def spatial_kl(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """Per-channel spatial softmax KL, mean over channels. (B, C, E, E) x 2 -> (B,)."""
    return _softmax_kl(student.flatten(2), teacher.flatten(2), temperature).mean(-1)


def token_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error over channels. (N, C), (N, C) -> (N,)."""
    return feature_mse(student, teacher)


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``1 - cos(s, t)`` per row. (N, C), (N, C) -> (N,)."""
    return 1 - F.cosine_similarity(student.float(), teacher.detach().float(), dim=-1, eps=1e-8)


def channel_kl(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """Softmax-over-channels KL. (N, C), (N, C) -> (N,)."""
    return _softmax_kl(student, teacher, temperature)


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Standardised attention map ``mean_c F^2`` of (B, C, E, E) features -> (B, E * E)."""
    energy = features.float().pow(2).mean(1).flatten(1)
    mean = energy.mean(-1, keepdim=True)
    std = energy.std(-1, keepdim=True, unbiased=False)
    return (energy - mean) / (std + 1e-6)


def attention_kl(
    student: torch.Tensor, teacher: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    """KL between the temperature softmaxes of the attention maps. (B, C, E, E) x 2 -> (B,)."""
    return _softmax_kl(attention_map(student), attention_map(teacher.detach()), temperature)


def _off_diagonal(n: int, device: torch.device) -> torch.Tensor:
    return ~torch.eye(n, dtype=torch.bool, device=device)


def _normalised_distances(v: torch.Tensor) -> torch.Tensor:
    """Off-diagonal pairwise distances of (B, D) rows divided by their mean -> (B * (B - 1),)."""
    d = torch.cdist(v[None], v[None])[0]
    off = d[_off_diagonal(v.shape[0], v.device)]
    return off / off.mean().clamp(min=1e-12)


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD distance loss of (B, Ds) and (B, Dt) vectors (widths may differ) -> () ; B < 3: 0."""
    if student.shape[0] < 3:
        return student.float().sum() * 0.0
    with torch.no_grad():
        t = _normalised_distances(teacher.float())
    s = _normalised_distances(student.float())
    return F.smooth_l1_loss(s, t, reduction="mean")


def _angles(v: torch.Tensor) -> torch.Tensor:
    """cos of the angle at j between i and k, for every triplet of distinct rows -> (T,)."""
    n = v.shape[0]
    diff = F.normalize(v[None, :, :] - v[:, None, :], p=2, dim=-1)  # [j, i] = v_i - v_j
    cos = diff @ diff.transpose(1, 2)  # [j, i, k]
    idx = torch.arange(n, device=v.device)
    distinct = (
        (idx[:, None, None] != idx[None, :, None])
        & (idx[:, None, None] != idx[None, None, :])
        & (idx[None, :, None] != idx[None, None, :])
    )
    return cos[distinct]


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD angle loss of (B, Ds) and (B, Dt) vectors -> () ; B < 3: 0."""
    if student.shape[0] < 3:
        return student.float().sum() * 0.0
    with torch.no_grad():
        t = _angles(teacher.float())
    return F.smooth_l1_loss(_angles(student.float()), t, reduction="mean")


# -------------------------------------------------------------------- the origin's four blocks


def flat_cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` of each row flattened to a vector. (N, ...), (N, ...) -> (N,)."""
    return cosine_loss(student.flatten(1), teacher.flatten(1))


def normalised_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE of L2-normalised features (over dim 1, the channels), mean over the rest.
    (N, C, ...), (N, C, ...) -> (N,)."""
    s = F.normalize(student.float(), dim=1)
    t = F.normalize(teacher.detach().float(), dim=1)
    return (s - t).pow(2).flatten(1).mean(-1)


def bernoulli_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-pixel ``KL(sigmoid(t) || sigmoid(s))`` from logits (log-sigmoids: finite for any
    logit), mean over pixels; gradient ``sigmoid(s) - sigmoid(t)``. (N, ...) x 2 -> (N,)."""
    return soft_kl_teacher(student.flatten(1), teacher.flatten(1))


def soft_focal(student: torch.Tensor, teacher: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """Focal loss of the student's logits against the soft target ``sigmoid(teacher)``, both
    outcomes weighted by their own focusing term, mean over pixels. (N, ...) x 2 -> (N,)."""
    s = student.float().flatten(1)
    q = torch.sigmoid(teacher.detach().float().flatten(1))
    p = torch.sigmoid(s)
    positive = q * (1 - p).pow(gamma) * F.logsigmoid(s)
    negative = (1 - q) * p.pow(gamma) * F.logsigmoid(-s)
    return -(positive + negative).mean(-1)
