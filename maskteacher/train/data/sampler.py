"""Sampling order and loaders: the resumable training sampler, the validation shard sampler.

Training keys are ``(index, epoch)`` pairs (the dataset seeds each item's choices with them);
validation takes every item once, split across DDP ranks without padding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from maskteacher.train.data.batch import Batch, TrainSample, collate


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that yields ``(index, epoch)`` keys and can start mid-epoch.

    The order of an epoch is DistributedSampler's (a permutation seeded by ``seed + epoch``, split
    across ranks); ``skip`` drops this rank's first ``skip`` indices of the epoch, for resuming.
    """

    def __init__(self, num_items: int, *, rank: int, world_size: int, shuffle: bool, seed: int):
        super().__init__(
            range(num_items), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed
        )
        self.skip = 0

    def set_skip(self, skip: int) -> None:
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.skip :]
        return iter([(int(i), self.epoch) for i in indices])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)


class ShardSampler(Sampler):
    """Validation order: rank r takes items r, r + world, ... (no padding, no duplicates)."""

    def __init__(self, num_items: int, *, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, num_items, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def batches_per_epoch(num_items: int, *, world_size: int, batch_size: int) -> int:
    """Micro-batches each rank runs per epoch (DistributedSampler pads to a multiple of ranks)."""
    per_rank = math.ceil(num_items / world_size)
    return math.ceil(per_rank / batch_size)


class _WorkerHalf(Dataset):
    """What the DataLoader workers run: the dataset's ``fetch`` (the worker half of an item)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        return self.dataset.fetch(key)


def keep_samples(samples: list[TrainSample]) -> list[TrainSample]:
    """The workers' collate: the half-loaded samples as they are (finished in the main process)."""
    return samples


class Batches:
    """Iterates a DataLoader of half-loaded samples; yields finished, collated :class:`Batch`
    objects (``dataset.finish`` in the main process, then :func:`collate`)."""

    def __init__(self, loader: DataLoader, dataset) -> None:
        self.loader = loader
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for samples in self.loader:
            yield collate(self.dataset.finish(samples))


def make_loader(
    dataset, *, batch_size: int, sampler: Sampler, num_workers: int, pin_memory: bool
) -> Batches:
    """Batches of ``dataset`` (a :class:`~maskteacher.train.data.dataset.TrainDataset`): its
    worker half in the DataLoader workers, its main-process half and the ragged
    :func:`~maskteacher.train.data.batch.collate` here."""
    loader = DataLoader(
        _WorkerHalf(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=keep_samples,
        pin_memory=pin_memory,
        drop_last=False,
    )
    return Batches(loader, dataset)
