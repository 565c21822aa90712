"""Helpers for the precompute tests: tiny teachers, configs, cache content (fixtures: conftest)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch
import yaml

from maskteacher.cache_format import open_cache
from maskteacher.data import to_model_input
from maskteacher.models import build_sam
from maskteacher.models.everything import generate_everything, lowres_to_masks

IMAGE_SIZE = 128
TEACHER = "vit_b_tiny"
# Logit scale of the test teachers' mask head: random weights give logits of ~0.03, where every
# stability score is 0; x1000 gives SAM-like logits of a few units.
LOGIT_SCALE = 1000.0


@contextlib.contextmanager
def one_thread():
    """torch on one CPU thread: on shared cores, 2-thread OpenMP barriers slow down up to 10x
    whenever another process takes a core; one thread keeps these tests' time predictable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def scale_mask_logits(model: torch.nn.Module, factor: float) -> torch.nn.Module:
    """Multiply the mask logits of a SAM or SAM-HQ model by ``factor`` (last hypernetwork layers,
    the HQ token's ``hf_mlp`` too)."""
    decoder = model.mask_decoder
    mlps = list(decoder.output_hypernetworks_mlps)
    if hasattr(decoder, "hf_mlp"):
        mlps.append(decoder.hf_mlp)
    with torch.no_grad():
        for mlp in mlps:
            mlp.layers[-1].weight.mul_(factor)
            mlp.layers[-1].bias.mul_(factor)
    return model


def make_teacher(seed: int = 0, model_type: str = TEACHER) -> torch.nn.Module:
    torch.manual_seed(seed)
    return scale_mask_logits(build_sam(model_type, image_size=IMAGE_SIZE), LOGIT_SCALE)


GEN = {
    "points_per_side": 6,
    "points_per_batch": 16,
    "pred_iou_thresh": 0.2,
    "stability_score_thresh": 0.5,
    "box_nms_thresh": 1.0,
}


def write_config(
    folder: Path,
    *,
    train: Path,
    checkpoint: Path | None,
    val: Path | None = None,
    cache: str = "cache",
    precompute: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """A config for the tiny teacher on ``train`` (and ``val``), cache at ``folder/cache``."""
    data = {
        "dataset": {"train_dataset": str(train), "format": "folder", "mode": "everything"},
        "model": {"type": "vit_t_tiny", "image_size": IMAGE_SIZE},
        "mask_teacher": {
            "teacher_type": TEACHER,
            "checkpoint_path": None if checkpoint is None else str(checkpoint),
            "cache_path": str(folder / cache),
        },
        "precompute": {
            **GEN,
            "shard_size": 2,
            "batch_size": 2,
            "num_workers": 0,
            "device": "cpu",
            **(precompute or {}),
        },
    }
    if val is not None:
        data["dataset"]["val_dataset"] = str(val)
    for key, value in (extra or {}).items():
        data[key] = value
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(*args: str) -> int:
    from maskteacher.cli import main

    return main(["precompute", *map(str, args), "--no-progress"])


def subprocess_env() -> dict[str, str]:
    """Environment for child processes: one thread each (deterministic, no oversubscription)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    return env


def cache_content(path: str | Path) -> dict[tuple[str, str], dict[str, np.ndarray | None]]:
    """Every record of a finished cache, keyed by (split, image_id)."""
    reader = open_cache(path)
    out = {}
    for i in range(len(reader)):
        rec = reader[i]
        out[(rec.split, rec.image_id)] = {
            "orig_hw": rec.orig_hw,
            "input_hw": rec.input_hw,
            "teacher_logits": rec.teacher_logits,
            "teacher_points": rec.teacher_points,
            "teacher_iou": rec.teacher_iou,
            "teacher_stability": rec.teacher_stability,
            "teacher_boxes": rec.teacher_boxes,
            "gt_masks": rec.gt_masks,
            "embedding": rec.embedding,
            "tokens": rec.tokens,
            "source": rec.source,
        }
    return out


def assert_same_content(a: dict, b: dict, *, code_tol: int = 1) -> None:
    """Same images, same mask counts and prompts; logits within ``code_tol`` stored units."""
    assert sorted(a) == sorted(b)
    for key in a:
        ra, rb = a[key], b[key]
        for name in ("orig_hw", "input_hw", "gt_masks"):
            np.testing.assert_array_equal(ra[name], rb[name], err_msg=f"{key} {name}")
        assert ra["source"] == rb["source"]
        assert ra["teacher_logits"].shape == rb["teacher_logits"].shape, key
        diff = np.abs(ra["teacher_logits"].astype(np.float32) - rb["teacher_logits"])
        assert diff.max(initial=0) <= code_tol, f"{key}: logits differ by {diff.max()} units"
        for name in ("teacher_points", "teacher_iou", "teacher_stability", "teacher_boxes"):
            np.testing.assert_allclose(ra[name], rb[name], atol=1e-4, err_msg=f"{key} {name}")


# ------------------------------------------------ everything mode vs a SamAutomaticMaskGenerator


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(A, H, W) x (B, H, W) bool -> (A, B) IoU (0 where both are empty)."""
    a = a.reshape(len(a), -1).float()
    b = b.reshape(len(b), -1).float()
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return inter / union.clamp(min=1)


def agreement(ref: torch.Tensor, ours: torch.Tensor) -> tuple[float, float]:
    """Fraction of reference masks with a mask of ours at IoU >= 0.9, and vice versa."""
    m = mask_iou(ref, ours)
    return (
        float((m.max(dim=1).values >= 0.9).float().mean()),
        float((m.max(dim=0).values >= 0.9).float().mean()),
    )


def reference_masks(generator, image: np.ndarray) -> torch.Tensor:
    """Masks of a ``SamAutomaticMaskGenerator`` (segment-anything's or segment-anything-hq's)."""
    anns = generator.generate(image)
    if not anns:
        return torch.zeros(0, *image.shape[:2], dtype=torch.bool)
    return torch.from_numpy(np.stack([a["segmentation"] for a in anns]))


def our_masks(
    model, images: list[np.ndarray], image_size: int = IMAGE_SIZE, **kwargs
) -> list[torch.Tensor]:
    """Our generator on all images in one batch; masks upsampled to each original frame."""
    inputs = [to_model_input(im, image_size) for im in images]
    outs = generate_everything(
        model,
        torch.stack([x for x, _ in inputs]),
        [hw for _, hw in inputs],
        [im.shape[:2] for im in images],
        **kwargs,
    )
    return [
        lowres_to_masks(o.logits, image_size=image_size, input_hw=hw, orig_hw=im.shape[:2])
        for o, (_, hw), im in zip(outs, inputs, images)
    ]
