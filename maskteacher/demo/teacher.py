"""The demo's teacher: a small checkpoint shipped as package data, and the command that makes it.

A teacher clearly stronger than the student needs more data and training than the demo's
10-minute budget allows on two CPU cores, so it is made once, by a command anyone can re-run::

    maskteacher demo --make-teacher            # ~11 minutes on one CPU thread

:func:`make_teacher` trains ``vit_t_tiny`` from random weights on :data:`RECIPE`'s sample data
(the ``mixed`` style: every shape and fill of both demo domains -- a teacher that has seen more
of the world than the student, as SAM-H has) and writes ``teacher.pth`` (an official-format
state dict, ~1.3 MB) and ``teacher.json`` (its sha256, size and the recipe) into the teacher
folder: the package's ``maskteacher/demo/teacher/`` by default, or ``--teacher DIR``.
:func:`load_teacher` checks the checkpoint against the sha256 in ``teacher.json`` before the
demo uses it. One torch thread is used, so the same command on the same kind of machine makes
the same file; another torch build or CPU may differ in the last bits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from maskteacher.demo.scenario import DemoPaths, DemoSettings, base_config, from_scratch
from maskteacher.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT = "teacher.pth"
MANIFEST = "teacher.json"
MAX_BYTES = 5 * 1024 * 1024  # what may ship as package data


@dataclass(frozen=True)
class TeacherRecipe:
    """How the shipped teacher is made (recorded in ``teacher.json``)."""

    model_type: str = "vit_t_tiny"
    image_size: int = 128
    style: str = "mixed"
    images: int = 384
    data_seed: int = 7
    epochs: int = 48
    seed: int = 1
    batch_size: int = 8


RECIPE = TeacherRecipe()


@dataclass(frozen=True)
class Teacher:
    """A checked teacher: its checkpoint, backbone and image size."""

    checkpoint: Path
    model_type: str
    image_size: int
    manifest: dict[str, Any]


def package_folder() -> Path:
    """The teacher folder inside the installed package."""
    return Path(str(resources.files("maskteacher.demo") / "teacher"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_teacher(folder: str | Path | None = None) -> Teacher:
    """The teacher in ``folder`` (default: the package's), its sha256 checked against
    ``teacher.json``; one clear error when it is missing or damaged."""
    folder = Path(folder) if folder is not None else package_folder()
    ckpt, manifest_path = folder / CHECKPOINT, folder / MANIFEST
    if not ckpt.is_file() or not manifest_path.is_file():
        raise UserError(
            f"no demo teacher in {folder} ({CHECKPOINT} + {MANIFEST}); make one with "
            f"maskteacher demo --make-teacher{'' if folder == package_folder() else f' --teacher {folder}'}"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        want, model_type, size = manifest["sha256"], manifest["model_type"], manifest["image_size"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{manifest_path}: not a demo teacher manifest ({exc})") from None
    have = sha256_of(ckpt)
    if have != want:
        raise UserError(
            f"{ckpt}: sha256 {have} differs from {want} in {MANIFEST}; the file is damaged or "
            "was replaced -- re-make it with maskteacher demo --make-teacher"
        )
    return Teacher(ckpt, model_type, int(size), manifest)


def recipe_settings(recipe: TeacherRecipe = RECIPE) -> DemoSettings:
    return DemoSettings(
        image_size=recipe.image_size,
        student_type=recipe.model_type,
        batch_size=recipe.batch_size,
        seed=recipe.seed,
    )


def teacher_config(work: Path, recipe: TeacherRecipe = RECIPE) -> dict[str, Any]:
    """The teacher's training config: the demo's from-scratch recipe on the broad data."""
    paths = DemoPaths(work)
    return from_scratch(
        base_config(paths, recipe_settings(recipe)),
        train=work / "data",
        save=work / "run",
        epochs=recipe.epochs,
    )


def make_teacher(
    work: str | Path,
    folder: str | Path | None = None,
    *,
    force: bool = False,
    recipe: TeacherRecipe = RECIPE,
) -> Teacher:
    """Train the teacher by ``recipe`` (default :data:`RECIPE`) in ``work`` and write it into
    ``folder`` (default: the package's teacher folder); returns the checked teacher."""
    import torch

    from maskteacher.config import config_from_dict
    from maskteacher.data import make_sample
    from maskteacher.train import train

    work = Path(work)
    if work.exists() and any(work.iterdir()):
        if not force:
            raise UserError(f"{work} exists and is not empty; choose another --out or pass --force")
        shutil.rmtree(work)
    folder = Path(folder) if folder is not None else package_folder()
    make_sample(work / "data", images=recipe.images, seed=recipe.data_seed, style=recipe.style)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        result = train(config_from_dict(teacher_config(work, recipe)))
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    exported = Path(result.export_path)
    if exported.stat().st_size > MAX_BYTES:
        raise RuntimeError(f"{exported} is {exported.stat().st_size} bytes, over {MAX_BYTES}")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{CHECKPOINT}.tmp"
    shutil.copyfile(exported, tmp)
    manifest = {
        "sha256": sha256_of(tmp),
        "bytes": tmp.stat().st_size,
        "model_type": recipe.model_type,
        "image_size": recipe.image_size,
        "recipe": asdict(recipe),
        "train_seconds": round(seconds, 1),
        "torch": torch.__version__,
        "command": "maskteacher demo --make-teacher",
    }
    tmp_manifest = folder / f".{MANIFEST}.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(folder / CHECKPOINT)
    tmp_manifest.replace(folder / MANIFEST)
    log.info("demo teacher written to %s (%d bytes, %.0f s)", folder, manifest["bytes"], seconds)
    return load_teacher(folder)
