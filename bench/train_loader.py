"""The trainer's data path from the teacher cache, the real classes side by side (issue 16).

Both rows run ``maskteacher.train``'s own TrainDataset + make_loader (2 DataLoader workers,
batch 8, mixed GT/grid prompts, teacher logits + points requested) over one synthetic cache of
100-mask records at image size 1024:

- ``decode_in_workers`` -- the trainer before: each worker decoded its records (zstd, bit
  unpacking) and built the tensors, then sent the decoded arrays to the main process;
- ``fast_path`` -- the trainer now: workers fetch the compressed chunk bytes of the needed fields
  only, decode the small ones (ground truth, points) and draw the prompts; the teacher logits
  cross to the main process compressed and are decoded there a batch at a time, in threads.

The images are tiny stand-ins (the cache path is what is measured; a real run adds the JPEG
decode and resize, the same in both rows). Rates alternate in rounds so load from other
processes hits both alike; the table prints the median rate of each and the ratio.

    python bench/train_loader.py [--images 512] [--rounds 3] [--seconds 6]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_io import LogitSynth  # noqa: E402

from maskteacher.cache_format import (  # noqa: E402
    CacheHeader,
    CacheRecord,
    Codec,
    ShardWriter,
    StoreFlags,
    finalize,
    init_cache,
    open_cache,
)
from maskteacher.data import input_size  # noqa: E402
from maskteacher.data.dataset import Sample  # noqa: E402
from maskteacher.train.data.cache import CacheTargets  # noqa: E402
from maskteacher.train.data.dataset import TrainDataset  # noqa: E402
from maskteacher.train.data.prompts import EverythingPromptSpec  # noqa: E402
from maskteacher.train.data.sampler import ResumableSampler, make_loader  # noqa: E402

IMAGE_SIZE = 1024
ORIG_HW = (96, 144)
FIELDS = frozenset({"logits", "points"})


class StandIns:
    """A dataset reader of tiny images whose ids match the cache (the cache path is measured)."""

    def __init__(self, n: int) -> None:
        self.image_ids = [f"img{i:06d}" for i in range(n)]
        self.image = np.zeros((*ORIG_HW, 3), np.uint8)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> Sample:
        return Sample.from_arrays(self.image_ids[i], self.image, np.zeros((0, *ORIG_HW), bool))


class DecodeInWorkers(CacheTargets):
    """The trainer's cache path before: whole records decoded in the DataLoader worker."""

    def fetch(self, index, sample, input_hw):
        found = super().fetch(index, sample, input_hw)
        if found.pending is not None:
            extra = self.finish([found.pending])[0]
            found.teacher = dataclasses.replace(found.teacher, logits=extra.logits)
            found.pending = None
        return found


def write_cache(root: str, n: int, masks: int) -> None:
    low = IMAGE_SIZE // 4
    synth = LogitSynth(low, pool=32, white=0.1, seed=0)
    pool = [synth.image(k, masks) for k in range(8)]
    gt = np.random.default_rng(0).uniform(size=(10, low, low)) < 0.2
    header = CacheHeader(
        teacher_type="synthetic",
        checkpoint_sha256="0" * 64,
        image_size=IMAGE_SIZE,
        codec=Codec("int8"),
        store=StoreFlags(teacher=True, gt=True),
        fingerprints={"train": "sha256:bench"},
    )
    init_cache(root, header)
    hw = np.asarray(input_size(ORIG_HW, IMAGE_SIZE), np.int64)
    with ShardWriter(root, "bench", split="train") as writer:
        for i in range(n):
            logits = pool[i % len(pool)]
            k = logits.shape[0]
            writer.add(
                CacheRecord(
                    image_id=f"img{i:06d}",
                    split="train",
                    orig_hw=np.asarray(ORIG_HW, np.int64),
                    input_hw=hw,
                    teacher_logits=logits,
                    teacher_points=np.full((k, 2), 100.0, np.float32),
                    teacher_iou=np.full((k,), 0.9, np.float32),
                    teacher_stability=np.full((k,), 0.95, np.float32),
                    teacher_boxes=np.zeros((k, 4), np.float32),
                    gt_masks=gt,
                )
            )
    finalize(root)


def rate(root: str, source_cls, n: int, seconds: float) -> float:
    reader = open_cache(root, split="train")
    targets = source_cls(
        reader=reader,
        positions=np.arange(n),
        teacher_fields=FIELDS,
        logit_scale=reader.header.codec.scale,
        cache_ids=("bench",),
    )
    dataset = TrainDataset(
        StandIns(n),
        image_size=IMAGE_SIZE,
        prompts=EverythingPromptSpec(source="mixed", grid_points=16, max_prompts=64),
        targets=targets,
    )
    sampler = ResumableSampler(n, rank=0, world_size=1, shuffle=True, seed=0)
    batches = make_loader(dataset, batch_size=8, sampler=sampler, num_workers=2, pin_memory=False)
    count, start, epoch = 0, None, 0
    while True:
        sampler.set_epoch(epoch)
        for batch in batches:
            if start is None:  # the first batch pays for starting the workers
                start = time.perf_counter()
                continue
            count += batch.num_images
            if time.perf_counter() - start > seconds:
                return count / (time.perf_counter() - start)
        epoch += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--masks", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = str(Path(tmp) / "cache")
        write_cache(root, args.images, args.masks)
        rates: dict[str, list[float]] = {"decode_in_workers": [], "fast_path": []}
        for _ in range(args.rounds):
            rates["decode_in_workers"].append(
                rate(root, DecodeInWorkers, args.images, args.seconds)
            )
            rates["fast_path"].append(rate(root, CacheTargets, args.images, args.seconds))
    old, new = (statistics.median(rates[k]) for k in ("decode_in_workers", "fast_path"))
    print(f"trainer loader, 2 workers, batch 8, {args.masks}-mask records at {IMAGE_SIZE}")
    for name, values in rates.items():
        shown = ", ".join(f"{v:.0f}" for v in values)
        print(f"  {name:<18} {statistics.median(values):7.0f} images/s  (rounds: {shown})")
    print(f"  fast_path / decode_in_workers: {new / old:.2f}x")


if __name__ == "__main__":
    main()
