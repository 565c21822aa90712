"""``maskteacher precompute``: run the teacher once over a dataset and write the cache.

:func:`run_precompute` runs a :class:`~maskteacher.precompute.job.PrecomputeJob`:

1. check the job; join torchrun's process group if there is one; pick the device;
2. open the splits (an empty split, or a cache folder inside a dataset folder, is refused),
   build the teacher, ``init_cache`` with the header -- a cache folder made with other
   settings is refused, naming the config key (:mod:`maskteacher.cache_format.identity`);
   with ``store.embedding`` also write the teacher's prompt encoder + mask decoder weights
   (``teacher_decoder.npz``, :mod:`maskteacher.cache_format.decoder_file`), so the cache
   alone can decode prompts on its embeddings;
3. take this worker's writer lock (one writer per slice of the work: a second process for the
   same slice, or one splitting the work differently, is refused -- it would write the same
   images again), plan shards (:mod:`.plan`), skip images already in finished shards, and run
   the generation loop (:mod:`.generate`); unreadable images are recorded as failures;
4. sum the counts over the ranks (the barrier), let rank 0 finalize the manifest, optionally
   re-run the teacher on K cached images (:mod:`.verify`), and return a summary whose
   ``exit_code`` is 1 when more than ``max_failed_fraction`` of the images failed or the
   verification found a mismatch.

SIGTERM is handled like Ctrl-C: the shard being written is discarded and its lock, the writer
lock and every temporary file are removed before the process exits (code 143).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from maskteacher.cache_format import (
    CacheHeader,
    CacheMismatch,
    completed_ids,
    dataset_fingerprint,
    finalize,
    init_cache,
    record_failure,
)
from maskteacher.cache_format.decoder_file import write_decoder_weights
from maskteacher.cache_format.locks import writer_lock
from maskteacher.cache_format.paths import inside
from maskteacher.data.dataset import SegmentationDataset
from maskteacher.errors import UserError
from maskteacher.models.hq import is_hq_type
from maskteacher.precompute.distributed import WorkerContext, resolve_device
from maskteacher.precompute.generate import generate
from maskteacher.precompute.job import PrecomputeJob
from maskteacher.precompute.loader import source_root
from maskteacher.precompute.plan import WorkItem, assigned_items, plan_split
from maskteacher.precompute.summary import PrecomputeSummary
from maskteacher.precompute.teacher import build_teacher, decoder_arrays
from maskteacher.precompute.verify import verify_with_teacher

log = logging.getLogger(__name__)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that cleanup runs as for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_precompute(job: PrecomputeJob) -> PrecomputeSummary:
    """Run ``job`` in this process (one worker; see the module docstring)."""
    job.check()
    ctx = WorkerContext.from_env(num_shards=job.num_shards, shard_index=job.shard_index)
    ctx.init()
    try:
        with sigterm_as_interrupt():
            return _run(job, ctx)
    finally:
        ctx.close()


def _run(job: PrecomputeJob, ctx: WorkerContext) -> PrecomputeSummary:
    start = time.perf_counter()
    device = resolve_device(job.device, ctx.local_rank)
    datasets = open_splits(job)
    uses_model = job.store.teacher or job.store.embedding or job.verify > 0
    model = build_teacher(job.teacher, device) if uses_model else None
    join_cache(job, make_header(job, datasets, identity=job.teacher.identity(model)))
    if job.store.embedding and model is not None:
        write_decoder_weights(job.cache_path, decoder_arrays(model))
    lock = writer_lock(job.cache_path, ctx.worker_name, f"{ctx.num_workers} worker(s)")
    try:
        planned, pending = _pending(job, ctx, datasets)
        scan_failures = _record_scan_failures(job, ctx, datasets)
        generate_start = time.perf_counter()
        stats = generate(job, ctx, model, datasets, pending, device)
        generate_s = time.perf_counter() - generate_start
        counts = [planned, planned - len(pending), stats.images, stats.masks, stats.bytes]
        totals = [int(v) for v in ctx.sum([*counts, stats.failures, scan_failures, stats.empty])]
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
            empty=totals[7],
            wall_s=wall,
            generate_s=generate_s,
            max_failed_fraction=job.max_failed_fraction,
            generation=job.generation,
            teacher_stored=job.store.teacher,
        )
        if ctx.is_main:
            _finish(job, model, datasets, summary)
        return summary
    finally:
        lock.release()


def _finish(
    job: PrecomputeJob, model, datasets: dict[str, SegmentationDataset], summary: PrecomputeSummary
) -> None:
    """Rank 0: finalize the manifest, warn about empty teachers, run ``--verify``."""
    summary.manifest_images = finalize(job.cache_path).images
    if summary.mostly_empty:
        log.warning(summary.empty_warning().removeprefix("WARNING: "))
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


def open_splits(job: PrecomputeJob) -> dict[str, SegmentationDataset]:
    """Open every split; UserError for one without images or holding the cache folder."""
    datasets = {}
    for s in job.splits:
        ds = datasets[s.split] = s.open()
        if len(ds) == 0:
            bad = f" (all {len(ds.bad_items)} items were bad)" if ds.bad_items else ""
            raise UserError(
                f"dataset.{s.split}_dataset {s.path}: no images found{bad}; nothing to precompute"
            )
        path = Path(s.path)
        folders = {path if path.is_dir() else path.parent, source_root(ds)}
        for folder in sorted(folders):
            if inside(job.cache_path, folder):
                raise UserError(
                    f"{job.cache_key} {job.cache_path} is inside the {s.split} dataset folder {folder}: "
                    "the cache's files would be read as part of the dataset; put the cache elsewhere"
                )
    return datasets


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


def config_key(field: str, job: PrecomputeJob) -> str:
    """The config key (or what) a cache identity field comes from, for error messages."""
    if field.startswith("params."):
        return "precompute." + field.removeprefix("params.")
    if field.startswith("store."):
        return "precompute." + field
    if field.startswith("fingerprints."):
        return f"the {field.removeprefix('fingerprints.')} dataset's fingerprint"
    named = {
        "teacher_type": job.teacher.config_keys[0],
        "checkpoint_sha256": "the teacher checkpoint's sha256",
        "image_size": "model.image_size",
        "codec.name": "precompute.codec",
        "codec.clip": "precompute.clip",
        "backend": "precompute.backend",
    }
    return named.get(field, field)


def join_cache(job: PrecomputeJob, header: CacheHeader) -> None:
    """``init_cache``; a cache made with other settings is a UserError naming the config key."""
    try:
        init_cache(job.cache_path, header)
    except CacheMismatch as exc:
        if exc.field == "format_version":
            raise
        raise UserError(
            f"{job.cache_key} {job.cache_path}: the cache was made with {config_key(exc.field, job)} = "
            f"{exc.have!r}, but this run has {exc.want!r}; precompute into another folder, or use "
            "the settings the cache was made with"
        ) from None


def _pending(
    job: PrecomputeJob, ctx: WorkerContext, datasets: dict[str, SegmentationDataset]
) -> tuple[int, list[WorkItem]]:
    """(images planned for this worker, those not yet in a finished shard)."""
    plans = [
        plan_split(split, ds.image_ids, job.shard_size, job.limit) for split, ds in datasets.items()
    ]
    done = completed_ids(job.cache_path)
    shards = list(assigned_items(plans, worker=ctx.worker, num_workers=ctx.num_workers))
    pending = [it for s in shards for it in s if it.image_id not in done.get(it.split, ())]
    return sum(len(s) for s in shards), pending


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
