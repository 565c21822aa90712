"""Binding: every shipped config becomes a run plan without touching a file, the plan is what the
config says, and config-level mistakes are one UserError line at bind time."""

from __future__ import annotations

import contextlib
import functools
import json
import operator
import os
import sys
from pathlib import Path

import pytest
import yaml

from maskteacher.config import TeacherEntry, load_config
from maskteacher.errors import UserError
from maskteacher.models.everything import GenerationParams
from maskteacher.train import builders
from maskteacher.train.data.online_teacher import MASK_FIELDS
from maskteacher.train.data.teacher_cache import TeacherIdentity
from maskteacher.train.distill.blocks import EncoderMatching
from maskteacher.train.distill.prompt_blocks import (
    DecoderMaskToken,
    DenseMaskLogits,
    EncoderPatch,
    PromptEmbed,
)
from maskteacher.train.plan import KDTeacherSpec
from maskteacher.train.schedule import LambdaPlateau, Stage
from maskteacher.train.supervision.gt import GTSupervision, SingleSupervision
from maskteacher.train.supervision.mask_teacher import DualSupervision, ReplaceGTSupervision

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = sorted(p for p in CONFIG_DIR.iterdir() if p.suffix in (".yaml", ".yml", ".json"))

# ----------------------------------------------------------------------- no file is touched

#: Audit events of file access (https://docs.python.org/3/library/audit_events.html).
FILE_EVENTS = frozenset(
    {
        "open", "os.listdir", "os.scandir", "os.mkdir", "os.remove", "os.rmdir", "os.rename",
        "os.truncate", "os.chmod", "os.utime", "os.link", "os.symlink", "glob.glob",
        "shutil.copyfile", "shutil.rmtree",
    }
)  # fmt: skip
_ACCESSES: list[list] = []  # the open recorders; empty: the hook is inert


def _audit(event: str, args: tuple) -> None:
    if _ACCESSES and event in FILE_EVENTS:
        _ACCESSES[-1].append((event, args[0] if args else None))


@functools.cache
def _install_audit_hook() -> None:
    sys.addaudithook(_audit)  # cannot be removed; inert outside no_file_access()


@contextlib.contextmanager
def no_file_access(monkeypatch):
    """Fail if the block opens, lists, writes or stats a file (os.stat is what every existence
    check -- Path.is_file, os.path.exists -- ends in; audit events catch the rest)."""
    _install_audit_hook()

    def refuse_stat(path, *args, **kwargs):
        raise AssertionError(f"stat of {path} while binding")

    accesses: list = []
    _ACCESSES.append(accesses)
    with monkeypatch.context() as m:
        m.setattr(os, "stat", refuse_stat)
        try:
            yield
        finally:
            _ACCESSES.pop()
            if accesses:  # also when the block raised: touching a file is the first failure
                raise AssertionError(f"file access while binding: {accesses}")


def named_paths(cfg) -> list[str]:
    """Every file or folder a config names."""
    paths = [
        cfg.dataset.train_dataset,
        cfg.dataset.val_dataset,
        cfg.dataset.image_root,
        cfg.model.checkpoint_path,
        cfg.mask_teacher.checkpoint_path,
        cfg.mask_teacher.cache_path,
        *(p for t in cfg.teachers for p in (t.checkpoint, t.cache_path, t.cfg)),
    ]
    return [p for p in paths if p]


def bind_offline(path, monkeypatch, overrides=()):
    """Bind the config at ``path`` in an empty folder (its relative paths lead nowhere) without
    touching a file; returns (config, plan)."""
    cfg = load_config(path, overrides)
    missing = named_paths(cfg)
    assert missing and not any(Path(p).exists() for p in missing), missing
    with no_file_access(monkeypatch):
        plan = builders.bind(cfg)
    return cfg, plan


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert list(tmp_path.iterdir()) == []  # nothing was written either


# ---------------------------------------------------------------------- the shipped configs

LOSS_KEYS = ("bce", "focal", "dice", "iou", "cls")
ORIGIN_BLOCKS = [
    EncoderPatch(w_l2=1.0, w_cos=1.0, weight=1.0),
    PromptEmbed(w_mse=0.7, w_cos=0.3, weight=1.0),
    DecoderMaskToken(w_kl=1.0, temperature=0.5, weight=1.0),
    DenseMaskLogits(w_kl=0.6, w_focal=0.4, gamma=2.0, weight=1.0),
]


def origin_identity(name: str, kind: str, index: int = 0) -> TeacherIdentity:
    """What the origin example's teacher cache must have been made with."""
    checkpoint = {
        "sam_h": "./weights/sam_vit_h_4b8939.pth",
        "mobile_sam": "./weights/mobile_sam.pt",
    }
    return TeacherIdentity(
        where=f"teachers[{index}].cache_path", teacher_type=kind, type_key=f"teachers[{index}].type",
        checkpoint=checkpoint[name], checkpoint_key=f"teachers[{index}].checkpoint",
        image_size=1024, generation=GenerationParams(),
    )  # fmt: skip


