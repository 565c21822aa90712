"""The training run: ``train(cfg)`` is what ``maskteacher train CONFIG`` calls.

Setup (DDP, :func:`~maskteacher.train.builders.bind` the config, open data, build the student,
optimiser, resume) -> epochs (train, validate, pictures, checkpoint, early stop) -> export.
Everything the config says arrives through :mod:`.builders`; this module never reads it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from maskteacher.errors import UserError
from maskteacher.models import build_sam, export_official, set_batchnorm_eval, set_trainable
from maskteacher.models.checkpoint import atomic_save
from maskteacher.train import assemble, builders
from maskteacher.train import distributed as dist_utils
from maskteacher.train.checkpoint import (
    Progress,
    build_checkpoint,
    load_training_checkpoint,
    restore_rng,
)
from maskteacher.train.data.sampler import batches_per_epoch
from maskteacher.train.engine import (
    StepParts,
    StopAfter,
    TrainResult,
    step_generator,
    train_one_epoch,
)
from maskteacher.train.logger import TrainLogger
from maskteacher.train.plan import RunPlan, RunSettings
from maskteacher.train.run_folder import (
    RunLock,
    check_save_dir,
    remove_stale_temp,
    resume_path,
    writing,
)
from maskteacher.train.schedule import EpochSettings, build_optimizer, build_scheduler
from maskteacher.train.student import StudentForward
from maskteacher.train.supervision.base import StepContext
from maskteacher.train.validate import validate
from maskteacher.train.visual import ValidationPictures

if TYPE_CHECKING:
    from maskteacher.config import Config

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"
EXPORT = "student_official.pth"
RESOLVED_CONFIG = "config.yaml"


def train(cfg: Config, *, stop_after_steps: int | None = None) -> TrainResult:
    """Run training as configured; returns a :class:`TrainResult` (every rank).

    stop_after_steps: stop (after writing last.pt) once this many optimizer steps are done in
    total -- for tests that interrupt and resume a run.
    """
    info, device = dist_utils.init_distributed(cfg.train.device)
    run = None
    try:
        run = TrainingRun.setup(cfg, info, device)
        return run.fit(stop_after_steps)
    finally:
        if run is not None and run.lock is not None:
            run.lock.release()
        dist_utils.shutdown_distributed()


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


def _optimization(sam: nn.Module, s: RunSettings, num_batches: int):
    """AdamW over every parameter and the warmup-cosine schedule over the run's optimizer steps."""
    optimizer = build_optimizer(
        sam, lr=s.lr, weight_decay=s.weight_decay, encoder_lr_scale=s.encoder_lr_scale
    )
    steps_per_epoch = math.ceil(num_batches / s.loop.gradient_accumulation)
    scheduler = build_scheduler(
        optimizer,
        warmup_steps=s.warmup_steps,
        total_steps=s.epochs * steps_per_epoch,
        min_lr_ratio=s.min_lr_ratio,
    )
    return optimizer, scheduler


