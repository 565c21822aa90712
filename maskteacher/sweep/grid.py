"""What a sweep runs: combinations of config overrides x seeds, in one fixed order.

A *combination* is a named set of ``--set``-style overrides. ``--variant NAME KEY=VALUE ...``
gives named ones (e.g. one per supervision method), ``--grid KEY=V1,V2`` varies one key; the
combinations are every variant times the cartesian product of the grids (in the order given,
the last grid varying fastest). Every combination runs once per seed. Runs are numbered in
that order -- combination by combination, seeds innermost -- and ``--index I --count N`` takes
runs ``I, I + N, I + 2N, ...``, so the N slices of a job array cover every run exactly once.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from maskteacher.errors import UserError

#: keys the sweep sets itself for every run
RESERVED_KEYS = ("model.save_path", "train.seed", "train.resume")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


@dataclass(frozen=True)
class Combination:
    """One point of the sweep: ``name`` (unique; also its folder name) and its overrides as
    ``(dotted key, value text)`` pairs, applied in order like ``--set KEY=VALUE``."""

    name: str
    overrides: tuple[tuple[str, str], ...]

    @property
    def folder(self) -> str:
        return _UNSAFE.sub("_", self.name)


@dataclass(frozen=True)
class RunSpec:
    """One run: a combination and a seed; ``number`` is its position in the sweep's order."""

    number: int
    combination: Combination
    seed: int

    @property
    def folder(self) -> str:
        """Run folder relative to the sweep's ``runs/``."""
        return f"{self.combination.folder}/seed_{self.seed}"


def _split_assignment(item: str, option: str) -> tuple[str, str]:
    if "=" not in item:
        raise UserError(f"{option} {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"{option} {item!r}: the key is empty or has an empty part")
    if key in RESERVED_KEYS:
        raise UserError(
            f"{option} {item!r}: the sweep sets {key} itself for every run "
            "(seeds come from --seeds, each run gets its own folder under --out)"
        )
    return key, value


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["KEY=V1,V2", ...]`` -> ``[(KEY, [V1, V2]), ...]``; values are split on commas."""
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        key, text = _split_assignment(item, "--grid")
        values = [v.strip() for v in text.split(",")]
        if any(v == "" for v in values):
            raise UserError(f"--grid {item!r}: an empty value; expected KEY=V1,V2,...")
        if len(set(values)) != len(values):
            raise UserError(f"--grid {item!r}: a value is listed twice")
        if key in (k for k, _ in grid):
            raise UserError(f"--grid: {key} is given twice; list all its values in one --grid")
        grid.append((key, values))
    return grid


def parse_variants(items: list[list[str]]) -> list[Combination]:
    """``[[NAME, KEY=VALUE, ...], ...]`` -> named combinations (a name alone: no overrides)."""
    variants: list[Combination] = []
    for item in items:
        name, *assignments = item
        if not name or "=" in name:
            raise UserError(f"--variant {' '.join(item)!r}: expected NAME [KEY=VALUE ...]")
        if name in (v.name for v in variants):
            raise UserError(f"--variant: the name {name!r} is used twice")
        pairs = tuple(_split_assignment(a, f"--variant {name}") for a in assignments)
        variants.append(Combination(name, pairs))
    return variants


def expand(variants: list[Combination], grid: list[tuple[str, list[str]]]) -> list[Combination]:
    """Every variant (or one unnamed base when none) times the cartesian product of the grid."""
    bases = variants or [Combination("", ())]
    keys = [key for key, _ in grid]
    out = []
    for base in bases:
        for values in itertools.product(*(vals for _, vals in grid)):
            pairs = tuple(zip(keys, values))
            label = ",".join(f"{k}={v}" for k, v in pairs)
            name = ",".join(part for part in (base.name, label) if part) or "base"
            out.append(Combination(name, base.overrides + pairs))
    folders = [c.folder for c in out]
    clash = sorted({f for f in folders if folders.count(f) > 1})
    if clash:
        raise UserError(f"two combinations share the folder name {clash[0]!r}; rename a --variant")
    return out


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (non-negative, no repeats)."""
    try:
        seeds = [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(
            f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2"
        ) from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: seeds must be distinct and >= 0")
    return seeds


def runs_of(combinations: list[Combination], seeds: list[int]) -> list[RunSpec]:
    """Every run in the sweep's order: combination by combination, seeds innermost."""
    pairs = [(c, s) for c in combinations for s in seeds]
    return [RunSpec(number, c, s) for number, (c, s) in enumerate(pairs)]


def select_slice(runs: list[RunSpec], index: int, count: int) -> list[RunSpec]:
    """Slice ``index`` of ``count``: runs ``index, index + count, ...`` (0 <= index < count)."""
    if count < 1:
        raise UserError(f"--count {count}: expected a number of slices >= 1")
    if not 0 <= index < count:
        raise UserError(f"--index {index}: expected 0 <= index < --count ({count})")
    return runs[index::count]
