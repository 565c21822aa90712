"""``maskteacher precompute``: run the teacher once over a dataset and write the cache.

:class:`PrecomputeJob` holds every setting as a plain field (:meth:`PrecomputeJob.from_config`
translates the config, the only place that sees it); :func:`run_precompute` runs it:

1. join torchrun's process group if there is one; pick the device (``LOCAL_RANK``'s GPU);
2. open the splits, build the teacher, ``init_cache`` with the header (teacher type, checkpoint
   sha256, image size, generation parameters, codec, store flags, dataset fingerprints and
   roots) -- a cache folder made with anything else is refused, naming the field;
3. plan shards (:mod:`.plan`), skip images already in finished shards, and stream this worker's
   pending images through DataLoader workers (:mod:`.loader`) -> ``generate_everything`` ->
   the background shard writer (:mod:`.sink`); unreadable images are recorded as failures;
4. sum the counts over the ranks (the barrier), let rank 0 finalize the manifest, optionally
   re-run the teacher on K cached images (:mod:`.verify`), and return a summary whose
   ``exit_code`` is 1 when more than ``max_failed_fraction`` of the images failed or the
   verification found a mismatch.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from maskteacher.cache_format import (
    CacheHeader,
    CacheRecord,
    Codec,
    StoreFlags,
    completed_ids,
    dataset_fingerprint,
    finalize,
    init_cache,
    record_failure,
)
from maskteacher.cache_format.schema import empty_teacher
from maskteacher.data import open_dataset
from maskteacher.data.dataset import SegmentationDataset
from maskteacher.errors import UserError
from maskteacher.models.everything import GenerationParams, encode_images, generate_everything
from maskteacher.models.hq import is_hq_type
from maskteacher.precompute.distributed import WorkerContext, resolve_device
from maskteacher.precompute.loader import ImageLoader, LoadedImage, make_loader, source_root
from maskteacher.precompute.plan import WorkItem, assigned_items, next_shard_name, plan_split
from maskteacher.precompute.sink import ShardSink, SinkStats
from maskteacher.precompute.teacher import TeacherSpec, build_teacher
from maskteacher.precompute.verify import TeacherVerifyResult, verify_with_teacher

log = logging.getLogger(__name__)

FINALIZE_LOCK = ".finalize.lock"


@dataclass(frozen=True)
class SplitSource:
    """Where one split's images come from (arguments of :func:`maskteacher.data.open_dataset`)."""

    split: str
    path: str
    format: str | None = None
    image_root: str | None = None
    include_crowd: bool = False
    skip_bad: bool = False

    def open(self) -> SegmentationDataset:
        return open_dataset(
            self.path,
            self.format,
            skip_bad=self.skip_bad,
            image_root=self.image_root,
            include_crowd=self.include_crowd,
        )


