"""Helpers for the mask-teacher and feature-distillation tests: tiny teachers, teacher caches
with synthetic teacher outputs derived from the ground truth, hand-made batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from train_helpers import IMAGE_SIZE

from maskteacher.cache_format import (
    CacheHeader,
    CacheRecord,
    Codec,
    ShardWriter,
    StoreFlags,
    dataset_fingerprint,
    finalize,
    init_cache,
)
from maskteacher.config import PrecomputeConfig
from maskteacher.data import input_size, masks_to_lowres, open_dataset
from maskteacher.models import build_sam, sha256_file
from maskteacher.models.everything import GenerationParams
from maskteacher.train.data.batch import PromptSet, TeacherTargets, TrainSample, collate
from maskteacher.train.schedule import EpochSettings
from maskteacher.train.student import Predictions
from maskteacher.train.supervision.base import StepContext

TEACHER_TYPE = "vit_b_tiny"
EMBED_DIM = 64  # channels of the tiny models' embeddings and decoder tokens
LOSS_WEIGHTS = {"bce": 1.0, "focal": 15.0, "dice": 1.0, "iou": 1.0, "cls": 1.0}


def tiny_teacher(
    seed: int = 0,
    *,
    image_size: int = IMAGE_SIZE,
    scale: float = 1000.0,
    model_type: str = TEACHER_TYPE,
):
    """A random tiny model whose mask logits are a few units to tens (x ``scale``): random
    weights alone give logits of ~0.03, which no stability filter keeps and whose masks match
    nothing."""
    torch.manual_seed(seed)
    model = build_sam(model_type, image_size=image_size)
    mlps = list(model.mask_decoder.output_hypernetworks_mlps)
    if hasattr(model.mask_decoder, "hf_mlp"):  # SAM-HQ's HQ token
        mlps.append(model.mask_decoder.hf_mlp)
    with torch.no_grad():
        for mlp in mlps:
            mlp.layers[-1].weight.mul_(scale)
            mlp.layers[-1].bias.mul_(scale)
    return model


def save_teacher(
    path: Path,
    seed: int = 0,
    *,
    image_size: int = IMAGE_SIZE,
    model_type: str = TEACHER_TYPE,
    scale: float = 1000.0,
) -> Path:
    """Save :func:`tiny_teacher` weights (also used as a student start that predicts masks)."""
    model = tiny_teacher(seed, image_size=image_size, model_type=model_type, scale=scale)
    torch.save(model.state_dict(), path)
    return path


def _interior_point(mask: np.ndarray) -> list[float]:
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return [0.0, 0.0]
    k = rows.size // 2
    return [(cols[k] + 0.5) * 4, (rows[k] + 0.5) * 4]


def fake_teacher_masks(gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Teacher masks from (M, L, L) ground truth: each GT mask shifted one pixel right (so it is
    close to, not equal to, the GT), plus one random box the GT does not have."""
    low = gt.shape[-1]
    shifted = np.zeros_like(gt)
    shifted[:, :, 1:] = gt[:, :, :-1]
    extra = np.zeros((1, low, low), bool)
    r0, c0 = rng.integers(0, low // 2, size=2)
    extra[0, r0 : r0 + low // 3, c0 : c0 + low // 3] = True
    return np.concatenate([shifted, extra])


def write_teacher_cache(
    root: Path,
    datasets: dict[str, Path],
    *,
    image_size: int = IMAGE_SIZE,
    teacher_type: str = TEACHER_TYPE,
    checkpoint: Path | None = None,
    params: dict | None = None,
    codec: str = "int8",
    embedding: bool = False,
    tokens: bool = False,
    embed_dim: int = EMBED_DIM,
    seed: int = 0,
    empty_teacher: tuple[str, ...] = (),
) -> Path:
    """A teacher cache with synthetic teacher outputs (:func:`fake_teacher_masks` as +-6 logits
    plus noise, an interior prompt point per mask), the ground truth, and optionally random
    embeddings (embed_dim, S/16, S/16) and tokens (N, embed_dim).

    params: generation parameters recorded in the header (default: the ``precompute`` defaults,
    which is what a config without a precompute section expects), updated by what is given.
    """
    rng = np.random.default_rng(seed)
    header_params = GenerationParams.from_config(PrecomputeConfig()).header_params()
    header_params.update(params or {})
    opened = {split: open_dataset(path) for split, path in datasets.items()}
    header = CacheHeader(
        teacher_type=teacher_type,
        checkpoint_sha256=sha256_file(checkpoint) if checkpoint else "1" * 64,
        image_size=image_size,
        params=header_params,
        codec=Codec(name=codec),
        store=StoreFlags(teacher=True, gt=True, embedding=embedding, tokens=tokens),
        fingerprints={
            split: dataset_fingerprint(ds.fingerprint_entries()) for split, ds in opened.items()
        },
    )
    init_cache(root, header)
    grid = image_size // 16
    for split, ds in opened.items():
        with ShardWriter(root, f"{split}-0", split=split) as writer:
            for i in range(len(ds)):
                sample = ds[i]
                gt = masks_to_lowres(sample.masks, sample.orig_hw, image_size).numpy()
                gt = gt[gt.reshape(gt.shape[0], -1).any(1)]
                masks = fake_teacher_masks(gt, rng)
                if sample.image_id in empty_teacher:  # the teacher's thresholds kept nothing
                    masks = masks[:0]
                n = masks.shape[0]
                logits = np.where(masks, 6.0, -6.0) + rng.normal(0, 0.5, masks.shape)
                writer.add(
                    CacheRecord(
                        image_id=sample.image_id,
                        split=split,
                        orig_hw=np.asarray(sample.orig_hw, np.int64),
                        input_hw=np.asarray(input_size(sample.orig_hw, image_size), np.int64),
                        teacher_logits=logits.astype(np.float32),
                        teacher_points=np.array(
                            [_interior_point(m) for m in masks], np.float32
                        ).reshape(n, 2),
                        teacher_iou=np.full((n,), 0.9, np.float32),
                        teacher_stability=np.full((n,), 0.95, np.float32),
                        teacher_boxes=np.zeros((n, 4), np.float32),
                        gt_masks=gt,
                        embedding=rng.normal(0, 1, (embed_dim, grid, grid)).astype(np.float32)
                        if embedding
                        else None,
                        tokens=rng.normal(0, 1, (n, embed_dim)).astype(np.float32)
                        if tokens
                        else None,
                    )
                )
    finalize(root)
    return root


# ------------------------------------------------------------------------ hand-made batches


def hand_batch(
    gt: list[torch.Tensor],
    teacher_logits: list[torch.Tensor],
    points: list[torch.Tensor],
    *,
    image_size: int = 16,
    teacher: list[TeacherTargets] | None = None,
) -> object:
    """A collated batch of len(gt) blank images of side ``image_size`` (no padding) with the
    given (M_i, L, L) GT, (N_i, L, L) teacher logits and (P_i, 2) prompt points."""
    samples = []
    for i, (g, t, p) in enumerate(zip(gt, teacher_logits, points)):
        targets = teacher[i] if teacher is not None else TeacherTargets(logits=t)
        samples.append(
            TrainSample(
                image_id=f"img{i}",
                image=torch.zeros(3, image_size, image_size, dtype=torch.uint8),
                input_hw=(image_size, image_size),
                orig_hw=(image_size, image_size),
                gt_masks=g,
                prompts=PromptSet.from_points(p),
                teacher=targets,
            )
        )
    return collate(samples)


def hand_predictions(
    logits: torch.Tensor, iou_pred: torch.Tensor, *, embeddings=None, tokens=None
) -> Predictions:
    """Predictions with K = 1: logits (P, L, L), iou_pred (P,)."""
    return Predictions(
        logits=logits[:, None].clone().requires_grad_(True),
        iou_pred=iou_pred[:, None].clone().requires_grad_(True),
        tokens=tokens,
        embeddings=torch.zeros(1) if embeddings is None else embeddings,
    )


def step_context(*, image_size: int = 16, reduce_count=float, lambda_coef=1.0, kd=True):
    return StepContext(
        settings=EpochSettings(dict(LOSS_WEIGHTS), kd, lambda_coef, (True, True, True)),
        generator=torch.Generator().manual_seed(0),
        reduce_count=reduce_count,
        image_size=image_size,
    )


def box_mask(low: int, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    """(L, L) bool with rows [r0, r1) x cols [c0, c1) set."""
    m = torch.zeros(low, low, dtype=torch.bool)
    m[r0:r1, c0:c1] = True
    return m


def logits_of(masks: torch.Tensor, value: float = 5.0) -> torch.Tensor:
    """+-value logits of bool masks."""
    return torch.where(masks, value, -value).float()


def tensorboard_scalars(run: Path) -> dict[str, list[float]]:
    """Every scalar a training run logged: tag -> values in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