# file -> (strategy class, teacher fields, online teacher, kd blocks, further plan values)
EXPECTED = {
    "mobilesam_single.json": (
        SingleSupervision,
        set(),
        False,
        [],
        {"settings.image_size": 1024, "visual.every": 1, "visual.iou_threshold": 0.5},
    ),
    "origin_distill_then_finetune.json": (
        SingleSupervision,
        set(),  # each teacher is read from its own cache
        False,
        ORIGIN_BLOCKS,
        {
            "kd_teachers": [
                KDTeacherSpec(
                    "sam_h",
                    0.7,
                    "./caches/sam_h",
                    origin_identity("sam_h", "vit_h"),
                    "./weights/sam_vit_h_4b8939.pth",
                    "teachers[0].checkpoint",
                ),
                KDTeacherSpec(
                    "mobile_sam",
                    0.3,
                    "./caches/mobile_sam",
                    origin_identity("mobile_sam", "vit_t", 1),
                    "./weights/mobile_sam.pt",
                    "teachers[1].checkpoint",
                ),
            ],
            "epochs.distillation": False,
            "epochs.stages": (
                Stage("distill_only", 0, 100, dict.fromkeys(LOSS_KEYS, 0.0), True, None),
                Stage("finetune", 100, 200, {}, False, None),
            ),
            "lambda_plateau": None,
            "prompts.settings.mode": "mixed",
        },
    ),  # fmt: skip
    "origin_mobilesam_distill.json": (
        SingleSupervision,
        set(),
        False,
        ORIGIN_BLOCKS,
        {
            "epochs.distillation": True,
            "lambda_plateau": LambdaPlateau(patience=5, factor=0.5),
            "data.val.path": "./datasets/val",
        },
    ),
    "sam_h_to_mobilesam_dual_kl.json": (
        DualSupervision,
        {"logits", "embedding"},
        False,
        [EncoderMatching(lambda_mse=1.0, lambda_kl=1.0, temperature=2.0, weight=1.0)],
        {
            "strategy.soft_type": "kl",
            "strategy.soft_weight": 0.3,
            "strategy.iou_threshold": 0.3,
            "kd_teachers": [
                KDTeacherSpec("mask_teacher", 1.0, checkpoint="./weights/sam_vit_h_4b8939.pth")
            ],
            "data.cache_path": "./caches/sam_h_coco",
            "settings.loop.bf16": True,
        },
    ),
    "sam_h_to_mobilesam_replace_gt.yaml": (
        ReplaceGTSupervision,
        {"logits"},
        False,
        [],
        {
            "strategy.iou_threshold": 0.5,
            "strategy.gt_override": True,
            "strategy.student.match.iou_threshold": 0.3,  # train.match_iou_threshold
            "epochs.freeze.prompt_encoder": True,
            "prompts.source": "grid",
            "prompts.max_prompts": 64,
        },
    ),
    "sample_tiny.yaml": (
        DualSupervision,
        {"logits"},
        False,
        [],
        {
            "strategy.soft_type": "l2",
            "strategy.soft_weight": 0.5,
            "data.cache_path": "runs/teacher_cache",
            "data.image_size": 128,
            "settings.model_type": "vit_t_tiny",
        },
    ),
}


def test_every_shipped_config_is_listed():
    assert sorted(EXPECTED) == [p.name for p in CONFIGS]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_config_binds_to_what_it_says(name, empty_cwd, monkeypatch):
    strategy, fields, online, blocks, values = EXPECTED[name]
    cfg, plan = bind_offline(CONFIG_DIR / name, monkeypatch)
    assert type(plan.strategy) is strategy
    assert plan.teacher_fields == fields
    assert (plan.online is not None) == online
    assert plan.kd_blocks == blocks
    for attribute, value in values.items():
        assert operator.attrgetter(attribute)(plan) == value, attribute
    # the cache a mask-teacher strategy reads is checked against the mask_teacher block
    identity = plan.data.identity
    if plan.strategy.teacher_fields and cfg.mask_teacher.cache_path:
        assert identity.teacher_type == cfg.mask_teacher.teacher_type
        assert identity.checkpoint == cfg.mask_teacher.checkpoint_path
        assert identity.generation == GenerationParams.from_config(cfg.precompute)
    else:
        assert identity is None
    assert plan.settings.save_dir == Path(cfg.model.save_path)
    assert plan.config == cfg.to_dict() and yaml.safe_load(plan.config_text) == cfg.to_dict()


