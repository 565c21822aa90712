"""End to end on sample data: learning, resume, logs, checkpoints, export, single mode, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from train_helpers import IMAGE_SIZE, make_data, tiny_config, write_cache

from maskteacher.cli import main as cli_main
from maskteacher.errors import UserError
from maskteacher.train.run import train


def test_overfit_matched_iou_rises(sample_data, tmp_path):
    """40 optimizer steps on 2 images take the matched IoU from ~0.03 to > 0.2 (seed fixed).

    Random-init students first collapse toward empty masks; gt prompts with point-eligible
    matching, no focal term and BatchNorm in train mode (no pretrained statistics) escape it.
    """
    cfg, _ = tiny_config(
        tmp_path,
        sample_data,
        train={
            "epochs": 40,
            "lr": 2.0e-3,
            "min_lr_ratio": 1.0,
            "warmup_step": 2,
            "max_prompts": 16,
            "prompt_source": "gt",
            "match_iou_threshold": 0.0,
            "match_requires_point": True,
            "grad_clip": None,
            "encoder_lr_scale": 1.0,
            "weight_decay": 0.0,
            "log_every": 100,
            "loss_weights": {"focal": 0.0},
        },
        freeze={"batchnorm_eval": False},
    )
    result = train(cfg)
    iou = np.nan_to_num(np.array(result.matched_iou))
    assert len(iou) == 40
    assert iou[:3].mean() < 0.08
    assert iou[-5:].mean() > 0.2, iou.round(3).tolist()
    assert result.losses[-1] < 0.8 * result.losses[0]


def _resume_cfg(tmp_path, sample_data, name, **train):
    return tiny_config(
        tmp_path,
        sample_data,
        name=name,
        train={
            "epochs": 3,
            "batch_size": 1,
            "hflip": True,
            "prompt_source": "mixed",
            "loss_points": 32,
            "checkpoint_every": 1,
            "match_iou_threshold": 0.0,
            "seed": 3,
            **train,
        },
        model={"save_path": str(tmp_path / name.replace(".yaml", ""))},
    )[0]


def test_resume_continues_bit_identically(sample_data, tmp_path):
    """Stopped mid-epoch and resumed (with another worker count), the losses equal one run's."""
    full = train(_resume_cfg(tmp_path, sample_data, "a.yaml"))
    assert len(full.losses) == 6
    first = train(_resume_cfg(tmp_path, sample_data, "b.yaml"), stop_after_steps=3)
    assert len(first.losses) == 3
    ckpt = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert ckpt["progress"]["epoch"] == 1 and ckpt["progress"]["batches_done"] == 1
    resumed_cfg = _resume_cfg(tmp_path, sample_data, "b.yaml", resume=True)
    resumed_cfg.dataset.num_workers = 1
    second = train(resumed_cfg)
    assert first.losses + second.losses == full.losses  # exact, not approximate
    final_a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    final_b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_logs_checkpoints_config_and_early_stop(sample_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, _ = tiny_config(
        tmp_path,
        {"train": sample_data["train"], "val": sample_data["val"]},
        dataset={"val_dataset": str(sample_data["val"])},
        train={
            "epochs": 3,
            "lr": 1.0e-9,
            "early_stop_patience": 1,
            "gradient_accumulation": 2,
            "batch_size": 1,
        },
    )
    result = train(cfg)
    run = tmp_path / "run"
    assert (
        (run / "config.yaml").is_file()
        and (run / "last.pt").is_file()
        and (run / "best.pt").is_file()
    )
    assert (run / "student_official.pth").is_file()
    # with a negligible lr the score cannot improve after epoch 0: patience 1 stops after epoch 1
    assert result.stopped_early and result.epochs_done == 2
    assert [e for e, _ in result.val_scores] == [0, 1]
    assert 0.0 <= result.best_metric <= 1.0
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["progress"]["best_epoch"] == 0
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["progress"]["step"] == 2  # 2 micro-batches per optimizer step, 2 epochs
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {
        "train/task_loss", "train/bce", "train/focal", "train/dice", "train/iou", "train/cls",
        "train/lr", "train/matched_per_image", "time/data_wait", "time/step", "val/best_match_iou",
    }  # fmt: skip
    assert expected <= tags, expected - tags
    assert all(math.isfinite(e.value) for e in acc.Scalars("train/task_loss"))
    from maskteacher.config import load_config

    assert load_config(run / "config.yaml").train.early_stop_patience == 1


def test_cache_training_and_resume_with_other_cache(sample_data, tmp_path):
    cache = write_cache(tmp_path / "cache", {"train": sample_data["train"]}, teacher=True)
    cfg, _ = tiny_config(
        tmp_path,
        sample_data,
        dataset={"val_dataset": str(sample_data["val"])},  # cache has no val split: reader GT
        train={"prompt_source": "teacher", "epochs": 1},
        mask_teacher={"cache_path": str(cache)},
    )
    result = train(cfg)
    assert len(result.losses) == 1 and math.isfinite(result.losses[0]) and result.val_scores
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["cache_id"].startswith("sha256:")
    other = write_cache(
        tmp_path / "cache2", {"train": sample_data["train"]}, teacher=True, codec="fp16"
    )
    cfg.mask_teacher.cache_path = str(other)
    cfg.train.resume = True
    cfg.train.epochs = 2
    with pytest.raises(UserError, match="teacher cache"):
        train(cfg)


@pytest.mark.parametrize("prompt_mode", ["points", "mixed"])
def test_single_mode_end_to_end(sample_data, tmp_path, prompt_mode):
    cfg, _ = tiny_config(
        tmp_path,
        sample_data,
        dataset={"mode": "single", "prompt_mode": prompt_mode, "min_points": 1, "max_points": 3},
        model={"multimask_output": prompt_mode == "mixed"},
        train={"epochs": 2, "hflip": True},
    )
    result = train(cfg)
    assert len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses)
    # every prompt is paired with the object it was drawn from
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["progress"]["step"] == 2
    assert (tmp_path / "run" / "last.pt").is_file()


