"""Config loading, validation, overrides and the CLI check command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from maskteacher.cli import main
from maskteacher.config import Config, config_from_dict, load_config, reference_markdown
from maskteacher.errors import UserError

REPO = Path(__file__).resolve().parents[2]
SPEC_REPLACE = """
mask_teacher:
  enable: true               # turn the feature on / off
  method: "replace_gt"       # <- choose this method
  teacher_type: "vit_h"      # "vit_h" (SAM-H) or "vit_t" (original MobileSAM)
  checkpoint_path: "/path/to/teacher/checkpoint.pth"
  iou_threshold: 0.3         # Hungarian threshold used for matching
"""
SPEC_DUAL = """
mask_teacher:
  enable: true
  method: "dual_supervision"
  teacher_type: "vit_h"
  checkpoint_path: "/path/to/teacher/checkpoint.pth"
  iou_threshold: 0.3
  soft_loss:
    type: "l2"              # "l2" or "kl"
    weight: 0.5             # λ_soft, multiplies the soft loss when added
"""
SPEC_JSON = {
    "dataset": {"mode": "everything"},
    "model": {},
    "train": {},
    "mask_teacher": {
        "enable": True,
        "method": "dual_supervision",
        "teacher_type": "vit_h",
        "checkpoint_path": "/models/sam_hq_vit_h.pth",
        "iou_threshold": 0.3,
        "soft_loss": {"type": "kl", "weight": 0.3},
    },
}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def everything(block: str) -> str:
    return "dataset:\n  mode: everything\n" + block


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.*")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # a round trip through the resolved form gives the same config
    assert config_from_dict(cfg.to_dict()) == cfg


def test_shipped_configs_exist() -> None:
    assert len(list((REPO / "configs").glob("*.*"))) >= 3


def test_spec_replace_gt_block_loads(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "c.yaml", everything(SPEC_REPLACE)))
    mt = cfg.mask_teacher
    assert (mt.enable, mt.method, mt.teacher_type, mt.iou_threshold) == (
        True,
        "replace_gt",
        "vit_h",
        0.3,
    )
    assert mt.checkpoint_path == "/path/to/teacher/checkpoint.pth"


def test_spec_dual_block_loads(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "c.yaml", everything(SPEC_DUAL)))
    assert cfg.mask_teacher.method == "dual_supervision"
    assert (cfg.mask_teacher.soft_loss.type, cfg.mask_teacher.soft_loss.weight) == ("l2", 0.5)


def test_spec_json_example_loads(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "c.json", json.dumps(SPEC_JSON)))
    assert cfg.mask_teacher.soft_loss.type == "kl"
    assert cfg.mask_teacher.soft_loss.weight == pytest.approx(0.3)


def test_yaml_and_json_give_same_config(tmp_path: Path) -> None:
    from_json = load_config(write(tmp_path, "c.json", json.dumps(SPEC_JSON)))
    from_yaml = load_config(write(tmp_path, "c.yml", yaml.safe_dump(SPEC_JSON)))
    assert from_json == from_yaml
    assert from_json.to_dict() == from_yaml.to_dict()


def test_omitted_block_and_disabled_block_mean_no_teacher(tmp_path: Path) -> None:
    assert (
        load_config(write(tmp_path, "a.yaml", "model:\n  type: vit_t\n")).mask_teacher.enable
        is False
    )
    disabled = write(tmp_path, "b.yaml", "mask_teacher:\n  enable: false\n  method: replace_gt\n")
    assert load_config(disabled).mask_teacher.enable is False  # single mode is fine when disabled


def test_origin_style_config_loads(tmp_path: Path) -> None:
    """A config with the origin project's keys (per-block weight, lambda, teachers with cfg, stages)."""
    origin = {
        "dataset": {
            "train_dataset": "./datasets/train",
            "val_dataset": "./datasets/val",
            "max_bbox_shift": 20,
            "num_workers": 4,
            "prompt_mode": "mixed",
            "min_points": 1,
            "max_points": 3,
            "mode": "everything",
            "grid_points": 16,
        },
        "model": {
            "checkpoint_path": "./weights/mobile_sam.pt",
            "type": "vit_t",
            "image_size": 1024,
            "save_path": "./logs",
        },
        "train": {
            "epochs": 300,
            "lr": 0.00001,
            "batch_size": 1,
            "val_freq": 1,
            "gradient_accumulation": 1,
            "bf16": True,
            "warmup_step": 250,
            "min_lr_ratio": 0.0,
            "resume": False,
            "early_stop_patience": 20,
            "loss_weights": {"bce": 1.0, "focal": 15, "dice": 1.0, "iou": 1.0, "cls": 1.0},
        },
        "visual": {
            "status": True,
            "save_path": "./images",
            "IOU_threshold": 0.5,
            "save_every_n_epochs": 1,
        },
        "freeze": {
            "freeze_image_encoder": False,
            "freeze_prompt_encoder": False,
            "freeze_mask_decoder": False,
            "unfreeze_epoch": 0,
        },
        "distillation": {
            "enable": False,
            "lambda_coef": 1.0,
            "use_precomputed_features": True,
            "precomputed_root": "precomputed",
            "encoder_matching": {
                "enable": True,
                "lambda_mse": 1.0,
                "lambda_kl": 1.0,
                "weight": 1.0,
                "temperature": 2.0,
            },
            "decoder_matching": {
                "enable": True,
                "lambda_mse": 1.0,
                "lambda_cos": 1.0,
                "lambda_kl": 1.0,
                "weight": 1.0,
                "temperature": 2.0,
            },
            "attention_matching": {
                "enable": True,
                "lambda": 1.0,
                "weight": 1.0,
                "temperature": 0.5,
            },
            "relational_KD": {
                "enable": True,
                "lambda": 1.0,
                "weight": 1.0,
                "dist_factor": 1.0,
                "angle_factor": 2.0,
            },
            "dynamic_lambda": {"enable_plateau_scheduler": True, "patience": 5, "factor": 0.5},
            "encoder_patch": {"enable": True, "w_l2": 1.0, "w_cos": 1.0},
            "prompt_embed": {"enable": True, "w_mse": 0.7, "w_cos": 0.3},
            "decoder_mask_token": {"enable": True, "w_kl": 1.0, "temperature": 0.5},
            "dense_mask_logits": {"enable": True, "w_kl": 0.6, "w_focal": 0.4, "gamma": 2.0},
        },
        "teachers": [
            {
                "name": "SAM-H",
                "cfg": "configs/sam_h.yaml",
                "checkpoint": "weights/sam_vit_h_4b8939.pth",
                "weight": 0.5,
            }
        ],
        "stage_schedule": [
            {
                "name": "distill_only",
                "start_epoch": 0,
                "end_epoch": 100,
                "distillation": True,
                "lambda_coef": 1.0,
                "loss_weights": {"bce": 0, "focal": 0, "dice": 0, "iou": 0, "cls": 0},
            },
            {
                "name": "finetune_only",
                "start_epoch": 100,
                "end_epoch": 300,
                "distillation": False,
                "lambda_coef": 0.0,
                "loss_weights": {"focal": 15},
            },
        ],
        "mask_teacher": {
            "enable": True,
            "method": "replace_gt",
            "teacher_type": "vit_h",
            "checkpoint_path": "weights/sam_vit_h_4b8939.pth",
            "iou_threshold": 0.5,
            "gt_override": True,
        },
    }
    cfg = load_config(write(tmp_path, "origin.json", json.dumps(origin)))
    assert cfg.distillation.attention_matching.lambda_ == 1.0
    assert cfg.distillation.relational_KD.angle_factor == 2.0
    assert cfg.teachers[0].cfg == "configs/sam_h.yaml"
    assert cfg.stage_schedule[1].loss_weights == {"focal": 15.0}
    assert cfg.train.lr == pytest.approx(1e-5)
    # the resolved config writes `lambda` back under its file name
    assert cfg.to_dict()["distillation"]["attention_matching"]["lambda"] == 1.0


