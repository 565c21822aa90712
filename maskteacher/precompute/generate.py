"""The generation loop of one precompute worker: images -> teacher -> cache records -> shards.

Images are decoded and resized in DataLoader workers (:mod:`.loader`), the teacher runs
``generate_everything`` on batches that never cross a planned shard, and a background thread
(:mod:`.sink`) encodes and writes the shards in order.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch
from tqdm import tqdm

from maskteacher.cache_format import CacheRecord
from maskteacher.cache_format.schema import empty_teacher
from maskteacher.data.dataset import SegmentationDataset
from maskteacher.models.everything import encode_images, generate_everything
from maskteacher.precompute.distributed import WorkerContext
from maskteacher.precompute.job import PrecomputeJob
from maskteacher.precompute.loader import ImageLoader, LoadedImage, make_loader
from maskteacher.precompute.plan import WorkItem, next_shard_name
from maskteacher.precompute.sink import ShardSink, SinkStats

log = logging.getLogger(__name__)


def generate(
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
    images = masks = empty = 0
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
            for record in cache_records(job, model, [b for b in batch if b.error is None], device):
                sink.add(record)
                images += 1
                masks += record.num_masks
                empty += record.num_masks == 0
            bar.update(len(batch))
            bar.set_postfix(masks_per_image=f"{masks / max(images, 1):.1f}", refresh=False)
        stats = sink.close()
        stats.empty = empty
    except BaseException:
        sink.abort()
        raise
    finally:
        bar.close()
    return stats


def cache_records(
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
