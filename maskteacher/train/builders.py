"""Builders: the only place the trainer reads the Config (``*_from_config`` functions).

Each builder turns config sections into the plain arguments of one part (matcher settings,
criterion, strategy, prompts, stages, data loaders); the parts never see the Config.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Sampler

from maskteacher.config import Config
from maskteacher.data import open_dataset
from maskteacher.errors import UserError
from maskteacher.train import distributed as dist_utils
from maskteacher.train.batch import collate
from maskteacher.train.cache_targets import cache_has_split, open_cache_targets
from maskteacher.train.criterion import MaskCriterion
from maskteacher.train.data import (
    EverythingPromptSpec,
    ResumableSampler,
    SinglePromptSpec,
    TargetSource,
    TrainDataset,
)
from maskteacher.train.matcher import MatchSettings
from maskteacher.train.prompts import SingleSettings
from maskteacher.train.schedule import EpochSettings, Freeze, Stage, epoch_settings
from maskteacher.train.supervision import (
    AuxLoss,
    BatchHook,
    SupervisionStrategy,
    aux_loss_builders,
    batch_hook_builders,
    get_supervision,
    strategy_name,
)

log = logging.getLogger(__name__)


def match_settings_from_config(cfg: Config) -> MatchSettings:
    t = cfg.train
    return MatchSettings(
        iou_threshold=t.match_iou_threshold,
        requires_point=t.match_requires_point,
        cost_dice=t.match_cost_dice,
        cost_bce=t.match_cost_bce,
        num_points=t.match_points,
    )


def criterion_from_config(cfg: Config) -> MaskCriterion:
    return MaskCriterion(loss_points=cfg.train.loss_points)


def strategy_from_config(cfg: Config) -> SupervisionStrategy:
    name = strategy_name(
        mode=cfg.dataset.mode,
        mask_teacher_enabled=cfg.mask_teacher.enable,
        method=cfg.mask_teacher.method,
    )
    return get_supervision(name).from_config(
        cfg, criterion=criterion_from_config(cfg), match=match_settings_from_config(cfg)
    )


def aux_losses_from_config(cfg: Config) -> list[AuxLoss]:
    return [aux for build in aux_loss_builders() if (aux := build(cfg)) is not None]


def batch_hooks_from_config(cfg: Config, device: torch.device) -> list[BatchHook]:
    return [hook for build in batch_hook_builders() if (hook := build(cfg, device)) is not None]


def prompt_spec_from_config(cfg: Config, *, validation: bool = False):
    """Training prompts per the config; validation always uses the full grid."""
    d, t = cfg.dataset, cfg.train
    if validation:
        return EverythingPromptSpec(source="grid", grid_points=d.grid_points, max_prompts=None)
    if d.mode == "single":
        return SinglePromptSpec(
            SingleSettings(
                mode=d.prompt_mode,
                min_points=d.min_points,
                max_points=d.max_points,
                max_bbox_shift=d.max_bbox_shift,
                max_prompts=t.max_prompts,
            )
        )
    return EverythingPromptSpec(
        source=t.prompt_source, grid_points=d.grid_points, max_prompts=t.max_prompts
    )


def stages_from_config(cfg: Config) -> list[Stage]:
    return [
        Stage(
            name=s.name,
            start=s.start_epoch,
            end=cfg.train.epochs if s.end_epoch is None else s.end_epoch,
            loss_weights=dict(s.loss_weights or {}),
            distillation=s.distillation,
            lambda_coef=s.lambda_coef,
        )
        for s in cfg.stage_schedule
    ]


def freeze_from_config(cfg: Config) -> Freeze:
    f = cfg.freeze
    return Freeze(
        image_encoder=f.freeze_image_encoder,
        prompt_encoder=f.freeze_prompt_encoder,
        mask_decoder=f.freeze_mask_decoder,
        unfreeze_epoch=f.unfreeze_epoch,
    )


def settings_for_epoch(cfg: Config, epoch: int) -> EpochSettings:
    return epoch_settings(
        epoch,
        loss_weights=dataclasses.asdict(cfg.train.loss_weights),
        distillation=cfg.distillation.enable,
        lambda_coef=cfg.distillation.lambda_coef,
        stages=stages_from_config(cfg),
        freeze=freeze_from_config(cfg),
    )


def open_images(cfg: Config, path: str, what: str):
    d = cfg.dataset
    images = open_dataset(
        path,
        d.format,
        skip_bad=d.skip_bad,
        image_root=d.image_root,
        include_crowd=d.include_crowd,
    )
    if len(images) == 0:
        raise UserError(f"dataset.{what}: {path} holds no usable images; expected at least one")
    return images


@dataclass
class CacheBinding:
    """What the trainer knows about the teacher cache it reads (None fields: no cache)."""

    cache_id: str | None = None


def target_source_from_config(
    cfg: Config, *, split: str, images, teacher_fields: frozenset[str], progress: bool = False
) -> tuple[TargetSource | None, list[int] | None, CacheBinding]:
    """Ground truth from the cache when ``mask_teacher.cache_path`` is set, else the reader's.

    Returns (target source or None for the reader's masks, the reader items to use or None for
    all, the cache binding). A cache without a validation split leaves validation on the reader.
    """
    path = cfg.mask_teacher.cache_path
    if path is None:
        if teacher_fields:
            raise UserError(
                f"teacher outputs ({', '.join(sorted(teacher_fields))}) are needed by this config "
                "(train.prompt_source / mask_teacher) but mask_teacher.cache_path is not set"
            )
        return None, None, CacheBinding()
    if split != "train" and not teacher_fields and not cache_has_split(path, split):
        log.info(
            "the cache at %s has no %s split; reading %s ground truth from the dataset",
            path,
            split,
            split,
        )
        return None, None, CacheBinding()
    source = open_cache_targets(
        path,
        split=split,
        images=images,
        image_size=cfg.model.image_size,
        teacher_fields=teacher_fields,
        verify=cfg.cache.verify_on_open and split == "train",
        progress=progress,
    )
    return source, source.usable_indices, CacheBinding(cache_id=source.cache_id)


def loader(
    dataset: TrainDataset,
    *,
    batch_size: int,
    sampler: Sampler,
    num_workers: int,
    pin_memory: bool,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=False,
    )


class ShardSampler(Sampler):
    """Validation order: rank r takes items r, r + world, ... (no padding, no duplicates)."""

    def __init__(self, num_items: int, *, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, num_items, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class DataParts:
    train_set: TrainDataset
    sampler: ResumableSampler
    train_loader: DataLoader
    val_loader: DataLoader | None
    cache: CacheBinding


def data_from_config(
    cfg: Config, info: dist_utils.DistInfo, device: torch.device, teacher_fields: frozenset[str]
) -> DataParts:
    """Datasets, sampler and loaders (train: configured prompts; val: the full grid)."""
    t = cfg.train
    if cfg.dataset.train_dataset is None:
        raise UserError("dataset.train_dataset is not set; expected a dataset folder or COCO JSON")
    images = open_images(cfg, cfg.dataset.train_dataset, "train_dataset")
    targets, indices, binding = target_source_from_config(
        cfg, split="train", images=images, teacher_fields=teacher_fields, progress=info.is_main
    )
    prompts = prompt_spec_from_config(cfg)
    if prompts.needs_teacher_points and "points" not in teacher_fields:
        # a batch hook (the online teacher) provides the points and makes these prompts
        prompts = dataclasses.replace(prompts, defer_teacher_points=True)
    train_set = TrainDataset(
        images,
        image_size=cfg.model.image_size,
        prompts=prompts,
        targets=targets,
        hflip=t.hflip,
        seed=t.seed,
        indices=indices,
    )
    sampler = ResumableSampler(
        len(train_set), rank=info.rank, world_size=info.world_size, shuffle=True, seed=t.seed
    )
    pin = device.type == "cuda"
    workers = cfg.dataset.num_workers
    train_loader = loader(
        train_set, batch_size=t.batch_size, sampler=sampler, num_workers=workers, pin_memory=pin
    )
    val_loader = None
    if cfg.dataset.val_dataset is not None:
        val_images = open_images(cfg, cfg.dataset.val_dataset, "val_dataset")
        val_targets, val_indices, _ = target_source_from_config(
            cfg, split="val", images=val_images, teacher_fields=frozenset()
        )
        val_set = TrainDataset(
            val_images,
            image_size=cfg.model.image_size,
            prompts=prompt_spec_from_config(cfg, validation=True),
            targets=val_targets,
            seed=t.seed,
            indices=val_indices,
        )
        val_sampler = ShardSampler(len(val_set), rank=info.rank, world_size=info.world_size)
        val_loader = loader(
            val_set,
            batch_size=t.batch_size,
            sampler=val_sampler,
            num_workers=workers,
            pin_memory=pin,
        )
    return DataParts(train_set, sampler, train_loader, val_loader, binding)