@dataclass
class PrecomputeJob:
    """Everything one precompute run needs (see the module docstring)."""

    cache_path: str
    teacher: TeacherSpec
    splits: list[SplitSource]
    generation: GenerationParams = field(default_factory=GenerationParams)
    store: StoreFlags = field(default_factory=StoreFlags)
    backend: str = "zarr"
    codec: Codec = field(default_factory=Codec)
    shard_size: int = 256
    batch_size: int = 4
    num_workers: int = 2
    device: str = "auto"
    max_failed_fraction: float = 0.01
    num_shards: int = 1
    shard_index: int = 0
    limit: int | None = None
    verify: int = 0
    verify_seed: int = 0
    verify_tolerance: float | None = None
    progress: bool = True

    @classmethod
    def from_config(
        cls,
        cfg: Any,
        *,
        teacher: str | None = None,
        output: str | None = None,
        splits: list[str] | None = None,
        **options: Any,
    ) -> PrecomputeJob:
        """Translate a :class:`maskteacher.config.Config` (``mask_teacher`` or the ``teachers``
        entry named ``teacher``; ``dataset``; ``precompute``; ``model.image_size``).

        output: cache folder instead of the configured ``cache_path``; splits: subset of the
        configured splits; options: the remaining fields (num_shards, shard_index, limit,
        verify, verify_seed, verify_tolerance, progress).
        """
        from maskteacher.config import resolve_teacher_type

        pc = cfg.precompute
        image_size = cfg.model.image_size
        if teacher is None:
            mt = cfg.mask_teacher
            spec = TeacherSpec(mt.teacher_type, mt.checkpoint_path, image_size, mt.strict)
            cache_path, where = mt.cache_path, "mask_teacher.cache_path"
        else:
            entry = next((t for t in cfg.teachers if t.name == teacher), None)
            if entry is None:
                names = ", ".join(t.name for t in cfg.teachers) or "none configured"
                raise UserError(f"--teacher {teacher}: no teachers entry of that name ({names})")
            spec = TeacherSpec(
                resolve_teacher_type(entry),
                entry.checkpoint,
                image_size,
                entry.strict,
                config_keys=(f"teachers '{teacher}' type", f"teachers '{teacher}' strict"),
            )
            cache_path, where = entry.cache_path, f"teachers '{teacher}' cache_path"
        cache_path = output or cache_path
        if not cache_path:
            raise UserError(
                f"{where} is not set; set it to the folder the cache goes to (or pass --output DIR)"
            )
        return cls(
            cache_path=str(cache_path),
            teacher=spec,
            splits=_split_sources(cfg.dataset, splits),
            generation=GenerationParams.from_config(pc),
            store=StoreFlags(
                teacher=pc.store.teacher,
                gt=pc.store.gt,
                embedding=pc.store.embedding,
                tokens=pc.store.tokens,
            ),
            backend=pc.backend,
            codec=Codec(pc.codec, clip=pc.clip),
            shard_size=pc.shard_size,
            batch_size=pc.batch_size,
            num_workers=pc.num_workers,
            device=pc.device,
            max_failed_fraction=pc.max_failed_fraction,
            **options,
        )


def _split_sources(ds: Any, wanted: list[str] | None) -> list[SplitSource]:
    paths = {"train": ds.train_dataset, "val": ds.val_dataset}
    if not ds.train_dataset and not ds.val_dataset:
        raise UserError("dataset.train_dataset is not set; precompute needs images")
    names = wanted or [s for s, p in paths.items() if p]
    out = []
    for split in names:
        if not paths.get(split):
            raise UserError(f"--split {split}: dataset.{split}_dataset is not set")
        out.append(
            SplitSource(
                split=split,
                path=paths[split],
                format=ds.format,
                image_root=ds.image_root,
                include_crowd=ds.include_crowd,
                skip_bad=ds.skip_bad,
            )
        )
    return out


@dataclass
class PrecomputeSummary:
    """Figures of one run, summed over the torchrun ranks of this task.

    planned: images of this task's shards (within ``limit``); cached_before: those already in
    finished shards; written / masks / bytes: what this run wrote; failed: images that could
    not be processed (plus items the dataset scan skipped, counted by worker 0). wall_s: the
    run up to the last shard (startup, opening the data, building the teacher); generate_s: the
    generation loop from the first image to the last shard on disk (slowest rank), which
    ``images_per_s`` is measured on.
    """

    cache_path: str
    workers: int
    planned: int
    cached_before: int
    written: int
    masks: int
    bytes: int
    failed: int
    wall_s: float
    generate_s: float
    max_failed_fraction: float
    manifest_images: int | None = None
    verify: TeacherVerifyResult | None = None

    @property
    def failed_fraction(self) -> float:
        return self.failed / max(1, self.planned)

    @property
    def images_per_s(self) -> float:
        return self.written / self.generate_s if self.generate_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        too_many = self.failed_fraction > self.max_failed_fraction
        return 1 if too_many or (self.verify is not None and not self.verify.ok) else 0

    def format(self) -> str:
        per_image = self.masks / self.written if self.written else 0.0
        kb = self.bytes / self.written / 1024 if self.written else 0.0
        lines = [
            f"precompute: {self.written} images written, {self.cached_before} already cached, "
            f"{self.failed} failed, of {self.planned} planned ({self.workers} worker(s))",
            f"  masks {self.masks} ({per_image:.1f} per image), {kb:.1f} KB per image, "
            f"wall {self.wall_s:.1f} s (generation {self.generate_s:.1f} s, "
            f"{self.images_per_s:.2f} images/s)",
        ]
        if self.manifest_images is not None:
            lines.append(f"  cache {self.cache_path}: {self.manifest_images} images in manifest")
        if self.failed_fraction > self.max_failed_fraction:
            lines.append(
                f"  FAILED: {self.failed_fraction:.2%} of the images failed, more than "
                f"precompute.max_failed_fraction = {self.max_failed_fraction:g} (see the "
                "manifest's failures)"
            )
        if self.verify is not None:
            lines.append(self.verify.format())
        return "\n".join(lines)