# ------------------------------------------------------------- teacher source decided at bind

SAMPLE = CONFIG_DIR / "sample_tiny.yaml"
DUAL_KL = CONFIG_DIR / "sam_h_to_mobilesam_dual_kl.json"


def test_without_the_mask_teacher_nothing_is_needed(empty_cwd, monkeypatch):
    # GT-only training from sample_tiny.yaml
    _, plan = bind_offline(
        SAMPLE, monkeypatch, ["mask_teacher.enable=false", "mask_teacher.cache_path=null"]
    )
    assert type(plan.strategy) is GTSupervision
    assert plan.teacher_fields == frozenset() and plan.online is None
    assert plan.data.cache_path is None and plan.data.identity is None


def test_no_cache_runs_the_teacher_online(empty_cwd, monkeypatch):
    cfg, plan = bind_offline(SAMPLE, monkeypatch, ["mask_teacher.cache_path=null"])
    online = plan.online
    assert online.teacher_type == "vit_t_tiny"
    assert online.checkpoint == "maskteacher/demo/teacher/teacher.pth"
    assert online.provides == MASK_FIELDS and online.prompts is None
    assert online.generation == GenerationParams.from_config(cfg.precompute).generator_kwargs()
    assert online.logit_clip == cfg.precompute.clip  # int8: clipped like the codec
    assert plan.data.cache_path is None and plan.data.identity is None
    # teacher prompts: made by the online teacher after it ran, not by the dataset
    _, plan = bind_offline(
        SAMPLE, monkeypatch, ["mask_teacher.cache_path=null", "train.prompt_source=teacher_grid"]
    )
    assert plan.teacher_fields == {"logits", "points"}
    assert plan.prompts.defer_teacher_points and plan.online.prompts is not None
    # fp16: nothing to clip; distillation's embedding comes from the online teacher too
    _, plan = bind_offline(
        DUAL_KL, monkeypatch, ["mask_teacher.cache_path=null", "precompute.codec=fp16"]
    )
    assert plan.teacher_fields == {"logits", "embedding"}
    assert plan.online.provides == MASK_FIELDS | {"embedding"}
    assert plan.online.logit_clip is None


# ------------------------------------------------------------------------------ bind errors


@pytest.mark.parametrize(
    "path, overrides, needle",
    [
        (
            SAMPLE,
            ["mask_teacher.cache_path=null", "mask_teacher.checkpoint_path=null"],
            "mask_teacher.cache_path is not set and neither is mask_teacher.checkpoint_path",
        ),
        (DUAL_KL, ["train.hflip=true"], "train.hflip: true cannot be combined"),
        (SAMPLE, ["dataset.mode=single"], 'needs dataset.mode: "everything"'),
        (
            SAMPLE,
            ["visual.status=true", "dataset.val_dataset=null"],
            "visual.status is true but dataset.val_dataset is not set",
        ),
    ],
)
def test_bind_errors_are_one_line(path, overrides, needle, empty_cwd, monkeypatch):
    with pytest.raises(UserError) as info:
        bind_offline(path, monkeypatch, overrides)
    message = str(info.value)
    assert "\n" not in message and needle in message, message


def test_distillation_teacher_without_cache_is_one_line(empty_cwd, monkeypatch):
    cfg = load_config(DUAL_KL)
    cfg.teachers = [TeacherEntry(name="x", type="vit_h")]
    with no_file_access(monkeypatch), pytest.raises(UserError) as info:
        builders.bind(cfg)
    message = str(info.value)
    assert "\n" not in message and "teachers 'x': cache_path is not set" in message


# --------------------------------------------------------------- no silent no-op runs (bind)


def _origin(**sections) -> dict:
    """An origin-style single-mode config with two cached teachers (paths lead nowhere)."""
    blocks = ("encoder_patch", "prompt_embed", "decoder_mask_token", "dense_mask_logits")
    data = {
        "dataset": {"train_dataset": "data/train", "val_dataset": "data/val", "mode": "single"},
        "model": {"type": "vit_t", "image_size": 1024},
        "train": {"epochs": 4},
        "distillation": {"enable": False, **{b: {"enable": True} for b in blocks}},
        "teachers": [
            {"name": "sam_h", "type": "vit_h", "weight": 0.7, "cache_path": "c/sam_h"},
            {"name": "mobile_sam", "type": "vit_t", "weight": 0.3, "cache_path": "c/mobile_sam"},
        ],
        "stage_schedule": [
            {"name": "distill_only", "start_epoch": 0, "end_epoch": 2, "distillation": True,
             "loss_weights": {"bce": 0, "focal": 0, "dice": 0, "iou": 0, "cls": 0}},
            {"name": "finetune", "start_epoch": 2, "distillation": False},
        ],
    }  # fmt: skip
    for key, value in sections.items():
        section, _, name = key.partition("__")
        if name:
            data[section][name] = value
        else:
            data[section] = value
    return data


