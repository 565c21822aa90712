"""DDP plumbing under torchrun: process-group setup, device choice and small reductions.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group is initialised with
NCCL on CUDA and gloo on the CPU; each rank uses ``cuda:LOCAL_RANK``. Only the student is wrapped
in ``DistributedDataParallel`` (the teacher, when issue 7 runs one online, stays outside).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from maskteacher.devices import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Initialise the process group when launched by torchrun; return (info, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), resolve_device(device_name, key="train.device")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank=local_rank, key="train.device")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank), device


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def mean_count(value: float, device: torch.device) -> float:
    """Sum of ``value`` over ranks divided by the world size (``value`` itself without DDP).

    This is the per-rank normaliser that makes a DDP-averaged gradient equal the gradient of the
    global mean over matched pairs.
    """
    if not _active():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def sum_tensor(values: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) a float tensor across ranks in place; returns it."""
    if _active():
        dist.all_reduce(values)
    return values


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a non-finite loss)."""
    if not _active():
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if _active():
        dist.barrier()