def run_precompute(job: PrecomputeJob) -> PrecomputeSummary:
    """Run ``job`` in this process (one worker; see the module docstring)."""
    ctx = WorkerContext.from_env(num_shards=job.num_shards, shard_index=job.shard_index)
    ctx.init()
    try:
        return _run(job, ctx)
    finally:
        ctx.close()


def _run(job: PrecomputeJob, ctx: WorkerContext) -> PrecomputeSummary:
    start = time.perf_counter()
    if job.batch_size < 1 or job.shard_size < 1:
        raise UserError("precompute.batch_size and precompute.shard_size must be >= 1")
    if job.limit is not None and job.limit < 1:
        raise UserError(f"--limit must be >= 1, got {job.limit}")
    device = resolve_device(job.device, ctx.local_rank)
    datasets = {s.split: s.open() for s in job.splits}
    uses_model = job.store.teacher or job.store.embedding or job.verify > 0
    model = build_teacher(job.teacher, device) if uses_model else None
    header = make_header(job, datasets, identity=job.teacher.identity(model))
    init_cache(job.cache_path, header)

    plans = [
        plan_split(split, ds.image_ids, job.shard_size, job.limit) for split, ds in datasets.items()
    ]
    done = completed_ids(job.cache_path)
    shards = list(assigned_items(plans, worker=ctx.worker, num_workers=ctx.num_workers))
    planned = sum(len(s) for s in shards)
    pending = [it for s in shards for it in s if it.image_id not in done.get(it.split, ())]
    scan_failures = _record_scan_failures(job, ctx, datasets)
    generate_start = time.perf_counter()
    stats = _generate(job, ctx, model, datasets, pending, device)
    generate_s = time.perf_counter() - generate_start

    totals = [
        int(v)
        for v in ctx.sum(
            [planned, planned - len(pending), stats.images, stats.masks, stats.bytes]
            + [stats.failures, scan_failures]
        )
    ]
    wall, generate_s = ctx.max([time.perf_counter() - start, generate_s])
    summary = PrecomputeSummary(
        cache_path=job.cache_path,
        workers=ctx.world_size,
        planned=totals[0] + totals[6],
        cached_before=totals[1],
        written=totals[2],
        masks=totals[3],
        bytes=totals[4],
        failed=totals[5] + totals[6],
        wall_s=wall,
        generate_s=generate_s,
        max_failed_fraction=job.max_failed_fraction,
    )
    if ctx.is_main:
        with _finalize_lock(job.cache_path):
            summary.manifest_images = finalize(job.cache_path).images
        if job.verify > 0:
            summary.verify = verify_with_teacher(
                job.cache_path,
                model,
                datasets,
                count=job.verify,
                generation=job.generation,
                seed=job.verify_seed,
                tolerance=job.verify_tolerance,
            )
    return summary


def make_header(
    job: PrecomputeJob, datasets: dict[str, SegmentationDataset], *, identity: str
) -> CacheHeader:
    """The cache header of ``job``: what a resumed, parallel or merged run must match."""
    teacher_type = job.teacher.built_type()  # vit_h_hq for the spec's vit_h + a SAM-HQ file
    return CacheHeader(
        teacher_type=teacher_type,
        checkpoint_sha256=identity,
        image_size=job.teacher.image_size,
        params=job.generation.header_params(hq=is_hq_type(teacher_type)),
        codec=job.codec,
        store=job.store,
        backend=job.backend,
        fingerprints={
            s: dataset_fingerprint(ds.fingerprint_entries()) for s, ds in datasets.items()
        },
        dataset_roots={s: str(source_root(ds).resolve()) for s, ds in datasets.items()},
    )


def _record_scan_failures(
    job: PrecomputeJob, ctx: WorkerContext, datasets: dict[str, SegmentationDataset]
) -> int:
    """Items the dataset scan skipped (``skip_bad``) go to the failure log once (worker 0)."""
    if ctx.worker != 0:
        return 0
    count = 0
    for split, ds in datasets.items():
        for item, reason in ds.bad_items:
            record_failure(job.cache_path, ctx.worker_name, item, split, f"dataset scan: {reason}")
            count += 1
    return count


