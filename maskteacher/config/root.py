"""The whole config (:class:`Config`: one field per section) and its plain-data views."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from maskteacher.config.fields import file_key, option
from maskteacher.config.sections import (
    CacheConfig,
    DatasetConfig,
    FreezeConfig,
    ModelConfig,
    PrecomputeConfig,
    StageConfig,
    TrainConfig,
    VisualConfig,
)
from maskteacher.config.teachers import DistillationConfig, MaskTeacherConfig, TeacherEntry


@dataclass
class Config:
    dataset: DatasetConfig = option(factory=DatasetConfig, help="Data and prompts.")
    model: ModelConfig = option(factory=ModelConfig, help="The student.")
    train: TrainConfig = option(factory=TrainConfig, help="Optimisation and the training loop.")
    freeze: FreezeConfig = option(factory=FreezeConfig, help="Frozen parts of the student.")
    distillation: DistillationConfig = option(
        factory=DistillationConfig, help="Feature distillation from teachers."
    )
    teachers: list[TeacherEntry] = option(
        factory=list, help="Feature-distillation teachers, each with its own cache."
    )
    mask_teacher: MaskTeacherConfig = option(
        factory=MaskTeacherConfig, help="Mask-teacher supervision (the spec's block)."
    )
    visual: VisualConfig = option(factory=VisualConfig, help="Overlay pictures during training.")
    stage_schedule: list[StageConfig] = option(factory=list, help="Per-epoch-range overrides.")
    precompute: PrecomputeConfig = option(
        factory=PrecomputeConfig, help="Teacher cache generation (maskteacher precompute)."
    )
    cache: CacheConfig = option(factory=CacheConfig, help="Reading the teacher cache.")

    # -- convenience -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data, keys as they appear in files."""
        return to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def save(self, path: str | Path) -> None:
        """Write the resolved config (YAML or JSON by suffix) atomically."""
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) if path.suffix == ".json" else self.to_yaml()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


def walk(obj: Any, path: str):
    """Yield (key path, field, value) for every leaf field of a dataclass tree."""
    for f in dataclasses.fields(obj):
        key_path = f"{path}.{file_key(f)}" if path else file_key(f)
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from walk(value, key_path)
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                yield from walk(item, f"{key_path}[{i}]")
        else:
            yield key_path, f, value


def to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {file_key(f): to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
