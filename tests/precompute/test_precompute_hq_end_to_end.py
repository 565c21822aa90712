"""SAM-HQ as the users' spec uses it, end to end through the CLI on sample data: a checkpoint
saved by segment-anything-hq's own builder (the light vit_tiny HQ-SAM), the spec's block with
``teacher_type: vit_t`` and default strict loading -> ``maskteacher precompute`` -> ``cache
inspect`` names the HQ teacher, ``cache view`` draws it -> ``maskteacher train`` with
dual_supervision kl from that cache -> ``maskteacher eval``; and the online HQ teacher."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import yaml
from precompute_helpers import GEN, LOGIT_SCALE, scale_mask_logits

from maskteacher.cache_format import open_cache
from maskteacher.cli import main
from maskteacher.models import build_sam

IMAGE_SIZE = 64

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def package_vit_tiny_checkpoint(path):
    """segment-anything-hq's ``sam_model_registry['vit_tiny']`` (random weights, mask heads
    scaled so the random teacher's logits are SAM-like), saved as its flat state dict."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from segment_anything_hq import sam_model_registry
    torch.manual_seed(0)
    model = scale_mask_logits(sam_model_registry["vit_tiny"](), LOGIT_SCALE)
    torch.save(model.state_dict(), path)
    return path


def tensorboard_scalars(run) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sample_root, val_root):
    root = tmp_path_factory.mktemp("hq_e2e")
    teacher = package_vit_tiny_checkpoint(root / "sam_hq_vit_tiny.pth")
    torch.manual_seed(1)
    student = scale_mask_logits(build_sam("vit_t_tiny", image_size=IMAGE_SIZE), LOGIT_SCALE)
    torch.save(student.state_dict(), root / "student.pt")
    config = {
        "dataset": {
            "train_dataset": str(sample_root),
            "val_dataset": str(val_root),
            "format": "folder",
            "mode": "everything",
            "grid_points": 4,
            "num_workers": 0,
        },
        "model": {
            "type": "vit_t_tiny",
            "image_size": IMAGE_SIZE,
            "checkpoint_path": str(root / "student.pt"),
            "save_path": str(root / "run"),
        },
        "train": {
            "epochs": 1,
            "batch_size": 2,
            "lr": 1.0e-3,
            "warmup_step": 1,
            "max_prompts": 8,
            "device": "cpu",
            "seed": 0,
            "log_every": 1,
        },
        # the spec's block: a SAM type, a SAM-HQ file, no strict key
        "mask_teacher": {
            "enable": True,
            "method": "dual_supervision",
            "teacher_type": "vit_t",
            "checkpoint_path": str(teacher),
            "iou_threshold": 0.1,
            "soft_loss": {"type": "kl", "weight": 0.3},
            "cache_path": str(root / "cache"),
        },
        "precompute": {
            **GEN,
            "pred_iou_thresh": 0.0,  # the random light HQ-SAM predicts IoUs of 0.05 - 0.12
            "max_masks_per_image": 16,
            "shard_size": 4,
            "batch_size": 2,
            "num_workers": 0,
            "device": "cpu",
        },
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return root, path


def test_spec_block_sam_hq_teacher_precompute_train_eval(setup, capsys):
    root, config = setup
    assert main(["precompute", str(config), "--no-progress"]) == 0
    capsys.readouterr()

    assert main(["cache", "inspect", str(root / "cache")]) == 0
    assert "teacher     vit_t_hq (checkpoint sha256" in capsys.readouterr().out
    reader = open_cache(str(root / "cache"))
    masks = {(reader[i].split, reader[i].image_id): reader[i].num_masks for i in range(len(reader))}
    assert len(masks) == 9 and min(masks.values()) > 0  # train (6) + val (3)
    view = ["cache", "view", str(root / "cache"), reader[0].image_id, "--split", reader[0].split]
    assert main([*view, "--out", str(root / "v.png")]) == 0
    assert (root / "v.png").stat().st_size > 0

    # the spec's block trains from the SAM-HQ cache unchanged: the trainer builds the same type
    # from the same file (vit_t + a SAM-HQ file = vit_t_hq); another backbone is refused by name
    other = ["--set", "mask_teacher.teacher_type=vit_b", "--set", f"model.save_path={root}/b"]
    assert main(["train", str(config), *other]) == 2
    assert "teacher_type 'vit_t_hq'" in capsys.readouterr().err
    assert main(["train", str(config)]) == 0
    scalars = tensorboard_scalars(root / "run")
    assert scalars["train/teacher_pairs"][0] > 0 and math.isfinite(scalars["train/soft"][0])

    out = root / "eval"
    args = ["eval", str(config), "--checkpoint", str(root / "run" / "last.pt"), "--out", str(out)]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 3 and metrics["teacher_agreement"] is not None

    # eval also runs the SAM-HQ teacher itself (model.type names it; the file loads strictly)
    teacher = ["--checkpoint", str(root / "sam_hq_vit_tiny.pth"), "--out", str(root / "eval_t")]
    assert main(["eval", str(config), *teacher, "--set", "model.type=vit_t_hq"]) == 0
    metrics = json.loads((root / "eval_t" / "metrics.json").read_text())
    # ~0.78, not 1: this random teacher's logits reach +-1000, the cache keeps them clipped to
    # +-12 (int8), and bilinear upsampling of clipped logits moves the mask boundaries
    assert metrics["model_type"] == "vit_t_hq" and metrics["teacher_agreement"] > 0.6


def test_online_sam_hq_teacher_from_the_spec_block(setup):
    """No cache: the trainer builds the teacher from the spec's block (detected as vit_t_hq)."""
    root, config = setup
    online = ["--set", "mask_teacher.cache_path=null", "--set", f"model.save_path={root}/online"]
    assert main(["train", str(config), *online]) == 0
    scalars = tensorboard_scalars(root / "online")
    assert scalars["train/teacher_pairs"][0] > 0 and math.isfinite(scalars["train/soft"][0])
