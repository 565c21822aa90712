"""Opening what a :class:`~maskteacher.train.plan.RunPlan` names: datasets and loaders, the
mask teacher's cache (checked against the plan), the online teacher, distillation teachers'
caches and decoders, the validation pictures.

Each function takes the plan (plain values) and returns parts for :mod:`maskteacher.train.run`;
bad input (an empty dataset, a cache made for other data or by another teacher) is one
UserError line naming the config key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from maskteacher.cache_format import CacheError, dataset_fingerprint
from maskteacher.data import FINGERPRINT_MISMATCH_HINT, open_dataset
from maskteacher.data.dataset import SegmentationDataset
from maskteacher.errors import UserError
from maskteacher.train import distributed as dist_utils
from maskteacher.train.data import cache as cache_data
from maskteacher.train.data import teacher_cache
from maskteacher.train.data.dataset import TargetSource, TrainDataset
from maskteacher.train.data.online_teacher import OnlineTeacher, build_online_teacher
from maskteacher.train.data.sampler import Batches, ResumableSampler, ShardSampler, make_loader
from maskteacher.train.distill.feature_kd import FeatureDistillation, KDTeacher
from maskteacher.train.distill.teacher_decoder import TeacherDecoder
from maskteacher.train.plan import DataSpec, ImageSource, KDTeacherSpec, RunPlan
from maskteacher.train.visual import ValidationPictures

log = logging.getLogger(__name__)


def open_images(source: ImageSource) -> SegmentationDataset:
    """Open a dataset; one with no usable image is an error naming its config key."""
    images = open_dataset(
        source.path,
        source.format,
        skip_bad=source.skip_bad,
        image_root=source.image_root,
        include_crowd=source.include_crowd,
    )
    if len(images) == 0:
        raise UserError(
            f"{source.key}: {source.path} holds no usable images; expected at least one"
        )
    return images


def _targets(
    data: DataSpec, *, split: str, images, fields: frozenset[str]
) -> tuple[TargetSource | None, list[int] | None, tuple[str, ...]]:
    """Ground truth from the cache when one is configured (and, when the run needs nothing else
    from it, usable), else the reader's.

    Returns (target source or None for the reader's masks, the reader items to use or None for
    all, the cache's ids (empty without a cache)). A cache without a validation split leaves
    validation on the reader.
    """
    path = data.cache_path
    if path is None:
        return None, None, ()
    try:
        if split != "train" and not fields and not cache_data.cache_has_split(path, split):
            log.info("the cache at %s has no %s split; reading %s ground truth from the dataset",
                     path, split, split)  # fmt: skip
            return None, None, ()
        source = cache_data.open_cache_targets(
            path,
            split=split,
            images=images,
            image_size=data.image_size,
            teacher_fields=fields,
            verify=data.verify_on_open,
            empty_teacher_limit=data.empty_teacher_limit if split == "train" else None,
        )
    except (UserError, CacheError) as exc:
        if data.cache_required:
            raise
        log.warning(
            "mask_teacher.enable is false and the cache is not usable for %s ground truth (%s); "
            "reading it from the dataset",
            split,
            exc,
        )
        return None, None, ()
    return source, source.usable_indices, source.cache_ids


@dataclass
class DataParts:
    train_set: TrainDataset
    sampler: ResumableSampler
    train_loader: Batches
    val_loader: Batches | None
    cache_ids: tuple[str, ...]

    @property
    def cache_id(self) -> str | None:
        """The id of the cache the run reads (None: no cache); recorded in checkpoints."""
        return self.cache_ids[0] if self.cache_ids else None


def open_data(plan: RunPlan, info: dist_utils.DistInfo, device: torch.device) -> DataParts:
    """Datasets, sampler and loaders (train: the plan's prompts; val: the full grid); the cache
    is first checked against the mask-teacher identity when the plan names one."""
    data = plan.data
    if data.identity is not None:
        teacher_cache.check_cache_identity(data.cache_path, data.identity)
    if data.train is None:
        raise UserError("dataset.train_dataset is not set; expected a dataset folder or COCO JSON")
    images = open_images(data.train)
    fields = frozenset() if plan.online is not None else plan.teacher_fields
    targets, indices, cache_ids = _targets(data, split="train", images=images, fields=fields)
    train_set = TrainDataset(
        images, image_size=data.image_size, prompts=plan.prompts, targets=targets,
        hflip=data.hflip, seed=data.seed, indices=indices,
    )  # fmt: skip
    sampler = ResumableSampler(
        len(train_set), rank=info.rank, world_size=info.world_size, shuffle=True, seed=data.seed
    )
    loading = dict(num_workers=data.num_workers, pin_memory=device.type == "cuda")
    train_loader = make_loader(train_set, batch_size=data.batch_size, sampler=sampler, **loading)
    val_loader = None
    if data.val is not None:
        val_images = open_images(data.val)
        val_targets, val_indices, _ = _targets(
            data, split="val", images=val_images, fields=frozenset()
        )
        val_set = TrainDataset(
            val_images, image_size=data.image_size, prompts=plan.val_prompts,
            targets=val_targets, seed=data.seed, indices=val_indices,
        )  # fmt: skip
        val_sampler = ShardSampler(len(val_set), rank=info.rank, world_size=info.world_size)
        val_loader = make_loader(
            val_set, batch_size=data.batch_size, sampler=val_sampler, **loading
        )
    return DataParts(train_set, sampler, train_loader, val_loader, cache_ids)


def online_teacher(plan: RunPlan, device: torch.device) -> OnlineTeacher | None:
    """The online teacher hook when the plan runs the teacher online."""
    spec = plan.online
    if spec is None:
        return None
    log.info("no mask_teacher.cache_path: running teacher %s (%s) online on every batch",
             spec.teacher_type, spec.checkpoint)  # fmt: skip
    model = build_online_teacher(
        spec.teacher_type,
        spec.checkpoint,
        image_size=plan.data.image_size,
        strict=spec.strict,
        device=device,
    )
    return OnlineTeacher(
        model,
        generation=spec.generation,
        provides=spec.provides,
        prompts=spec.prompts,
        hflip=plan.data.hflip,
        seed=plan.data.seed,
        image_size=plan.data.image_size,
        logit_clip=spec.logit_clip,
    )


def _decoder(plan: RunPlan, model: torch.nn.Module, device: torch.device) -> TeacherDecoder:
    s = plan.settings
    return TeacherDecoder(
        model.to(device), multimask_output=s.multimask_output, chunk=s.points_per_batch
    )


def _cache_teacher(
    plan: RunPlan, teacher: KDTeacherSpec, fields: frozenset[str], device: torch.device | None
) -> KDTeacher:
    """A ``teachers[]`` entry read from its own cache, checked against the plan and the data;
    device: where its decoder runs (None: no block decodes prompts)."""
    identity, path = teacher.identity, teacher.cache_path
    header = teacher_cache.check_cache_identity(path, identity)
    cache_data.check_store(header, fields, where=identity.where, path=path)
    if plan.data.train is not None:
        train = plan.data.train
        want = dataset_fingerprint(open_images(train).fingerprint_entries())
        have = header.fingerprints.get("train")
        if have != want:
            raise UserError(
                f"{identity.where} {path}: dataset fingerprint of split 'train' is {have} in the "
                f"cache but {want} for {train.path}: {FINGERPRINT_MISMATCH_HINT}"
            )
    opened = teacher_cache.open_teacher_cache(path, where=identity.where)
    reader = teacher_cache.CacheTeacherReader(
        opened, fields=fields, split="train", where=identity.where
    )
    source = lambda batch: reader(batch.image_ids, batch.images.device)  # noqa: E731
    kd = KDTeacher(teacher.name, teacher.weight, source, from_batch=False)
    if device is not None:
        model = teacher_cache.load_teacher_decoder(
            opened, where=identity.where, checkpoint=teacher.checkpoint,
            checkpoint_key=teacher.checkpoint_key,
        )  # fmt: skip
        kd.decoder = _decoder(plan, model, device)
    return kd


def _batch_teacher(
    plan: RunPlan, teacher: KDTeacherSpec, device: torch.device | None, online: OnlineTeacher | None
) -> KDTeacher:
    """The batch's own teacher (the mask teacher's cache, or the online teacher), with its
    decoder when ``device`` is given: the online teacher's own, else the cache's."""
    kd = KDTeacher(teacher.name, teacher.weight)
    if device is None:
        return kd
    if online is not None:
        kd.decoder = _decoder(plan, online.model, device)
        return kd
    where = cache_data.WHERE
    opened = teacher_cache.open_teacher_cache(plan.data.cache_path, where=where)
    model = teacher_cache.load_teacher_decoder(
        opened, where=where, checkpoint=teacher.checkpoint, checkpoint_key=teacher.checkpoint_key
    )
    kd.decoder = _decoder(plan, model, device)
    return kd


def feature_distillation(
    plan: RunPlan, device: torch.device, online: OnlineTeacher | None = None
) -> FeatureDistillation | None:
    """The distillation auxiliary loss of the plan (None: no block enabled); a teacher whose
    blocks decode prompts gets its decoder (frozen, on ``device``; the image encoder is never
    built for a cached teacher)."""
    if not plan.kd_blocks:
        return None
    fields = frozenset().union(*(b.fields for b in plan.kd_blocks))
    at = device if any(getattr(b, "needs_decoder", False) for b in plan.kd_blocks) else None
    teachers = [
        _batch_teacher(plan, t, at, online)
        if t.cache_path is None
        else _cache_teacher(plan, t, fields, at)
        for t in plan.kd_teachers
    ]
    dense = any(b.term == "dense_mask_logits" for b in plan.kd_blocks)
    hq = [t.name for t in teachers if dense and t.decoder is not None and t.decoder.is_hq]
    if hq:
        raise UserError(
            f"distillation.dense_mask_logits: teacher '{hq[0]}' is SAM-HQ (its cache or "
            "checkpoint holds SAM-HQ's decoder), whose masks also need the HQ features of its "
            "image encoder, which a cache does not hold; disable the block for SAM-HQ teachers"
        )
    batch_fields = fields if any(t.cache_path is None for t in plan.kd_teachers) else frozenset()
    return FeatureDistillation(teachers=teachers, blocks=plan.kd_blocks, batch_fields=batch_fields)


def validation_pictures(plan: RunPlan, info: dist_utils.DistInfo) -> ValidationPictures | None:
    """The ``visual`` section's overlay pictures (main process only; None when off)."""
    if plan.visual is None or not info.is_main:
        return None
    return ValidationPictures(
        plan.visual,
        open_images=lambda: open_images(plan.data.val),
        teacher_cache=plan.data.cache_path,
        image_size=plan.data.image_size,
    )
