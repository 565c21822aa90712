"""Who this process is among the precompute workers, and the little communication they need.

Workers are the product of job-array tasks (``--num-shards N --shard-index I``) and torchrun
ranks (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``): worker ``I * world_size + rank`` of
``N * world_size``. Under torchrun a process group is created (gloo for CPU tensors, plus nccl
for CUDA when available) only to sum the per-rank counts at the end -- which is also the barrier
before rank 0 finalizes the manifest. The timeout is long (``MASKTEACHER_DIST_TIMEOUT_S``,
default 7 days) because ranks may finish their shards hours apart.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from maskteacher.devices import resolve_device as shared_resolve_device
from maskteacher.errors import UserError

_DEFAULT_TIMEOUT_S = 7 * 24 * 3600


@dataclass(frozen=True)
class WorkerContext:
    """This process's place: torchrun ``rank`` of ``world_size`` inside job-array task
    ``task_index`` of ``num_tasks``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    task_index: int = 0
    num_tasks: int = 1

    @classmethod
    def from_env(cls, *, num_shards: int = 1, shard_index: int = 0) -> WorkerContext:
        if num_shards < 1:
            raise UserError(f"--num-shards must be >= 1, got {num_shards}")
        if not 0 <= shard_index < num_shards:
            raise UserError(f"--shard-index must be in [0, {num_shards}), got {shard_index}")
        world = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        if not 0 <= rank < world:
            raise UserError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
        return cls(
            rank=rank,
            world_size=world,
            local_rank=_env_int("LOCAL_RANK", 0),
            task_index=shard_index,
            num_tasks=num_shards,
        )

    @property
    def worker(self) -> int:
        return self.task_index * self.world_size + self.rank

    @property
    def num_workers(self) -> int:
        return self.num_tasks * self.world_size

    @property
    def worker_name(self) -> str:
        """Name of this worker's failure log (``failures/<name>.jsonl``)."""
        return f"worker{self.worker:04d}-of-{self.num_workers:04d}"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 of its task: prints the summary and finalizes the manifest."""
        return self.rank == 0

    def init(self) -> None:
        """Join the torchrun process group (no-op outside torchrun or when already joined)."""
        if not self.distributed or dist.is_initialized():
            return
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        timeout = datetime.timedelta(
            seconds=_env_int("MASKTEACHER_DIST_TIMEOUT_S", _DEFAULT_TIMEOUT_S)
        )
        dist.init_process_group(backend=backend, timeout=timeout)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the ranks (identity outside torchrun); a barrier too."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def max(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def barrier(self) -> None:
        self.sum([0.0])


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer") from None


def resolve_device(spec: str, local_rank: int) -> torch.device:
    """``precompute.device`` -> a torch device (:func:`maskteacher.devices.resolve_device`:
    ``auto`` and ``cuda`` mean ``cuda:<LOCAL_RANK>``), made the current CUDA device."""
    device = shared_resolve_device(spec, local_rank=local_rank, key="precompute.device")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device