def test_origin_unused_keys_warn_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # the origin's feature-dump keys have no effect here (teachers are read from caches); the
    # origin's four blocks and dynamic_lambda are implemented and not named
    text = (
        "distillation:\n  use_precomputed_features: false\n  precomputed_root: feats\n"
        "  encoder_patch:\n    enable: true\n  dynamic_lambda:\n    patience: 2\n"
    )
    with caplog.at_level("WARNING"):
        load_config(write(tmp_path, "c.yaml", text))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "distillation.use_precomputed_features" in warnings[0]
    assert "distillation.precomputed_root" in warnings[0]
    assert "encoder_patch" not in warnings[0] and "dynamic_lambda" not in warnings[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "mask_teacher:\n  iou_treshold: 0.3\n",
            ["mask_teacher.iou_treshold", "did you mean 'mask_teacher.iou_threshold'"],
        ),
        ("datset:\n  mode: everything\n", ["'datset'", "did you mean 'dataset'"]),
        (
            "train:\n  loss_weights:\n    dice: 1\n    focall: 2\n",
            ["train.loss_weights.focall", "'train.loss_weights.focal'"],
        ),
        ("mask_teacher:\n  iou_threshold: 1.5\n", ["mask_teacher.iou_threshold", "1.5", "[0, 1]"]),
        ("mask_teacher:\n  iou_threshold: -0.1\n", ["mask_teacher.iou_threshold", "[0, 1]"]),
        ("train:\n  loss_weights:\n    dice: -1\n", ["train.loss_weights.dice", "-1", ">= 0"]),
        (
            "mask_teacher:\n  soft_loss:\n    weight: -0.5\n",
            ["mask_teacher.soft_loss.weight", ">= 0"],
        ),
        (
            "mask_teacher:\n  method: distill\n",
            ["mask_teacher.method", "'distill'", "'replace_gt'", "'dual_supervision'"],
        ),
        (
            "mask_teacher:\n  soft_loss:\n    type: l1\n",
            ["mask_teacher.soft_loss.type", "'l1'", "'l2'", "'kl'"],
        ),
        ("dataset:\n  mode: all\n", ["dataset.mode", "'single'", "'everything'"]),
        ("train:\n  epochs: many\n", ["train.epochs", "'many'", "integer"]),
        ("train:\n  bf16: 1\n", ["train.bf16", "true or false"]),
        ("train: 5\n", ["train", "mapping"]),
        (
            "stage_schedule:\n  - start_epoch: 5\n    end_epoch: 2\n",
            ["stage_schedule[0]", "end_epoch"],
        ),
        (
            "stage_schedule:\n  - loss_weights: {dise: 1}\n",
            ["stage_schedule[0].loss_weights.dise", "did you mean"],
        ),
    ],
)
def test_validation_errors_name_key_and_allowed_values(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    with pytest.raises(UserError) as info:
        load_config(write(tmp_path, "c.yaml", text))
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


def test_teacher_in_single_mode_is_the_spec_compatibility_error(tmp_path: Path) -> None:
    with pytest.raises(
        UserError, match=r'mask_teacher.enable: true needs dataset.mode: "everything"'
    ):
        load_config(write(tmp_path, "c.yaml", SPEC_REPLACE))


def test_float_strings_and_scientific_notation(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, "c.yaml", "train:\n  lr: 1e-4\n")
    )  # YAML 1.1 reads 1e-4 as a string
    assert cfg.train.lr == pytest.approx(1e-4)


