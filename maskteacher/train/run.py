"""The training run: ``train(cfg)`` is what ``maskteacher train CONFIG`` calls.

Setup (DDP, data, student, optimiser, resume) -> epochs (train, validate, checkpoint, early stop)
-> export. The parts come from the ``*_from_config`` builders of :mod:`.builders`.

Extension points (issue 7) are the registries of :mod:`maskteacher.train.supervision`:
supervision strategies (``@register_supervision``), auxiliary losses (``@register_aux_loss``)
and batch hooks (``@register_batch_hook``, e.g. an online teacher filling ``Batch.teacher``).
Teacher fields they need and that no hook provides are read from ``mask_teacher.cache_path``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from maskteacher.config import Config
from maskteacher.errors import UserError
from maskteacher.models import build_sam, export_official, set_batchnorm_eval, set_trainable
from maskteacher.models.checkpoint import atomic_save
from maskteacher.train import distributed as dist_utils
from maskteacher.train.builders import (
    DataParts,
    aux_losses_from_config,
    batch_hooks_from_config,
    data_from_config,
    prompt_spec_from_config,
    settings_for_epoch,
    strategy_from_config,
)
from maskteacher.train.checkpoint import (
    Progress,
    build_checkpoint,
    load_training_checkpoint,
    restore_rng,
)
from maskteacher.train.data import batches_per_epoch
from maskteacher.train.engine import (
    EpochState,
    LoopSettings,
    StepResult,
    step_generator,
    train_one_epoch,
)
from maskteacher.train.forward import StudentForward
from maskteacher.train.logger import TrainLogger
from maskteacher.train.schedule import EpochSettings, build_optimizer, build_scheduler
from maskteacher.train.supervision import AuxLoss, BatchHook, StepContext, SupervisionStrategy
from maskteacher.train.validate import validate
from maskteacher.train.visual import ValidationPictures, VisualSettings

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"
EXPORT = "student_official.pth"
RESOLVED_CONFIG = "config.yaml"

# ------------------------------------------------------------------------------- training


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


def _wrap(forward: StudentForward, info: dist_utils.DistInfo, device: torch.device, compile_: bool):
    module: nn.Module = forward
    if info.enabled:
        module = DistributedDataParallel(
            forward,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    if compile_:
        module = torch.compile(module, dynamic=True)
    return module


def _resume_path(cfg: Config, save_dir: Path) -> Path | None:
    resume = cfg.train.resume
    if resume is False:
        return None
    if resume is True:
        path = save_dir / LAST
        if not path.is_file():
            log.info("train.resume: true but %s does not exist yet; starting fresh", path)
            return None
        return path
    return Path(resume)


def train(
    cfg: Config,
    *,
    stop_after_steps: int | None = None,
    batch_hooks: list[BatchHook] | None = None,
) -> TrainResult:
    """Run training as configured; returns a :class:`TrainResult` (every rank).

    stop_after_steps: stop (after writing last.pt) once this many optimizer steps are done in
    total -- for tests that interrupt and resume a run. batch_hooks: extra hooks run after the
    registered ones (see :class:`~maskteacher.train.supervision.BatchHook`).
    """
    info, device = dist_utils.init_distributed(cfg.train.device)
    try:
        hooks = batch_hooks_from_config(cfg, device) + list(batch_hooks or [])
        run = TrainingRun.setup(cfg, info, device, hooks)
        return run.fit(stop_after_steps)
    finally:
        dist_utils.shutdown_distributed()


@dataclass
class TrainingRun:
    """Everything one training run holds; built by :meth:`setup`, driven by :meth:`fit`."""

    cfg: Config
    info: dist_utils.DistInfo
    device: torch.device
    data: DataParts
    sam: nn.Module
    forward: StudentForward
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    strategy: SupervisionStrategy
    aux_losses: list[AuxLoss]
    batch_hooks: list[BatchHook]
    num_batches: int
    progress: Progress
    logger: TrainLogger
    result: TrainResult
    pictures: ValidationPictures | None = None

    @property
    def save_dir(self) -> Path:
        return Path(self.cfg.model.save_path)

    @classmethod
    def setup(cls, cfg: Config, info, device, batch_hooks) -> TrainingRun:
        t = cfg.train
        strategy = strategy_from_config(cfg)
        aux_losses = aux_losses_from_config(cfg)
        visual = VisualSettings.from_config(cfg)
        teacher_fields = frozenset(strategy.teacher_fields).union(
            *(a.teacher_fields for a in aux_losses)
        )
        if prompt_spec_from_config(cfg).needs_teacher_points:
            teacher_fields |= {"points"}
        teacher_fields -= frozenset().union(*(h.provides for h in batch_hooks))
        data = data_from_config(cfg, info, device, teacher_fields)
        torch.manual_seed(t.seed)
        sam = build_sam(
            cfg.model.type,
            cfg.model.checkpoint_path,
            image_size=cfg.model.image_size,
            strict=cfg.model.strict,
        ).to(device)
        forward = StudentForward(
            sam,
            multimask_output=cfg.model.multimask_output,
            points_per_batch=t.points_per_batch,
            return_tokens=any(a.needs_tokens for a in aux_losses),
            checkpoint_decoder=t.checkpoint_decoder,
        )
        optimizer = build_optimizer(
            sam, lr=t.lr, weight_decay=t.weight_decay, encoder_lr_scale=t.encoder_lr_scale
        )
        num_batches = batches_per_epoch(
            len(data.train_set), world_size=info.world_size, batch_size=t.batch_size
        )
        scheduler = build_scheduler(
            optimizer,
            warmup_steps=t.warmup_step,
            total_steps=t.epochs * math.ceil(num_batches / t.gradient_accumulation),
            min_lr_ratio=t.min_lr_ratio,
        )
        save_dir = Path(cfg.model.save_path)
        run = cls(
            cfg=cfg,
            info=info,
            device=device,
            data=data,
            sam=sam,
            forward=forward,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=torch.amp.GradScaler(device.type, enabled=False),  # bf16: no loss scaling
            strategy=strategy,
            aux_losses=aux_losses,
            batch_hooks=batch_hooks,
            num_batches=num_batches,
            progress=Progress(),
            logger=TrainLogger(
                save_dir / "tensorboard", log_every=t.log_every, enabled=info.is_main
            ),
            result=TrainResult(save_dir=save_dir, is_main=info.is_main),
            pictures=ValidationPictures(cfg, visual) if visual and info.is_main else None,
        )
        run.resume()
        if info.is_main:
            save_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(save_dir / RESOLVED_CONFIG)
        return run

    # -- checkpoints -------------------------------------------------------------------------
    def resume(self) -> None:
        """Load the checkpoint ``train.resume`` names, if any (model, optimiser, RNG, ...)."""
        path = _resume_path(self.cfg, self.save_dir)
        if path is None:
            return
        cfg = self.cfg
        ckpt = load_training_checkpoint(
            path, model_type=cfg.model.type, image_size=cfg.model.image_size
        )
        if ckpt["cache_id"] != self.data.cache.cache_id:
            raise UserError(
                f"{path}: checkpoint was trained with teacher cache {ckpt['cache_id']!r}, "
                f"the config reads {self.data.cache.cache_id!r}; resume with the same cache"
            )
        self.sam.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.progress = Progress.from_dict(ckpt["progress"])
        restore_rng(ckpt["rng"])
        self.result.best_metric = self.progress.best_metric
        self.logger.message(
            f"resumed from {path} at epoch {self.progress.epoch}, step {self.progress.step}"
        )

    def save(self, name: str) -> None:
        """Write checkpoint ``name`` (rank 0 only; atomically)."""
        if not self.info.is_main:
            return
        ckpt = build_checkpoint(
            model_state=self.sam.state_dict(),
            model_type=self.cfg.model.type,
            image_size=self.cfg.model.image_size,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            progress=self.progress,
            config_json=json.dumps(self.cfg.to_dict(), sort_keys=True),
            cache_id=self.data.cache.cache_id,
        )
        atomic_save(ckpt, self.save_dir / name)

    # -- the loop ----------------------------------------------------------------------------
    def fit(self, stop_after_steps: int | None = None) -> TrainResult:
        """Train the remaining epochs, validate, checkpoint, stop early, export."""
        t = self.cfg.train
        module, trainable = None, None
        try:
            for epoch in range(self.progress.epoch, t.epochs):
                settings = settings_for_epoch(self.cfg, epoch)
                if module is None or settings.trainable != trainable:
                    trainable = settings.trainable
                    enc, prm, dec = trainable
                    set_trainable(self.sam, image_encoder=enc, prompt_encoder=prm, mask_decoder=dec)
                    module = _wrap(self.forward, self.info, self.device, t.compile)
                if not self.train_epoch(epoch, settings, module, stop_after_steps):
                    self.save(LAST)  # interrupted mid-way (stop_after_steps)
                    self.result.best_metric = self.progress.best_metric
                    return self.result
                if self.end_epoch(epoch):
                    break
            if self.info.is_main:
                self.result.export_path = self.save_dir / EXPORT
                export_official(self.sam, self.result.export_path)
            dist_utils.barrier()
        finally:
            self.logger.close()
        self.result.best_metric = self.progress.best_metric
        return self.result

    def _train_mode(self) -> None:
        self.sam.train()
        if self.cfg.freeze.batchnorm_eval:
            set_batchnorm_eval(self.sam)

    def train_epoch(
        self, epoch: int, settings: EpochSettings, module: nn.Module, stop_after: int | None
    ) -> bool:
        """One epoch (or its rest after a resume); False when stopped by ``stop_after``."""
        t, progress = self.cfg.train, self.progress
        self._train_mode()
        self.data.sampler.set_epoch(epoch)
        self.data.sampler.set_skip(progress.batches_done * t.batch_size)
        state = EpochState(
            forward=module,
            params=list(self.sam.parameters()),
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            strategy=self.strategy,
            aux_losses=self.aux_losses,
            batch_hooks=self.batch_hooks,
        )

        def make_context(micro_step: int) -> StepContext:
            return StepContext(
                settings=settings,
                generator=step_generator(t.seed, micro_step),
                reduce_count=lambda v: dist_utils.mean_count(v, self.device),
                image_size=self.cfg.model.image_size,
                epoch=epoch,
                step=progress.step,
            )

        self.logger.start_epoch(epoch, self.num_batches, initial=progress.batches_done)
        batches = _StopAfter(self.data.train_loader, progress, stop_after)
        train_one_epoch(
            state,
            batches,
            num_batches=self.num_batches,
            progress=progress,
            make_context=make_context,
            settings=LoopSettings(
                gradient_accumulation=t.gradient_accumulation,
                grad_clip=t.grad_clip,
                bf16=t.bf16,
                seed=t.seed,
                image_size=self.cfg.model.image_size,
                checkpoint_every=t.checkpoint_every,
            ),
            device=self.device,
            logger=self.logger,
            on_checkpoint=lambda: self.save(LAST),
            record=self.result.record,
        )
        self.logger.end_epoch()
        return not batches.stopped

    def end_epoch(self, epoch: int) -> bool:
        """Book-keeping after a full epoch: validation, best.pt, last.pt; True to stop early."""
        progress = self.progress
        progress.epoch = epoch + 1
        progress.batches_done = 0
        self.result.epochs_done += 1
        stop = False
        if self.data.val_loader is not None and (epoch + 1) % self.cfg.train.val_freq == 0:
            stop = _validate_and_track(self, epoch)
            self._train_mode()
        if self.pictures is not None and self.pictures.settings.due(epoch):
            self.pictures.save(self.sam, epoch, self.device)
            self._train_mode()
        self.save(LAST)
        if stop:
            self.result.stopped_early = True
            self.logger.message(
                f"early stop after epoch {epoch}: no improvement in "
                f"{progress.bad_validations} validations (best {progress.best_metric:.4f})"
            )
        return stop


def _validate_and_track(run: TrainingRun, epoch: int) -> bool:
    """Validate, keep best.pt, update early stopping; returns True when training should stop."""
    t, progress, result = run.cfg.train, run.progress, run.result
    score = validate(
        run.sam,
        run.data.val_loader,
        device=run.device,
        points_per_batch=t.points_per_batch,
        multimask_output=run.cfg.model.multimask_output,
        bf16=t.bf16,
    )
    result.val_scores.append((epoch, score))
    run.logger.scalar("val/best_match_iou", score, progress.step)
    run.logger.message(f"epoch {epoch}: validation best-match IoU {score:.4f}")
    if progress.best_metric is None or score > progress.best_metric:
        progress.best_metric = score
        progress.best_epoch = epoch
        progress.bad_validations = 0
        run.save(BEST)
        return False
    progress.bad_validations += 1
    patience = t.early_stop_patience
    return patience > 0 and progress.bad_validations >= patience


class _StopAfter:
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
