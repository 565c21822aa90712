"""Deterministic shard plan: which images form which shard, and which worker writes it.

Each split's images, in the dataset's own deterministic order (readers list items sorted), are
cut into planned shards of ``shard_size``: planned shard ``k`` of a split holds images
``[k * shard_size, (k + 1) * shard_size)``. Worker ``w`` of ``W`` (job-array task and torchrun
rank combined) writes the planned shards with ``k % W == w`` -- every split's shards are dealt
out the same way -- so each planned shard has exactly one writer and the plan does not depend on
how many workers there are (a resumed run may use another worker count).

A planned shard is written as one cache shard named ``<split>-<k:06d>-<attempt:02d>``. Attempt 0
holds all its images; a later attempt holds only images that are not yet in a finished shard
(images that failed before, or a shard size changed between runs). Resume therefore needs only
:func:`maskteacher.cache_format.completed_ids`: an image is pending exactly when no finished
shard holds it, and a shard killed mid-write is redone under the same name (its writer's lock
is taken over and its temporary folder removed by :class:`~maskteacher.cache_format.ShardWriter`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

from maskteacher.cache_format.paths import SHARDS_DIR
from maskteacher.cache_format.schema import SHARD_SUFFIX

_MAX_ATTEMPTS = 100


@dataclass(frozen=True)
class WorkItem:
    """One image to process: ``index`` into its split's dataset, planned shard ``shard``."""

    split: str
    index: int
    image_id: str
    shard: int


@dataclass(frozen=True)
class SplitPlan:
    """The images of one split (dataset order) and the planned shard size."""

    split: str
    image_ids: tuple[str, ...]
    shard_size: int

    @property
    def num_shards(self) -> int:
        return -(-len(self.image_ids) // self.shard_size)

    def shard_items(self, k: int) -> list[WorkItem]:
        start = k * self.shard_size
        ids = self.image_ids[start : start + self.shard_size]
        return [WorkItem(self.split, start + i, image_id, k) for i, image_id in enumerate(ids)]


def plan_split(split: str, image_ids: list[str], shard_size: int, limit: int | None) -> SplitPlan:
    """Plan ``split``; ``limit`` keeps only its first ``limit`` images (None: all)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    ids = tuple(image_ids if limit is None else image_ids[:limit])
    return SplitPlan(split, ids, shard_size)


def assigned_items(
    plans: list[SplitPlan], *, worker: int, num_workers: int
) -> Iterator[list[WorkItem]]:
    """The planned shards worker ``worker`` of ``num_workers`` writes, as lists of items."""
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker {worker} is not in [0, {num_workers})")
    for plan in plans:
        for k in range(worker, plan.num_shards, num_workers):
            yield plan.shard_items(k)


def shard_prefix(split: str, k: int) -> str:
    return f"{split}-{k:06d}"


def next_shard_name(root: str | os.PathLike[str], split: str, k: int, backend: str) -> str:
    """``<split>-<k:06d>-<attempt:02d>``: the lowest attempt whose shard is not finished yet.

    A temporary shard or lock left by a killed writer does not count as finished: its name is
    reused and the writer cleans it up.
    """
    prefix = shard_prefix(split, k)
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d{{2}}){re.escape(SHARD_SUFFIX[backend])}$")
    folder = os.path.join(os.fspath(root), SHARDS_DIR)
    finished = {
        int(m.group(1))
        for name in (os.listdir(folder) if os.path.isdir(folder) else [])
        if (m := pattern.match(name))
    }
    for attempt in range(_MAX_ATTEMPTS):
        if attempt not in finished:
            return f"{prefix}-{attempt:02d}"
    raise RuntimeError(f"planned shard {prefix} has {_MAX_ATTEMPTS} finished attempts")