def test_export_loads_into_segment_anything_classes(sample_data, tmp_path):
    cfg, _ = tiny_config(tmp_path, sample_data, model={"type": "vit_b_tiny"})
    train(cfg)
    state = torch.load(tmp_path / "run" / "student_official.pth", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    from functools import partial

    grid = IMAGE_SIZE // 16
    official = Sam(  # the vit_b_tiny hyper-parameters, spelled out with segment-anything's classes
        image_encoder=ImageEncoderViT(
            img_size=IMAGE_SIZE, patch_size=16, depth=2, embed_dim=64, num_heads=2, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=(1,), window_size=4, out_chans=64,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=64, image_embedding_size=(grid, grid),
            input_image_size=(IMAGE_SIZE, IMAGE_SIZE), mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=64, mlp_dim=128, num_heads=2),
            transformer_dim=64, iou_head_depth=3, iou_head_hidden_dim=64,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()  # fmt: skip
    official.load_state_dict(state, strict=True)
    trained = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(state[k], trained[k]) for k in trained)


# ------------------------------------------------------------------------------ bad input


def _cli(path) -> int:
    return cli_main(["train", str(path)])


def test_empty_dataset_is_one_line(tmp_path, capsys, sample_data):
    empty = tmp_path / "empty"
    (empty / "image").mkdir(parents=True)
    (empty / "mask").mkdir()
    _, path = tiny_config(tmp_path, {"train": empty}, load=False)
    assert _cli(path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no usable images" in err[0]


# The run reads the teacher's prompt points from these caches, so it needs them (a cache that only
# replaces the dataset's ground truth is skipped when unusable: test_train_hardening.py).
TEACHER_PROMPTS = {"prompt_source": "teacher"}


def test_wrong_cache_for_image_size_is_one_line(tmp_path, capsys, sample_data):
    cache = write_cache(
        tmp_path / "cache", {"train": sample_data["train"]}, image_size=128, teacher=True
    )
    _, path = tiny_config(
        tmp_path, sample_data, train=TEACHER_PROMPTS, mask_teacher={"cache_path": str(cache)}
    )
    assert _cli(path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image_size 128" in err[0]


def test_wrong_cache_for_dataset_is_one_line(tmp_path, capsys, sample_data):
    other = make_data(tmp_path / "other", images=2, seed=9)
    cache = write_cache(tmp_path / "cache", {"train": other}, teacher=True)
    _, path = tiny_config(
        tmp_path, sample_data, train=TEACHER_PROMPTS, mask_teacher={"cache_path": str(cache)}
    )
    assert _cli(path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fingerprint" in err[0]


def test_teacher_supervision_in_single_mode_is_one_line(tmp_path, capsys, sample_data):
    _, path = tiny_config(
        tmp_path,
        sample_data,
        load=False,
        dataset={"mode": "single"},
        mask_teacher={"enable": True, "method": "dual_supervision"},
    )
    assert _cli(path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'needs dataset.mode: "everything"' in err[0]


def test_teacher_prompts_without_cache_and_missing_resume_file(tmp_path, capsys, sample_data):
    _, path = tiny_config(tmp_path, sample_data, train={"prompt_source": "teacher"})
    assert _cli(path) == 2
    assert "mask_teacher.cache_path is not set" in capsys.readouterr().err
    _, path = tiny_config(tmp_path, sample_data, train={"resume": str(tmp_path / "nope.pt")})
    assert _cli(path) == 2
    assert "checkpoint to resume from not found" in capsys.readouterr().err


def test_freeze_until_unfreeze_epoch_and_bf16(sample_data, tmp_path):
    """The frozen encoder keeps its weights through epoch 0 and trains from unfreeze_epoch 1."""
    cfg, _ = tiny_config(
        tmp_path,
        sample_data,
        model={"type": "vit_b_tiny"},
        train={"epochs": 2, "bf16": True, "match_iou_threshold": 0.0},
        freeze={"freeze_image_encoder": True, "unfreeze_epoch": 1},
    )
    torch.manual_seed(cfg.train.seed)
    from maskteacher.models import build_sam

    initial = build_sam("vit_b_tiny", image_size=IMAGE_SIZE).state_dict()
    first = train(cfg, stop_after_steps=1)  # stops as epoch 1 begins
    after0 = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    enc = [k for k in initial if k.startswith("image_encoder.")]
    dec = [k for k in initial if k.startswith("mask_decoder.") and initial[k].is_floating_point()]
    assert all(torch.equal(after0[k], initial[k]) for k in enc)
    assert any(not torch.equal(after0[k], initial[k]) for k in dec)
    cfg.train.resume = True
    second = train(cfg)
    final = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    assert any(not torch.equal(final[k], initial[k]) for k in enc)
    assert all(math.isfinite(v) for v in first.losses + second.losses)