def _bind(tmp_path, monkeypatch, data: dict):
    path = tmp_path / "origin.json"
    path.write_text(json.dumps(data))
    cfg = load_config(path)
    with no_file_access(monkeypatch):
        return builders.bind(cfg)


def test_origin_distill_then_finetune_binds(tmp_path, monkeypatch):
    plan = _bind(tmp_path, monkeypatch, _origin())
    assert [b.term for b in plan.kd_blocks] == [
        "encoder_patch", "prompt_embed", "decoder_mask_token", "dense_mask_logits"
    ]  # fmt: skip
    assert [(t.name, t.weight) for t in plan.kd_teachers] == [("sam_h", 0.7), ("mobile_sam", 0.3)]
    assert plan.epochs.at(0).distillation and not plan.epochs.at(2).distillation
    assert plan.lambda_plateau is None and plan.online is None


@pytest.mark.parametrize(
    "sections, needles",
    [
        (  # the origin's case: the blocks off, the distill-only stage trains nothing
            {"distillation": {"enable": False}},
            ["stage_schedule[0] 'distill_only', epochs 0-2", "no distillation block is enabled"],
        ),
        (  # the blocks on but lambda_coef 0 in the stage
            {
                "stage_schedule": [
                    {
                        "name": "kd",
                        "start_epoch": 1,
                        "end_epoch": 3,
                        "distillation": True,
                        "lambda_coef": 0.0,
                        "loss_weights": dict.fromkeys(["bce", "focal", "dice", "iou"], 0.0),
                    }
                ]
            },  # noqa: E501
            ["stage_schedule[0] 'kd', epochs 1-3", "lambda_coef is 0"],
        ),  # fmt: skip
        (  # every teacher weighs 0
            {"teachers": [{"name": "t", "type": "vit_t", "weight": 0.0, "cache_path": "c/t"}]},
            ["stage_schedule[0] 'distill_only', epochs 0-2", "distillation is off"],
        ),
        (  # no stage: every task weight 0 and distillation off
            {
                "stage_schedule": [],
                "train__loss_weights": {"bce": 0, "focal": 0, "dice": 0, "iou": 0},
            },
            ["train.loss_weights (no stage), epochs 0-4", "bce, focal, dice, iou are 0"],
        ),
        (
            {
                "distillation__dynamic_lambda": {"enable_plateau_scheduler": True},
                "dataset__val_dataset": None,
            },
            [
                "distillation.dynamic_lambda.enable_plateau_scheduler",
                "dataset.val_dataset is not set",
            ],
        ),  # fmt: skip
        (
            {"train__checkpoint_decoder": True},
            ["train.checkpoint_decoder: true cannot be combined", "prompt_embed"],
        ),
        (
            {"teachers": [{"name": "hq", "type": "vit_h_hq", "cache_path": "c/hq"}]},
            ["dense_mask_logits cannot use the SAM-HQ teacher teachers[0].type = vit_h_hq"],
        ),
    ],
)
def test_silent_or_impossible_runs_are_refused_at_bind(sections, needles, tmp_path, monkeypatch):
    data = _origin(**sections)
    if "distillation" in sections:  # keep the blocks' sections, switch only what is given
        data["distillation"] = {**_origin()["distillation"], **sections["distillation"]}
        data["distillation"].update({k: {"enable": False} for k in list(data["distillation"])
                                     if k.endswith(("patch", "embed", "token", "logits"))})  # fmt: skip
    with pytest.raises(UserError) as info:
        _bind(tmp_path, monkeypatch, data)
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in needles), message


def test_dynamic_lambda_without_any_block_is_refused(tmp_path, monkeypatch):
    data = _origin(stage_schedule=[])
    data["distillation"] = {"dynamic_lambda": {"enable_plateau_scheduler": True}}
    with pytest.raises(UserError, match="no distillation block ever runs"):
        _bind(tmp_path, monkeypatch, data)


def test_a_soft_loss_alone_is_a_loss(tmp_path, monkeypatch):
    # dual_supervision's soft term has its own weight: zero task weights still train something
    data = _origin(stage_schedule=[], teachers=[], distillation={"enable": False})
    data["dataset"]["mode"] = "everything"
    data["train"]["loss_weights"] = dict.fromkeys(["bce", "focal", "dice", "iou", "cls"], 0.0)
    data["mask_teacher"] = {"enable": True, "method": "dual_supervision", "cache_path": "c/m"}
    assert _bind(tmp_path, monkeypatch, data).strategy.soft_weight == 0.5
