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

from maskteacher.errors import UserError


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


def resolve_device(name: str, *, local_rank: int = 0) -> torch.device:
    """``auto`` (cuda when available), ``cpu``, ``cuda`` or ``cuda:N``; under DDP, ``cuda`` and
    ``auto`` mean ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"train.device: got {name!r}; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"train.device: {name!r} asked for but CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    elif device.type != "cpu":
        raise UserError(f"train.device: got {name!r}; expected auto, cpu, cuda or cuda:N")
    return device


def init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Initialise the process group when launched by torchrun; return (info, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), resolve_device(device_name)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank=local_rank)
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


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's boolean, on every rank (e.g. the early-stop decision)."""
    if not _active():
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier() -> None:
    if _active():
        dist.barrier()
