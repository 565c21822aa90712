"""``precompute --verify K``: re-run the teacher on K random cached images and compare logits.

For each chosen image the teacher re-encodes the image alone and decodes the *cached* prompt
points (multimask as the cache was made). Each cached mask is compared with the candidate of
its point that is closest to it, as the largest absolute logit difference over its L x L
pixels; the image's figure is the largest over its masks. Both sides are clipped to
``[-clip, clip]`` first: the int8 codec saturates there by design (|logit| > clip is sigmoid
~ 0 or 1), and differences beyond it carry no information.

The allowed difference is the codec's own error bound (int8: ``clip / 254``, half a code step;
fp16: ``clip * 2**-11``) plus a tolerance for recomputation noise (another batch composition
gives slightly different float sums: :data:`DEFAULT_TOLERANCE` in float32, larger under bf16).
A cache written by another checkpoint, with another codec scale, or from other image pixels is
off by whole logit units and fails.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from maskteacher.cache_format import Codec, logits_to_float, open_cache
from maskteacher.data import to_model_input
from maskteacher.data.dataset import SegmentationDataset
from maskteacher.errors import UserError
from maskteacher.models.everything import GenerationParams
from maskteacher.models.features import autocast, decode_prompts, encode_features, model_device

#: Recomputation tolerance (logit units) on top of the codec bound: float32 / bf16 teacher.
DEFAULT_TOLERANCE = {False: 0.02, True: 0.5}


@dataclass
class ImageCheck:
    """One re-run image: ``max_diff`` in logit units (None: could not be checked, see note)."""

    split: str
    image_id: str
    masks: int
    max_diff: float | None
    note: str = ""


@dataclass
class TeacherVerifyResult:
    codec_bound: float
    tolerance: float
    checks: list[ImageCheck] = field(default_factory=list)

    @property
    def bound(self) -> float:
        return self.codec_bound + self.tolerance

    @property
    def max_diff(self) -> float:
        diffs = [c.max_diff for c in self.checks if c.max_diff is not None]
        return max(diffs, default=0.0)

    @property
    def ok(self) -> bool:
        return all(c.max_diff is not None for c in self.checks) and self.max_diff <= self.bound

    def format(self) -> str:
        lines = [
            f"verify: {len(self.checks)} cached images re-run, max logit difference "
            f"{self.max_diff:.4f} (allowed {self.bound:.4f} = codec {self.codec_bound:.4f} + "
            f"tolerance {self.tolerance:.4f}): {'OK' if self.ok else 'MISMATCH'}"
        ]
        for c in self.checks:
            diff = "-" if c.max_diff is None else f"{c.max_diff:.4f}"
            bad = c.max_diff is None or c.max_diff > self.bound
            note = f" ({c.note})" if c.note else ""
            lines.append(
                f"  {'BAD ' if bad else ''}{c.split}/{c.image_id}: {c.masks} masks, max diff {diff}{note}"
            )
        return "\n".join(lines)


def codec_bound(codec: Codec) -> float:
    """Largest decoding error of a logit within [-clip, clip] (logit units)."""
    if codec.name == "int8":
        return float(codec.clip) / 254.0
    return float(codec.clip) * 2.0**-11


@torch.no_grad()
def verify_with_teacher(
    cache_path: str,
    model: torch.nn.Module,
    datasets: Mapping[str, SegmentationDataset],
    *,
    count: int,
    generation: GenerationParams,
    seed: int = 0,
    tolerance: float | None = None,
) -> TeacherVerifyResult:
    """Re-run ``model`` on ``count`` random images of the finished cache at ``cache_path``."""
    reader = open_cache(cache_path)
    header = reader.header
    if not header.store.teacher:
        raise UserError(
            f"--verify: cache {cache_path} holds no teacher masks (precompute.store.teacher: "
            "false); there is nothing to re-run"
        )
    tol = DEFAULT_TOLERANCE[generation.bf16] if tolerance is None else float(tolerance)
    result = TeacherVerifyResult(codec_bound=codec_bound(header.codec), tolerance=tol)
    positions = sorted(random.Random(seed).sample(range(len(reader)), min(count, len(reader))))
    indices: dict[str, dict[str, int]] = {}
    for pos in positions:
        rec = reader[pos]
        dataset = datasets.get(rec.split)
        if dataset is None:
            result.checks.append(
                ImageCheck(rec.split, rec.image_id, rec.num_masks, None, "split not configured")
            )
            continue
        by_id = indices.setdefault(
            rec.split, {image_id: i for i, image_id in enumerate(dataset.image_ids)}
        )
        if rec.image_id not in by_id:
            result.checks.append(
                ImageCheck(rec.split, rec.image_id, rec.num_masks, None, "not in the dataset")
            )
            continue
        result.checks.append(
            _check_image(model, dataset, by_id[rec.image_id], rec, header, generation)
        )
    return result


def _check_image(model, dataset, index, rec, header, generation: GenerationParams) -> ImageCheck:
    sample = dataset[index]
    image, input_hw = to_model_input(sample.image, header.image_size)
    if tuple(input_hw) != tuple(int(v) for v in rec.input_hw):
        return ImageCheck(
            rec.split,
            rec.image_id,
            rec.num_masks,
            None,
            f"input size {input_hw} differs from the cached {tuple(rec.input_hw)}",
        )
    if rec.num_masks == 0:
        return ImageCheck(rec.split, rec.image_id, 0, 0.0, "no cached masks")
    device = model_device(model)
    features = encode_features(model, image[None], torch.tensor([input_hw]), bf16=generation.bf16)
    points = torch.from_numpy(np.asarray(rec.teacher_points, np.float32)).to(device)
    clip = float(header.codec.clip)
    cached = torch.from_numpy(logits_to_float(rec.teacher_logits, header.codec)).to(device)
    cached = cached.clamp(-clip, clip)
    worst = 0.0
    for start in range(0, points.shape[0], generation.points_per_batch):
        chunk = points[start : start + generation.points_per_batch]
        with autocast(device, generation.bf16):
            out = decode_prompts(
                model,
                features,
                chunk,
                multimask_output=generation.multimask_output,
                hq_token_only=generation.hq_token_only,
            )
        fresh = out.low_res_logits.float().clamp(-clip, clip)  # (p, K, L, L)
        want = cached[start : start + chunk.shape[0], None]  # (p, 1, L, L)
        diff = (fresh - want).abs().flatten(2).amax(dim=2)  # (p, K)
        worst = max(worst, float(diff.amin(dim=1).max()))
    return ImageCheck(rec.split, rec.image_id, rec.num_masks, worst)
