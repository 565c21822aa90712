"""A sweep's definition and its folder: the base config, combinations, seeds, evaluation sets.

``OUT/sweep.json`` records what the folder holds: the resolved base config (without the keys the
sweep sets per run), the evaluation sets and the thread count -- these must be the same for
every invocation into one folder, or the runs would not be comparable -- and the union of the
combinations and seeds asked for so far, in the order first asked (the order of the tables).
Each run lives in ``OUT/runs/<combination>/seed_<S>/`` (its ``model.save_path``).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maskteacher.config import Config, apply_override, config_from_dict
from maskteacher.errors import UserError
from maskteacher.sweep.grid import RESERVED_KEYS, Combination, RunSpec, runs_of

SWEEP_FILE = "sweep.json"
FORMAT_VERSION = 1


def _without_reserved(raw: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for dotted in RESERVED_KEYS:
        section, key = dotted.split(".")
        raw.get(section, {}).pop(key, None)
    return raw


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')} ({a!r} here, {b!r} in the folder)"


@dataclass
class Sweep:
    """One sweep. config: the resolved base config as plain data (``Config.to_dict``);
    evals: evaluation set name -> dataset path; threads: torch threads per run (None: torch's
    default); overlays: overlay pictures per evaluation."""

    out: Path
    config: dict[str, Any]
    combinations: list[Combination]
    seeds: list[int]
    evals: dict[str, str]
    threads: int | None = 1
    overlays: int = 2

    @classmethod
    def create(
        cls,
        cfg: Config,
        *,
        out: str | os.PathLike[str],
        combinations: list[Combination],
        seeds: list[int],
        evals: dict[str, str] | None = None,
        threads: int | None = 1,
        overlays: int = 2,
    ) -> Sweep:
        """The sweep of ``cfg``; evals default to ``{"val": dataset.val_dataset}`` (given names
        are added, ``val`` replaced). Every run's config is built (and validated) here."""
        sets = {"val": cfg.dataset.val_dataset} if cfg.dataset.val_dataset else {}
        sets.update(evals or {})
        if not sets:
            raise UserError("nothing to evaluate: set dataset.val_dataset or pass --eval NAME=PATH")
        if threads is not None and threads < 1:
            raise UserError(f"--threads {threads}: expected a number >= 1")
        raw = _without_reserved(cfg.to_dict())
        sweep = cls(Path(out), raw, combinations, seeds, sets, threads, overlays)
        for run in sweep.runs():
            sweep.run_config(run)
        return sweep

    # -- runs --------------------------------------------------------------------------------
    def runs(self) -> list[RunSpec]:
        return runs_of(self.combinations, self.seeds)

    def run_dir(self, run: RunSpec) -> Path:
        return self.out / "runs" / run.folder

    def run_config(self, run: RunSpec) -> Config:
        """The config of one run: the base, the combination's overrides, seed, folder, resume."""
        raw = copy.deepcopy(self.config)
        try:
            for key, value in run.combination.overrides:
                apply_override(raw, f"{key}={value}")
            raw.setdefault("train", {}).update({"seed": run.seed, "resume": True})
            raw.setdefault("model", {})["save_path"] = str(self.run_dir(run))
            return config_from_dict(raw, source=f"sweep run {run.folder}")
        except UserError as exc:
            raise UserError(f"combination {run.combination.name!r}: {exc}") from None

    def eval_config(self, run: RunSpec, name: str) -> Config:
        """The run's config evaluating on evaluation set ``name`` (as ``dataset.val_dataset``;
        a set other than the config's own has its layout detected)."""
        raw = self.run_config(run).to_dict()
        if self.evals[name] != raw["dataset"]["val_dataset"]:
            raw["dataset"].update({"val_dataset": self.evals[name], "format": None})
        return config_from_dict(raw, source=f"sweep run {run.folder}, eval {name}")

    # -- the folder --------------------------------------------------------------------------
    def header(self) -> dict[str, Any]:
        return {"config": self.config, "evals": self.evals, "threads": self.threads}

    def record(self) -> None:
        """Create OUT and write or extend ``sweep.json``; refuse a folder of another sweep."""
        path = self.out / SWEEP_FILE
        combos = [
            {"name": c.name, "overrides": [list(p) for p in c.overrides]} for c in self.combinations
        ]
        seeds = list(self.seeds)
        if path.is_file():
            old = read_sweep_file(self.out)
            for key, value in self.header().items():
                if old.get(key) != value:
                    raise UserError(
                        f"{self.out} holds a sweep with other {key}: first difference "
                        f"{_first_difference(value, old.get(key))}; use another --out"
                    )
            known = {c["name"]: c for c in old["combinations"]}
            for c in combos:
                if c["name"] in known and known[c["name"]] != c:
                    raise UserError(
                        f"{self.out}: combination {c['name']!r} was run with other overrides "
                        f"({known[c['name']]['overrides']}); use another --out"
                    )
            combos = old["combinations"] + [c for c in combos if c["name"] not in known]
            seeds = old["seeds"] + [s for s in seeds if s not in old["seeds"]]
        payload = {
            "version": FORMAT_VERSION,
            **self.header(),
            "combinations": combos,
            "seeds": seeds,
        }
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, payload)


def read_sweep_file(out: str | os.PathLike[str]) -> dict[str, Any]:
    """``OUT/sweep.json`` as data; one clear error when the folder is not a sweep."""
    path = Path(out) / SWEEP_FILE
    if not path.is_file():
        raise UserError(
            f"{out} is not a sweep folder: no {SWEEP_FILE} (run maskteacher sweep first)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg}); the folder is damaged") from None
    if data.get("version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: sweep format version {data.get('version')!r}, expected {FORMAT_VERSION}"
        )
    return data


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to a temporary name unique to this process, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