def _generate(
    job: PrecomputeJob,
    ctx: WorkerContext,
    model: torch.nn.Module | None,
    datasets: dict[str, SegmentationDataset],
    pending: list[WorkItem],
    device: torch.device,
) -> SinkStats:
    """Stream ``pending`` through the loader, the teacher and the shard sink."""
    loader = make_loader(
        ImageLoader(datasets, pending, image_size=job.teacher.image_size, with_gt=job.store.gt),
        batch_size=job.batch_size,
        num_workers=job.num_workers,
    )
    desc = "precompute" if ctx.num_workers == 1 else f"precompute {ctx.worker_name}"
    bar = tqdm(
        total=len(pending),
        unit="img",
        desc=desc,
        disable=not (job.progress and ctx.is_main),
        dynamic_ncols=True,
    )
    sink = ShardSink(job.cache_path, ctx.worker_name)
    current: tuple[str, int] | None = None
    images = masks = 0
    try:
        for batch in loader:
            key = (batch[0].item.split, batch[0].item.shard)
            if key != current:
                name_fn = functools.partial(
                    next_shard_name, job.cache_path, key[0], key[1], job.backend
                )
                sink.begin(key[0], name_fn)
                current = key
            for failed in (b for b in batch if b.error is not None):
                log.warning("image %s (%s) failed: %s", failed.item.image_id, key[0], failed.error)
                sink.fail(failed.item.image_id, failed.item.split, failed.error or "")
            for record in _records(job, model, [b for b in batch if b.error is None], device):
                sink.add(record)
                images += 1
                masks += record.num_masks
            bar.update(len(batch))
            bar.set_postfix(masks_per_image=f"{masks / max(images, 1):.1f}", refresh=False)
        stats = sink.close()
    except BaseException:
        sink.abort()
        raise
    finally:
        bar.close()
    return stats


def _records(
    job: PrecomputeJob, model: torch.nn.Module | None, batch: list[LoadedImage], device
) -> list[CacheRecord]:
    """Cache records of the successfully loaded images of one batch."""
    if not batch:
        return []
    low = job.teacher.image_size // 4
    input_hw = [b.input_hw for b in batch]
    orig_hw = [b.orig_hw for b in batch]
    outputs = embeddings = None
    if model is not None and (job.store.teacher or job.store.embedding):
        images = torch.stack([b.image for b in batch]).to(device, non_blocking=True)
        if job.store.teacher:
            outputs = generate_everything(
                model,
                images,
                input_hw,
                orig_hw,
                **job.generation.generator_kwargs(),
                return_embedding=job.store.embedding,
                return_tokens=job.store.tokens,
            )
        else:
            embeddings = encode_images(
                model, images, torch.tensor(input_hw), bf16=job.generation.bf16
            )
    records = []
    for i, b in enumerate(batch):
        if outputs is not None:
            out = outputs[i].to("cpu")
            teacher = {
                "teacher_logits": out.logits.numpy(),
                "teacher_points": out.points.numpy(),
                "teacher_iou": out.iou.numpy(),
                "teacher_stability": out.stability.numpy(),
                "teacher_boxes": out.boxes.numpy(),
            }
            embedding, tokens = out.embedding, out.tokens
        else:
            teacher = empty_teacher(low)
            embedding = None if embeddings is None else embeddings[i].cpu()
            tokens = None
        gt = b.gt if b.gt is not None else np.zeros((0, low, low), bool)
        records.append(
            CacheRecord(
                image_id=b.item.image_id,
                split=b.item.split,
                orig_hw=np.asarray(b.orig_hw, np.int64),
                input_hw=np.asarray(b.input_hw, np.int64),
                gt_masks=gt,
                embedding=None if embedding is None else embedding.numpy(),
                tokens=None if tokens is None else tokens.numpy(),
                source=b.source,
                **teacher,
            )
        )
    return records


@contextlib.contextmanager
def _finalize_lock(root: str):
    """Serialise ``finalize`` between job-array tasks sharing one cache folder, so the last
    manifest written is built after every task's last shard."""
    fd = os.open(os.path.join(root, FINALIZE_LOCK), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