def test_set_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path, "c.yaml", everything(SPEC_DUAL) + "teachers:\n  - name: a\n    type: vit_b\n"
    )
    cfg = load_config(
        path,
        [
            "train.lr=1e-4",
            "train.bf16=true",
            "mask_teacher.checkpoint_path=null",
            "mask_teacher.soft_loss.type=kl",
            "distillation.attention_matching.lambda=0.25",
            "teachers.0.weight=0.7",
            "train.resume=runs/x/last.pt",
        ],
    )
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.bf16 is True
    assert cfg.mask_teacher.checkpoint_path is None
    assert cfg.mask_teacher.soft_loss.type == "kl"
    assert cfg.distillation.attention_matching.lambda_ == 0.25
    assert cfg.teachers[0].weight == 0.7
    assert cfg.train.resume == "runs/x/last.pt"
    assert load_config(path, ["train.resume=true"]).train.resume is True


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr", "KEY=VALUE"),
        ("train.lrr=1", "did you mean 'train.lr'"),
        ("teachers.3.weight=1", "index"),
        ("mask_teacher.iou_threshold=2", "[0, 1]"),
    ],
)
def test_bad_overrides(tmp_path: Path, override: str, expected: str) -> None:
    path = write(tmp_path, "c.yaml", "teachers:\n  - name: a\n")
    with pytest.raises(UserError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        load_config(path, [override])


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match=r"\.yaml, \.yml or \.json"):
        load_config(write(tmp_path, "c.toml", "a = 1"))
    with pytest.raises(UserError, match="not valid JSON"):
        load_config(write(tmp_path, "c.json", "{bad json"))
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(write(tmp_path, "c.yaml", "a: [1, 2\n"))
    with pytest.raises(UserError, match="top level must be a mapping"):
        load_config(write(tmp_path, "c.yaml", "- 1\n- 2\n"))


