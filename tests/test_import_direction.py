"""Imports flow one way: dataset -> models -> precompute -> cache -> train -> eval (DESIGN.md).

Every ``import`` / ``from ... import`` of ``maskteacher`` modules anywhere in a file (function
bodies included: a lazy import is still a dependency) is read with ``ast``; imports under
``if TYPE_CHECKING:`` are type annotations only and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "maskteacher"


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The ``maskteacher`` modules ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    here = _module_name(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return {m for m in found if m == "maskteacher" or m.startswith("maskteacher.")}


def _modules() -> dict[str, set[str]]:
    return {_module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _violations(importer: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{module} imports {target}"
        for module, targets in MODULES.items()
        if _under(module, importer)
        for target in sorted(targets)
        if any(_under(target, f) for f in forbidden)
    ]


# what only the top (sweep, demo, cli) may import
LOWER_FORBIDDEN = ("maskteacher.sweep", "maskteacher.demo")

# package -> packages it must not import
RULES = {
    "maskteacher.cache_format": (
        "maskteacher.config",
        "maskteacher.data",
        "maskteacher.models",
        "maskteacher.precompute",
        "maskteacher.train",
        "maskteacher.eval",
        "maskteacher.viz",
        "maskteacher.cli",
        "maskteacher.errors",
        "maskteacher.demo",
        "maskteacher.sweep",
    ),
    "maskteacher.data": (
        *LOWER_FORBIDDEN,
        "maskteacher.precompute",
        "maskteacher.train",
        "maskteacher.eval",
    ),
    "maskteacher.models": (
        *LOWER_FORBIDDEN,
        "maskteacher.precompute",
        "maskteacher.train",
        "maskteacher.eval",
    ),
    "maskteacher.viz": (
        *LOWER_FORBIDDEN,
        "maskteacher.precompute",
        "maskteacher.train",
        "maskteacher.eval",
        "maskteacher.cli",
    ),
    "maskteacher.precompute": (
        *LOWER_FORBIDDEN,
        "maskteacher.train",
        "maskteacher.eval",
        "maskteacher.cli",
    ),
    "maskteacher.train": (
        *LOWER_FORBIDDEN,
        "maskteacher.precompute",
        "maskteacher.eval",
        "maskteacher.cli",
    ),
    "maskteacher.eval": (*LOWER_FORBIDDEN, "maskteacher.precompute", "maskteacher.cli"),
    # sweep sits on top, beside cli and demo: it calls train and eval, never the commands or
    # the demo (the demo uses the sweep, the cli wraps both)
    "maskteacher.sweep": ("maskteacher.cli", "maskteacher.demo", "maskteacher.precompute"),
    "maskteacher.demo": ("maskteacher.cli",),
}


@pytest.mark.parametrize("package", sorted(RULES))
def test_package_imports_flow_one_way(package):
    assert _violations(package, RULES[package]) == []


# train/'s own layers, bottom to top (maskteacher/train/__init__.py): a module may import its
# own layer or a lower one.
TRAIN_LAYERS = [
    (
        "maskteacher.train.schedule",
        "maskteacher.train.checkpoint",
        "maskteacher.train.logger",
        "maskteacher.train.distributed",
        "maskteacher.train.run_folder",
    ),
    ("maskteacher.train.data",),
    ("maskteacher.train.student",),
    ("maskteacher.train.supervision",),
    ("maskteacher.train.distill",),
    ("maskteacher.train.validate", "maskteacher.train.visual", "maskteacher.train.engine"),
    ("maskteacher.train.plan",),
    ("maskteacher.train.builders", "maskteacher.train.assemble"),
    ("maskteacher.train.run",),
]


def _layer(module: str) -> int | None:
    for level, members in enumerate(TRAIN_LAYERS):
        if any(_under(module, m) for m in members):
            return level
    return None


def test_every_train_module_has_a_layer():
    unplaced = [m for m in MODULES if _under(m, "maskteacher.train") and m != "maskteacher.train"]
    assert [m for m in unplaced if _layer(m) is None] == []


def test_no_train_module_imports_a_higher_layer():
    upward = []
    for module, targets in MODULES.items():
        level = _layer(module)
        if level is None:
            continue
        for target in targets:
            other = _layer(target)
            if other is not None and other > level:
                upward.append(f"{module} (layer {level}) imports {target} (layer {other})")
    assert upward == []


def test_only_the_builders_read_the_config():
    readers = sorted(
        module
        for module, targets in MODULES.items()
        if _under(module, "maskteacher.train")
        and any(_under(t, "maskteacher.config") for t in targets)
    )
    assert readers == ["maskteacher.train.builders"]


def test_the_checker_sees_relative_and_lazy_imports(tmp_path):
    pkg = tmp_path / "maskteacher" / "train"
    pkg.mkdir(parents=True)
    probe = pkg / "probe.py"
    probe.write_text(
        "from . import engine\n"
        "def f():\n    from maskteacher.eval import run\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from maskteacher.config import Config\n"
    )
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "maskteacher"
    try:
        found = imports_of(probe)
    finally:
        PACKAGE = saved
    assert "maskteacher.train.engine" in found
    assert "maskteacher.eval.run" in found
    assert "maskteacher.config" not in found
