"""Optimiser, learning-rate schedule and per-epoch settings (stages, freezing).

The learning rate moves per *optimizer* step (not per micro-batch): linear warmup from
``lr / warmup`` to ``lr`` over ``warmup_steps``, then a cosine from ``lr`` to
``lr * min_lr_ratio`` at ``total_steps``. The image encoder's parameter group runs at
``encoder_lr_scale`` times the others' rate throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate after ``step`` optimizer steps (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(
    model: nn.Module, *, lr: float, encoder_lr_scale: float
) -> list[dict[str, object]]:
    """Two AdamW groups: ``image_encoder`` at ``lr * encoder_lr_scale``, ``heads`` at ``lr``.

    Every parameter is included whether or not it is trainable right now, so that unfreezing
    later and resuming keep the same optimizer layout (AdamW skips parameters without a grad).
    """
    encoder, heads = [], []
    for name, param in model.named_parameters():
        (encoder if name.startswith("image_encoder.") else heads).append(param)
    return [
        {"params": encoder, "lr": lr * encoder_lr_scale, "name": "image_encoder"},
        {"params": heads, "lr": lr, "name": "heads"},
    ]


def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, encoder_lr_scale: float
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`: torch's fused implementation (one kernel for all
    parameters; CPU and CUDA in current torch) where the parameters' device supports it, else
    torch's default choice. On one CPU thread the fused step is 3.2x faster than the
    single-tensor loop torch picks for CPU parameters (vit_t; ``bench/optimizer.py``); it rounds
    differently in the last bit (relative ~1e-7)."""
    groups = param_groups(model, lr=lr, encoder_lr_scale=encoder_lr_scale)
    try:
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # "`fused=True` requires all the params to be ... of supported devices"
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` over :func:`warmup_cosine`.

    The multiplier is a plain function, so the scheduler's state dict holds only counters
    (``last_epoch``) and a resumed run recomputes the curve from the current config.
    """

    def multiplier(step: int) -> float:
        return warmup_cosine(
            step, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


# ------------------------------------------------------------------------- per-epoch settings


@dataclass(frozen=True)
class Stage:
    """An epoch range ``[start, end)`` with overrides (None: unchanged)."""

    name: str
    start: int
    end: int
    loss_weights: dict[str, float] = field(default_factory=dict)
    distillation: bool | None = None
    lambda_coef: float | None = None


@dataclass(frozen=True)
class Freeze:
    """Which parts start frozen, and when (epoch) they all become trainable (None: never)."""

    image_encoder: bool = False
    prompt_encoder: bool = False
    mask_decoder: bool = False
    unfreeze_epoch: int | None = None


@dataclass(frozen=True)
class EpochSettings:
    """What changes from epoch to epoch.

    loss_weights: the task-term weights in force; distillation / lambda_coef: the feature-KD
    switch and scale; trainable: (image_encoder, prompt_encoder,
    mask_decoder); stages: names of the stages covering this epoch.
    """

    loss_weights: dict[str, float]
    distillation: bool
    lambda_coef: float
    trainable: tuple[bool, bool, bool]
    stages: tuple[str, ...] = ()


def epoch_settings(
    epoch: int,
    *,
    loss_weights: dict[str, float],
    distillation: bool,
    lambda_coef: float,
    stages: list[Stage],
    freeze: Freeze,
) -> EpochSettings:
    """Resolve the settings of ``epoch``: stages covering it apply in list order (later wins)."""
    weights = dict(loss_weights)
    names = []
    for stage in stages:
        if not stage.start <= epoch < stage.end:
            continue
        names.append(stage.name)
        weights.update(stage.loss_weights)
        if stage.distillation is not None:
            distillation = stage.distillation
        if stage.lambda_coef is not None:
            lambda_coef = stage.lambda_coef
    unfrozen = freeze.unfreeze_epoch is not None and epoch >= freeze.unfreeze_epoch
    trainable = (
        unfrozen or not freeze.image_encoder,
        unfrozen or not freeze.prompt_encoder,
        unfrozen or not freeze.mask_decoder,
    )
    return EpochSettings(weights, distillation, lambda_coef, trainable, tuple(names))


@dataclass(frozen=True)
class EpochPlan:
    """The base settings, stages and freezing of a run: :meth:`at` resolves one epoch."""

    loss_weights: dict[str, float]
    distillation: bool
    lambda_coef: float
    stages: tuple[Stage, ...] = ()
    freeze: Freeze = Freeze()

    def at(self, epoch: int) -> EpochSettings:
        return epoch_settings(
            epoch,
            loss_weights=self.loss_weights,
            distillation=self.distillation,
            lambda_coef=self.lambda_coef,
            stages=list(self.stages),
            freeze=self.freeze,
        )


# ------------------------------------------------------------------ dynamic lambda (plateau)


@dataclass(frozen=True)
class LambdaPlateau:
    """``distillation.dynamic_lambda``: a scale on ``lambda_coef`` moved by validation.

    After ``patience`` validations in a row without improvement the scale is multiplied by
    ``factor`` (never below ``floor``); a validation that improves on the best score by more
    than ``min_delta`` divides it by ``factor`` (never above 1, i.e. the configured or stage's
    ``lambda_coef``) and resets the count. The state (scale, count) lives in the checkpoint's
    :class:`~maskteacher.train.checkpoint.Progress`.
    """

    patience: int
    factor: float
    floor: float = 1e-3
    min_delta: float = 1e-4

    def improved(self, score: float, best: float | None) -> bool:
        return best is None or score > best + self.min_delta

    def step(self, scale: float, wait: int, improved: bool) -> tuple[float, int]:
        """(new scale, new count of validations without improvement)."""
        if improved:
            return min(scale / self.factor, 1.0), 0
        wait += 1
        if wait >= self.patience:
            return max(scale * self.factor, self.floor), 0
        return scale, wait
