"""What one ``maskteacher precompute`` run does: :class:`PrecomputeJob`, every setting as a plain
field. :meth:`PrecomputeJob.from_config` translates the config (the only place that sees it);
:meth:`PrecomputeJob.check` refuses settings no run can use, before anything is written.
:func:`maskteacher.precompute.run.run_precompute` runs a job.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from maskteacher.cache_format import Codec, StoreFlags
from maskteacher.data import open_dataset
from maskteacher.data.dataset import SegmentationDataset
from maskteacher.errors import UserError
from maskteacher.models.everything import GenerationParams
from maskteacher.precompute.teacher import TeacherSpec

log = logging.getLogger(__name__)


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
    #: config key naming the cache folder (for error messages)
    cache_key: str = "mask_teacher.cache_path"

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
        pc = cfg.precompute
        spec, cache_path, where = _teacher_and_cache(cfg, teacher)
        if not (output or cache_path):
            raise UserError(
                f"{where} is not set; set it to the folder the cache goes to (or pass --output DIR)"
            )
        where, cache_path = ("--output", output) if output else (where, cache_path)
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
            cache_key=where,
            **options,
        )

    def check(self) -> None:
        """UserError (one line, naming the key) for settings no run can use."""
        if self.batch_size < 1 or self.shard_size < 1:
            raise UserError("precompute.batch_size and precompute.shard_size must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be >= 1, got {self.limit}")
        for name, value in vars(self.generation).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"precompute.{name}: got {value}; expected a finite number")
        if "://" in self.cache_path:
            raise UserError(
                f"{self.cache_key} {self.cache_path}: precompute writes a local folder, not a URL; "
                "write the cache locally and copy it (URLs are for reading a finished cache)"
            )


def _teacher_and_cache(cfg: Any, teacher: str | None) -> tuple[TeacherSpec, str | None, str]:
    """(the teacher, its cache_path, the config key naming it): ``mask_teacher``, or the
    ``teachers`` entry named ``teacher``."""
    from maskteacher.config import resolve_teacher_type

    image_size = cfg.model.image_size
    if teacher is None:
        mt = cfg.mask_teacher
        spec = TeacherSpec(mt.teacher_type, mt.checkpoint_path, image_size, mt.strict)
        return spec, mt.cache_path, "mask_teacher.cache_path"
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
    return spec, entry.cache_path, f"teachers '{teacher}' cache_path"


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
