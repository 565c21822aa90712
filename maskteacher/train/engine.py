"""The training step and the epoch loop (DETR ``engine.py`` style: a few short functions).

``compute_loss`` runs the (wrapped) student on a device batch, hands the predictions to the
supervision strategy and the auxiliary losses, and adds every weighted term in one place.
``train_one_epoch`` adds gradient accumulation (DDP ``no_sync`` between optimizer steps),
clipping, the scheduler, logging and the mid-epoch checkpoint hook. :class:`TrainResult`
collects what a run did; :class:`StopAfter` ends an epoch early (tests that interrupt a run).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from maskteacher.errors import UserError
from maskteacher.train import distributed as dist_utils
from maskteacher.train.checkpoint import Progress
from maskteacher.train.data.batch import Batch, BatchHook
from maskteacher.train.logger import TrainLogger
from maskteacher.train.student import run_forward
from maskteacher.train.supervision.base import AuxLoss, StepContext, SupervisionStrategy
from maskteacher.train.supervision.criterion import weighted_total


@dataclass
class StepResult:
    """One micro-batch: the loss to back-propagate, its terms as floats, and the stats."""

    total: torch.Tensor
    terms: dict[str, float]
    stats: dict[str, float]


def compute_loss(
    forward: nn.Module,
    batch: Batch,
    *,
    strategy: SupervisionStrategy,
    aux_losses: list[AuxLoss],
    ctx: StepContext,
    bf16: bool,
) -> StepResult:
    """Forward (bf16 autocast when asked) + supervision + auxiliary terms -> weighted total."""
    device_type = batch.images.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        preds = run_forward(forward, batch)
    out = strategy(preds, batch, ctx)
    terms, weights = dict(out.terms), dict(out.weights)
    for aux in aux_losses:
        extra = aux(preds, batch, ctx, out)
        terms.update(extra.terms)
        weights.update(extra.weights)
    total = weighted_total(terms, weights)
    if not total.requires_grad and torch.is_grad_enabled():
        # nothing to learn from (e.g. no prompt in the whole batch): a zero loss that still
        # reaches every trainable parameter, so backward (and DDP's reducer) run as usual
        params = [p for p in forward.parameters() if p.requires_grad]
        if params:
            total = total + sum(p.sum() for p in params) * 0.0
    return StepResult(
        total=total,
        terms={k: float(v.detach()) for k, v in terms.items()},
        stats=dict(out.stats),
    )


@dataclass(frozen=True)
class LoopSettings:
    """Plain settings of the epoch loop (from ``train.*``)."""

    gradient_accumulation: int = 1
    grad_clip: float | None = 1.0
    bf16: bool = False
    checkpoint_every: int | None = None


@dataclass
class StepParts:
    """What every step drives, built once per run. ``forward`` is the (possibly DDP-wrapped
    and/or compiled) student forward; the run swaps it when the trainable parts change."""

    forward: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    strategy: SupervisionStrategy
    aux_losses: list[AuxLoss] = field(default_factory=list)
    batch_hooks: list[BatchHook] = field(default_factory=list)


def step_generator(seed: int, micro_step: int) -> torch.Generator:
    """CPU generator for one micro-batch's random draws (loss points), seeded by position."""
    return torch.Generator().manual_seed(seed * 1_000_003 + micro_step)


def _timed(loader: Iterable[Batch]) -> Iterator[tuple[Batch, float]]:
    it = iter(loader)
    while True:
        start = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        yield batch, time.perf_counter() - start


def optimizer_step(state: StepParts, grad_clip: float | None) -> None:
    """Unscale, clip, step the optimizer and the schedule, clear gradients."""
    state.scaler.unscale_(state.optimizer)
    if grad_clip is not None:
        params = [p for p in state.params if p.grad is not None]
        if params:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)


def backward_step(
    state: StepParts,
    batch: Batch,
    ctx: StepContext,
    *,
    settings: LoopSettings,
    device: torch.device,
) -> StepResult:
    """One micro-batch: to the device, batch hooks, loss, backward of ``loss / accumulation``.

    A NaN or infinite loss on any rank raises :class:`NonFiniteLoss` (one line naming the epoch,
    the step and every term) before anything is back-propagated.
    """
    device_batch = batch.to(device, non_blocking=True)
    for hook in state.batch_hooks:
        device_batch = hook(device_batch)
    result = compute_loss(
        state.forward,
        device_batch,
        strategy=state.strategy,
        aux_losses=state.aux_losses,
        ctx=ctx,
        bf16=settings.bf16,
    )
    if dist_utils.any_rank(not bool(torch.isfinite(result.total.detach())), device):
        raise NonFiniteLoss(result, ctx)
    state.scaler.scale(result.total / settings.gradient_accumulation).backward()
    return result