def test_duplicate_teacher_names_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="repeated: a"):
        load_config(write(tmp_path, "c.yaml", "teachers:\n  - name: a\n  - name: a\n"))


def test_resolve_teacher_type_reads_cfg_yaml(tmp_path: Path) -> None:
    from maskteacher.config import TeacherEntry, resolve_teacher_type, teacher_weights

    cfg_file = write(tmp_path, "sam_h.yaml", "model:\n  name: SAM-H\n  type: vit_h\n")
    assert resolve_teacher_type(TeacherEntry(name="t", cfg=str(cfg_file))) == "vit_h"
    assert resolve_teacher_type(TeacherEntry(name="t", type="vit_b", cfg=str(cfg_file))) == "vit_b"
    with pytest.raises(UserError, match="not found"):
        resolve_teacher_type(TeacherEntry(name="t", cfg=str(tmp_path / "nope.yaml")))
    assert teacher_weights([TeacherEntry(), TeacherEntry(weight=0.2)]) == [0.5, 0.2]


def test_resolved_config_saves_and_reloads(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "c.yaml", everything(SPEC_DUAL)), ["train.epochs=7"])
    for name in ("resolved.yaml", "resolved.json"):
        cfg.save(tmp_path / name)
        assert load_config(tmp_path / name) == cfg


def test_cli_check_prints_resolved_config_and_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = write(tmp_path, "c.yaml", everything(SPEC_DUAL))
    assert main(["config", "check", str(path), "--set", "train.epochs=3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train"]["epochs"] == 3
    assert out["mask_teacher"]["soft_loss"] == {"type": "l2", "weight": 0.5}

    assert main(["config", "check", str(path), "--set", "mask_teacher.method=bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "mask_teacher.method" in err and "replace_gt" in err


def test_reference_lists_every_key() -> None:
    text = reference_markdown()
    for key in (
        "`mask_teacher.soft_loss.type`",
        "`dataset.grid_points`",
        "`distillation.attention_matching.lambda`",
        "`teachers[].cache_path`",
        "`precompute.store.embedding`",
        "`stage_schedule[].loss_weights`",
    ):
        assert key in text
    assert "accepted, not used" in text
