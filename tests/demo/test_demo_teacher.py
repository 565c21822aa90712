"""The demo's shipped teacher: package data checked by sha256, and the command that makes it."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from maskteacher.cli import main
from maskteacher.demo.teacher import (
    CHECKPOINT,
    MANIFEST,
    MAX_BYTES,
    RECIPE,
    TeacherRecipe,
    load_teacher,
    make_teacher,
    package_folder,
    sha256_of,
)
from maskteacher.errors import UserError
from maskteacher.models import build_sam

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_teacher_is_small_checked_and_loads():
    teacher = load_teacher()
    assert teacher.checkpoint == package_folder() / CHECKPOINT
    assert teacher.checkpoint.stat().st_size <= MAX_BYTES
    assert teacher.manifest["sha256"] == sha256_of(teacher.checkpoint)
    assert teacher.manifest["recipe"] == dataclasses.asdict(RECIPE)  # made by today's recipe
    model = build_sam(teacher.model_type, teacher.checkpoint, image_size=teacher.image_size)
    assert model.image_size == 128


def test_the_teacher_ships_as_package_data():
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    for name in (CHECKPOINT, MANIFEST):
        assert f'"demo/teacher/{name}"' in section, name
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert f"!maskteacher/demo/teacher/{CHECKPOINT}" in ignored  # *.pth is ignored otherwise


def test_a_damaged_or_missing_teacher_is_one_clear_error(tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(package_folder(), damaged, ignore=shutil.ignore_patterns("__pycache__"))
    blob = bytearray((damaged / CHECKPOINT).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (damaged / CHECKPOINT).write_bytes(bytes(blob))
    with pytest.raises(UserError, match="sha256 .* differs from .* the file is damaged"):
        load_teacher(damaged)
    with pytest.raises(
        UserError, match=f"make one with maskteacher demo --make-teacher --teacher {tmp_path}"
    ):
        load_teacher(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / CHECKPOINT).write_bytes(b"x")
    (tmp_path / "bad" / MANIFEST).write_text("{}")
    with pytest.raises(UserError, match="not a demo teacher manifest"):
        load_teacher(tmp_path / "bad")
    # the demo checks its teacher before it writes anything
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--teacher", str(damaged)]) == 2
    assert not out.exists()


def test_make_teacher_writes_a_checked_teacher(tmp_path):
    """The command's code path with a tiny recipe (the real one takes ~10 minutes)."""
    tiny = TeacherRecipe(images=4, epochs=1, batch_size=4)
    teacher = make_teacher(tmp_path / "work", tmp_path / "t", recipe=tiny)
    manifest = json.loads((tmp_path / "t" / MANIFEST).read_text())
    assert manifest["sha256"] == sha256_of(tmp_path / "t" / CHECKPOINT)
    assert manifest["recipe"]["images"] == 4 and manifest["command"].endswith("--make-teacher")
    assert teacher.checkpoint == tmp_path / "t" / CHECKPOINT
    assert not list((tmp_path / "t").glob(".*tmp"))
    with pytest.raises(UserError, match="exists and is not empty"):
        make_teacher(tmp_path / "work", tmp_path / "t", recipe=tiny)
    # the CLI passes --out / --teacher / --force through: a used work folder needs --force
    args = [
        "demo",
        "--make-teacher",
        "--out",
        str(tmp_path / "work"),
        "--teacher",
        str(tmp_path / "t2"),
    ]
    assert main(args) == 2
    assert not (tmp_path / "t2").exists()