class NonFiniteLoss(UserError):
    """The loss of a micro-batch is NaN or infinite (on any rank): training stops before the
    update, so the weights and the last checkpoint stay as they were."""

    def __init__(self, result: StepResult, ctx: StepContext) -> None:
        shown = ", ".join(
            f"{k}={v:.4g}"
            for k, v in {"total": float(result.total.detach()), **result.terms}.items()
        )
        super().__init__(
            f"the loss is not finite at epoch {ctx.epoch}, after optimizer step {ctx.step} "
            f"({shown}); training stopped before this update and the last checkpoint is kept -- "
            "check train.lr, the loss weights and the student checkpoint (model.checkpoint_path)"
        )


def train_one_epoch(
    state: StepParts,
    loader: Iterable[Batch],
    *,
    num_batches: int,
    progress: Progress,
    make_context: Callable[[int], StepContext],
    settings: LoopSettings,
    device: torch.device,
    logger: TrainLogger,
    on_checkpoint: Callable[[], None] | None = None,
    record: Callable[[StepResult], None] | None = None,
) -> None:
    """Train the rest of ``progress.epoch`` (from ``progress.batches_done``); updates ``progress``.

    num_batches: micro-batches in the whole epoch for this rank; make_context(micro_step) builds
    the step's :class:`StepContext`; record receives every micro-batch's :class:`StepResult`.
    An optimizer step happens every ``gradient_accumulation`` micro-batches and after the last.
    """
    accum = settings.gradient_accumulation
    state.optimizer.zero_grad(set_to_none=True)
    sync_ctx = getattr(state.forward, "no_sync", None)
    for batch, wait in _timed(loader):
        start = time.perf_counter()
        index = progress.batches_done  # position within the epoch
        boundary = (index + 1) % accum == 0 or index + 1 == num_batches
        syncing = contextlib.nullcontext() if boundary or sync_ctx is None else sync_ctx()
        with syncing:
            result = backward_step(
                state, batch, make_context(progress.micro_step), settings=settings, device=device
            )
        if boundary:
            optimizer_step(state, settings.grad_clip)
            progress.step += 1
        total = float(result.total.detach())
        progress.batches_done += 1
        progress.micro_step += 1
        if record is not None:
            record(result)
        logger.micro_batch(
            total=total,
            terms=result.terms,
            matched=result.stats.get("matched", 0.0),
            matched_iou_sum=result.stats.get("matched_iou_sum", 0.0),
            images=batch.num_images,
            data_wait=wait,
            step_time=time.perf_counter() - start,
        )
        if boundary:
            logger.optimizer_step(progress.step, state.optimizer.param_groups[-1]["lr"])
            every = settings.checkpoint_every
            mid_epoch = progress.batches_done < num_batches  # the epoch end saves anyway
            if on_checkpoint is not None and every and progress.step % every == 0 and mid_epoch:
                on_checkpoint()


@dataclass
class TrainResult:
    """What a run did: per-micro-batch losses and mean matched IoU (this rank; NaN when nothing
    matched), validation scores by epoch, files."""

    losses: list[float] = field(default_factory=list)
    matched_iou: list[float] = field(default_factory=list)
    val_scores: list[tuple[int, float]] = field(default_factory=list)
    best_metric: float | None = None
    stopped_early: bool = False
    epochs_done: int = 0
    save_dir: Path | None = None
    export_path: Path | None = None
    is_main: bool = True

    def record(self, step: StepResult) -> None:
        self.losses.append(float(step.total.detach()))
        matched = step.stats.get("matched", 0.0)
        iou = step.stats.get("matched_iou_sum", 0.0) / matched if matched else float("nan")
        self.matched_iou.append(iou)


class StopAfter:
    """Iterates a loader but ends the epoch early once ``stop_after`` optimizer steps are done."""

    def __init__(self, inner, progress: Progress, stop_after: int | None) -> None:
        self.inner = inner
        self.progress = progress
        self.stop_after = stop_after
        self.stopped = False

    def __iter__(self):
        for batch in self.inner:
            if self.stop_after is not None and self.progress.step >= self.stop_after:
                self.stopped = True
                return
            yield batch