@dataclass
class TrainingRun:
    """Everything one training run holds; built by :meth:`setup`, driven by :meth:`fit`."""

    plan: RunPlan
    info: dist_utils.DistInfo
    device: torch.device
    data: assemble.DataParts
    sam: nn.Module
    forward: StudentForward
    parts: StepParts
    num_batches: int
    progress: Progress
    logger: TrainLogger
    result: TrainResult
    pictures: ValidationPictures | None = None
    lock: RunLock | None = None

    @property
    def settings(self) -> RunSettings:
        return self.plan.settings

    @classmethod
    def setup(cls, cfg: Config, info: dist_utils.DistInfo, device: torch.device) -> TrainingRun:
        plan = builders.bind(cfg)
        s = plan.settings
        d = plan.data
        sources = (d.train, d.val)
        paths = [x.path for x in sources if x] + [x.image_root for x in sources if x]
        check_save_dir(s.save_dir, dataset_paths=paths)
        hook = assemble.online_teacher(plan, device)
        kd = assemble.feature_distillation(plan, device, online=hook)
        data = assemble.open_data(plan, info, device)
        pictures = assemble.validation_pictures(plan, info)
        torch.manual_seed(s.seed)
        sam = build_sam(s.model_type, s.checkpoint, image_size=s.image_size, strict=s.strict)
        sam = sam.to(device)
        forward = StudentForward(
            sam,
            multimask_output=s.multimask_output,
            points_per_batch=s.points_per_batch,
            return_tokens=kd is not None and kd.needs_tokens,
            checkpoint_decoder=s.checkpoint_decoder,
            point_decoding=s.point_decoding,
            return_features=kd is not None and kd.needs_features,
        )
        num_batches = batches_per_epoch(
            len(data.train_set), world_size=info.world_size, batch_size=s.batch_size
        )
        optimizer, scheduler = _optimization(sam, s, num_batches)
        parts = StepParts(
            forward=forward,
            params=list(sam.parameters()),
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=torch.amp.GradScaler(device.type, enabled=False),  # bf16: no loss scaling
            strategy=plan.strategy,
            aux_losses=[kd] if kd is not None else [],
            batch_hooks=[hook] if hook is not None else [],
        )
        run = cls(
            plan=plan,
            info=info,
            device=device,
            data=data,
            sam=sam,
            forward=forward,
            parts=parts,
            num_batches=num_batches,
            progress=Progress(),
            logger=TrainLogger(
                s.save_dir / "tensorboard", log_every=s.log_every, enabled=info.is_main
            ),
            result=TrainResult(save_dir=s.save_dir, is_main=info.is_main),
            pictures=pictures,
        )
        run.resume()
        if info.is_main:
            run.claim_folder()
        return run

    def claim_folder(self) -> None:
        """Create and lock the run folder, clear a killed run's leftovers, write the config
        (rank 0; everything before this point refuses a bad run without writing a file)."""
        s = self.settings
        self.lock = RunLock(s.save_dir)
        self.lock.acquire()
        for path in remove_stale_temp(s.save_dir):
            log.info("removed %s, left by an interrupted write", path)
        path = s.save_dir / RESOLVED_CONFIG
        tmp = s.save_dir / f"{RESOLVED_CONFIG}.tmp"
        with writing(path, "resolved config"):
            tmp.write_text(self.plan.config_text)
            tmp.replace(path)

    # -- checkpoints -------------------------------------------------------------------------
    def resume(self) -> None:
        """Load the checkpoint ``train.resume`` names, if any (model, optimiser, RNG, ...)."""
        s = self.settings
        path = resume_path(s.resume, s.save_dir / LAST)
        if path is None:
            return
        ckpt = load_training_checkpoint(path, model_type=s.model_type, image_size=s.image_size)
        if ckpt["cache_id"] != self.data.cache_id and ckpt["cache_id"] not in self.data.cache_ids:
            raise UserError(
                f"{path}: checkpoint was trained with teacher cache {ckpt['cache_id']!r}, "
                f"the config reads {self.data.cache_id!r}; resume with the same cache"
            )
        try:
            self.sam.load_state_dict(ckpt["model"])
            self.parts.optimizer.load_state_dict(ckpt["optimizer"])
            self.parts.scheduler.load_state_dict(ckpt["scheduler"])
            self.parts.scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(
                f"{path}: the checkpoint's weights or optimizer state do not fit model.type "
                f"{s.model_type!r} ({first[:200]}); resume from a checkpoint of this run"
            ) from None
        self.progress = Progress.from_dict(ckpt["progress"])
        restore_rng(ckpt["rng"])
        self.result.best_metric = self.progress.best_metric
        log.info(
            "resumed from %s at epoch %d, step %d", path, self.progress.epoch, self.progress.step
        )

    def save(self, name: str) -> None:
        """Write checkpoint ``name`` (rank 0 only; atomically). Weights that are not finite are
        never written: the run stops with one line and the previous checkpoint stays."""
        if not self.info.is_main:
            return
        s = self.settings
        bad = [n for n, p in self.sam.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise UserError(
                f"the student's weights are not finite after optimizer step {self.progress.step} "
                f"({len(bad)} tensors, e.g. {bad[0]}); {name} is not written and the last "
                "checkpoint is kept -- check train.lr and the loss weights"
            )
        ckpt = build_checkpoint(
            model_state=self.sam.state_dict(),
            model_type=s.model_type,
            image_size=s.image_size,
            optimizer=self.parts.optimizer.state_dict(),
            scheduler=self.parts.scheduler.state_dict(),
            scaler=self.parts.scaler.state_dict(),
            progress=self.progress,
            config_json=json.dumps(self.plan.config, sort_keys=True),
            cache_id=self.data.cache_id,
        )
        with writing(s.save_dir / name, "checkpoint"):
            atomic_save(ckpt, s.save_dir / name)

    # -- the loop ----------------------------------------------------------------------------
    def fit(self, stop_after_steps: int | None = None) -> TrainResult:
        """Train the remaining epochs, validate, checkpoint, stop early, export."""
        s = self.settings
        trainable = None
        try:
            for epoch in range(self.progress.epoch, s.epochs):
                settings = self.plan.epochs.at(epoch)
                if settings.trainable != trainable:
                    trainable = settings.trainable
                    enc, prm, dec = trainable
                    set_trainable(self.sam, image_encoder=enc, prompt_encoder=prm, mask_decoder=dec)
                    self.parts.forward = _wrap(self.forward, self.info, self.device, s.compile)
                if not self.train_epoch(epoch, settings, stop_after_steps):
                    self.save(LAST)  # interrupted mid-way (stop_after_steps)
                    self.result.best_metric = self.progress.best_metric
                    return self.result
                if self.end_epoch(epoch):
                    break
            if self.info.is_main:
                self.result.export_path = s.save_dir / EXPORT
                with writing(self.result.export_path, "exported student"):
                    export_official(self.sam, self.result.export_path)
            dist_utils.barrier()
        finally:
            self.logger.close()
        self.result.best_metric = self.progress.best_metric
        return self.result

    def _train_mode(self) -> None:
        self.sam.train()
        if self.settings.batchnorm_eval:
            set_batchnorm_eval(self.sam)

    def train_epoch(self, epoch: int, settings: EpochSettings, stop_after: int | None) -> bool:
        """One epoch (or its rest after a resume); False when stopped by ``stop_after``."""
        s, progress = self.settings, self.progress
        self._train_mode()
        self.data.sampler.set_epoch(epoch)
        self.data.sampler.set_skip(progress.batches_done * s.batch_size)
        if self.plan.lambda_plateau is not None:  # dynamic_lambda scales the epoch's lambda_coef
            scaled = settings.lambda_coef * progress.lambda_scale
            settings = dataclasses.replace(settings, lambda_coef=scaled)

        def make_context(micro_step: int) -> StepContext:
            return StepContext(
                settings=settings,
                generator=step_generator(s.seed, micro_step),
                reduce_count=lambda v: dist_utils.mean_count(v, self.device),
                image_size=s.image_size,
                epoch=epoch,
                step=progress.step,
            )

        self.logger.start_epoch(epoch, self.num_batches, initial=progress.batches_done)
        batches = StopAfter(self.data.train_loader, progress, stop_after)
        train_one_epoch(
            self.parts,
            batches,
            num_batches=self.num_batches,
            progress=progress,
            make_context=make_context,
            settings=s.loop,
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
        if self.data.val_loader is not None and (epoch + 1) % self.settings.val_freq == 0:
            stop = self.validate_and_track(epoch)
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

    def plateau_step(self, score: float) -> None:
        """``distillation.dynamic_lambda``: move the scale on lambda_coef by this validation."""
        rule, progress = self.plan.lambda_plateau, self.progress
        if rule is None:
            return
        improved = rule.improved(score, progress.best_metric)
        before = progress.lambda_scale
        progress.lambda_scale, progress.lambda_wait = rule.step(
            before, progress.lambda_wait, improved
        )
        self.logger.scalar("distill/lambda_scale", progress.lambda_scale, progress.step)
        if progress.lambda_scale != before:
            self.logger.message(f"dynamic_lambda: lambda_coef x{progress.lambda_scale:.4g}")

    def validate_and_track(self, epoch: int) -> bool:
        """Validate, keep best.pt, update early stopping; returns True when training should stop."""
        s, progress = self.settings, self.progress
        score = validate(
            self.sam,
            self.data.val_loader,
            device=self.device,
            points_per_batch=s.points_per_batch,
            multimask_output=s.multimask_output,
            bf16=s.loop.bf16,
        )
        self.result.val_scores.append((epoch, score))
        self.logger.scalar("val/best_match_iou", score, progress.step)
        self.logger.message(f"epoch {epoch}: validation best-match IoU {score:.4f}")
        self.plateau_step(score)
        if progress.best_metric is None or score > progress.best_metric:
            progress.best_metric = score
            progress.best_epoch = epoch
            progress.bad_validations = 0
            self.save(BEST)
            return False
        progress.bad_validations += 1
        patience = s.early_stop_patience
        return patience > 0 and progress.bad_validations >= patience
