"""Issue 11 items 4 and 13 (config parts): non-finite floats, repeated keys, unknown model
types, binary / non-UTF-8 files: each a one-line config error, exit 2 from ``config check``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maskteacher.cli import main
from maskteacher.config import TeacherEntry, load_config, resolve_teacher_type
from maskteacher.errors import UserError
from maskteacher.models import MODEL_TYPES


def _check(path: Path, capsys: pytest.CaptureFixture, *overrides: str) -> str:
    """Run ``config check``; assert exit 2 and one error line; return that line."""
    args = ["config", "check", str(path)]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("maskteacher: error: ") and "\n" not in err, err
    return err


# (YAML text, key the message must name)
NON_FINITE_YAML = {
    "lr-inf": ("train:\n  lr: .inf\n", "train.lr"),
    "lr-minus-inf": ("train:\n  lr: -.inf\n", "train.lr"),
    "lr-nan": ("train:\n  lr: .nan\n", "train.lr"),
    "loss-weight": ("train:\n  loss_weights:\n    dice: .inf\n", "train.loss_weights.dice"),
    "soft-weight": (
        "mask_teacher:\n  soft_loss:\n    weight: .inf\n",
        "mask_teacher.soft_loss.weight",
    ),
    "stability-offset": (
        "precompute:\n  stability_score_offset: .inf\n",
        "precompute.stability_score_offset",
    ),
    "stage-weights": (
        "stage_schedule:\n  - loss_weights:\n      bce: .inf\n",
        "stage_schedule[0].loss_weights.bce",
    ),
    "grad-clip-optional": ("train:\n  grad_clip: .inf\n", "train.grad_clip"),
    "huge-int-as-float": (f"train:\n  lr: {10**400}\n", "train.lr"),
}


@pytest.mark.parametrize("case", sorted(NON_FINITE_YAML))
def test_non_finite_floats_are_config_errors(case, tmp_path, capsys):
    text, key = NON_FINITE_YAML[case]
    path = tmp_path / "c.yaml"
    path.write_text(text)
    err = _check(path, capsys)
    assert f"{key}: got" in err and "expected a finite number" in err


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN"])
def test_non_finite_json_literals_are_config_errors(literal, tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text('{"train": {"lr": ' + literal + "}}")
    err = _check(path, capsys)
    assert "train.lr" in err and "expected a finite number" in err


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", ".inf", "1e999"])
def test_non_finite_overrides_are_config_errors(value, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 1\n")
    err = _check(path, capsys, f"mask_teacher.soft_loss.weight={value}")
    assert "mask_teacher.soft_loss.weight" in err and "finite" in err


def test_finite_values_still_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n  loss_weights:\n    focal: 20\n")
    cfg = load_config(path, ["mask_teacher.soft_loss.weight=0.25"])
    assert cfg.train.lr == 1e-4 and cfg.train.loss_weights.focal == 20.0
    assert cfg.mask_teacher.soft_loss.weight == 0.25


DUPLICATE_YAML = {
    "same-section": (
        "train:\n  lr: 1.0e-4\n  epochs: 2\n  lr: 1.0\n",
        "'lr' at line 4 (first at line 2)",
    ),
    "top-level-section": (
        "train:\n  lr: 1.0e-4\nmodel: {}\ntrain:\n  epochs: 2\n",
        "'train' at line 4",
    ),
    "flow-mapping": ("train: {lr: 1.0e-4, lr: 1.0}\n", "'lr' at line 1"),
    "list-item": ("teachers:\n  - name: a\n    type: vit_t\n    name: b\n", "'name' at line 4"),
}


@pytest.mark.parametrize("case", sorted(DUPLICATE_YAML))
def test_duplicate_yaml_keys_are_config_errors(case, tmp_path, capsys):
    text, expected = DUPLICATE_YAML[case]
    path = tmp_path / "c.yaml"
    path.write_text(text)
    err = _check(path, capsys)
    assert "duplicate key" in err and expected in err and str(path) in err


def test_duplicate_json_keys_are_config_errors(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text('{"train": {"lr": 1e-4, "epochs": 2, "lr": 1.0}}')
    err = _check(path, capsys)
    assert "duplicate key 'lr'" in err and str(path) in err


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    """``<<: {...}`` then an explicit key is YAML's override, not a repeated key."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  loss_weights:\n    <<: {bce: 2.0, dice: 3.0}\n    dice: 4.0\n")
    weights = load_config(path).train.loss_weights
    assert weights.dice == 4.0 and weights.bce == 2.0


@pytest.mark.parametrize(
    "text, key",
    [
        ("model:\n  type: vit_x\n", "model.type"),
        ("mask_teacher:\n  teacher_type: sam_huge\n", "mask_teacher.teacher_type"),
        ("teachers:\n  - name: t\n    type: vit_hh\n", "teachers[0].type"),
    ],
)
def test_unknown_model_types_fail_config_check(text, key, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    err = _check(path, capsys)
    assert key in err
    for name in MODEL_TYPES:  # the allowed names come from the registry, whatever it holds
        assert name in err


def test_every_registry_name_is_accepted(tmp_path):
    for name in MODEL_TYPES:
        path = tmp_path / "c.yaml"
        path.write_text(f"model:\n  type: {name}\nmask_teacher:\n  teacher_type: {name}\n")
        cfg = load_config(path)
        assert cfg.model.type == name and cfg.mask_teacher.teacher_type == name


def test_teacher_cfg_yaml_with_unknown_type(tmp_path):
    cfg_file = tmp_path / "teacher.yaml"
    cfg_file.write_text("model:\n  type: vit_q\n")
    with pytest.raises(UserError, match=r"model\.type in .*teacher\.yaml: got 'vit_q'"):
        resolve_teacher_type(TeacherEntry(name="t", cfg=str(cfg_file)))


BINARY = {
    "png-bytes.yaml": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe",
    "latin1.yaml": "train:\n  name: caf\xe9\n".encode("latin-1"),
    "utf16.json": json.dumps({"train": {"lr": 1e-4}}).encode("utf-16"),
    "nul.yaml": b"train:\n  lr: 1.0e-4\x00\x00\n",
    "nul.json": b'{"train": {"lr": 1e-4}}\x00',
}


@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_or_non_utf8_config_is_one_line(name, tmp_path, capsys):
    path = tmp_path / name
    path.write_bytes(BINARY[name])
    err = _check(path, capsys)
    assert str(path) in err
    assert "not a UTF-8 text file" in err or "not valid" in err


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "c.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"train": {"epochs": 3}}).encode())
    assert load_config(path).train.epochs == 3
