"""Training-step benchmark: ms/image and peak memory of our step against the naive loop.

Every variant runs the same synthetic batch (B images, P grid prompts each, M ground-truth
masks each) through a full training step -- image encoder, mask decoder, Hungarian matching,
the task losses, backward and an AdamW step -- and reports ms per image and peak memory, then
ratios against the baseline, all measured side by side in one run:

  naive             per-image decoder calls (segment-anything's MaskDecoder.forward on one
                    image's prompts at a time), fp32, losses on all low-res pixels -- the
                    origin project's loop and the baseline
  batched           one decoder call for all images' prompts (maskteacher.models.decode_points
                    through StudentForward), fp32
  batched_points    + losses on --loss-points sampled pixels per pair
  batched_ckpt      + activation checkpointing of the decoder's per-prompt activations
  batched_bf16      batched_points + bf16 autocast (CUDA default list)
  bf16_ckpt         batched_bf16 + activation checkpointing (CUDA default list)
  compiled          batched_bf16 + torch.compile of the student forward (--compile)
  compiled_ckpt     compiled + activation checkpointing of the decoder chunks

Point-sampled decoding (issue 17; ``train.point_decoding``, the trainer's default with
``train.loss_points``): the same losses on the same sampled pixels, but the student's mask
logits are decoded with gradients only there, the full maps for matching come from a no-grad
pass -- compare each with the variant above it that decodes full maps:

  points            batched_points with point-sampled decoding (fp32)
  points_bf16       batched_bf16 with point-sampled decoding
  points_compiled   compiled with point-sampled decoding

Mask-teacher supervision (issue 7; the GT-only step above is the reference):

  dual_cache        batched_points + dual_supervision (soft loss, --soft-type) with the teacher's
                    outputs in the batch as the cache gives them (int8 codes, dequantised on the
                    device every step); reading them is the DataLoader workers' job and is not
                    in the step (bench/cache_io.py measures it); its memory is counted after
                    the teacher that made the outputs is freed
  dual_online       the same with the teacher model (--teacher-model) run every step on the
                    batch by the trainer's online-teacher hook: generate_everything over a
                    --teacher-grid x --teacher-grid grid, under no_grad, as in training
  dual_cache_bf16 / dual_online_bf16   the two above on batched_bf16 (CUDA default list)

The origin's distillation blocks in single mode (issue 15; one prompt per object, points or a
box, ``dataset.prompt_mode: mixed``), with --kd-student / --kd-teacher (equal decoder widths):

  single            single-mode step, GT only: the baseline of the two below
  single_kd_cache   + the four blocks (encoder_patch, prompt_embed, decoder_mask_token,
                    dense_mask_logits) with the teacher's embedding as the cache gives it (fp16;
                    reading it is the loader's job) and the teacher's prompt encoder + mask
                    decoder run on it for the student's prompts every step; the teacher's image
                    encoder is never built (its memory is not counted)
  single_kd_online  the same with the full teacher run every step: its image encoder on the
                    batch's images (no grad), then its decoder -- the origin's online teacher

The teacher has random weights with its mask head scaled x --teacher-logit-scale so that logits
have SAM-like magnitudes (tens); random weights fail SAM's quality filters and their masks all
span the image, so the pred_iou / stability thresholds are 0, NMS runs at 1.0 and
--teacher-masks caps the masks per image -- the same work as a real teacher's generation.

On the CPU the variants' steps are interleaved in one process (so load from other processes
hits them alike) and memory is the resident-set growth from before a variant's setup to the peak
of two steps, each variant in a fresh process. On CUDA the variants run one after another and
memory is ``torch.cuda.max_memory_allocated`` from the variant's setup to its last step (model,
optimizer state, activations).

    python bench/train_step.py                                # CPU, tiny model, image 128
    python bench/train_step.py --device cuda --model vit_t --image-size 1024 --batch 8 --prompts 64
    python bench/train_step.py --variants naive batched_bf16 compiled --json
    python bench/train_step.py --variants batched_points dual_cache dual_online      # CPU, tiny
    python bench/train_step.py --threads 1 --variants single single_kd_cache single_kd_online
    python bench/train_step.py --device cuda --model vit_t --image-size 1024 --batch 8 \
        --prompts 64 --teacher-model vit_h --teacher-grid 16 \
        --variants batched_bf16 dual_cache_bf16 dual_online_bf16

Extension: add a :class:`Variant` to :data:`VARIANTS` and its (numerator, denominator) to
:data:`RATIOS`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from maskteacher.cache_format import Codec
from maskteacher.cache_format.codecs import encode_logits
from maskteacher.data import point_grid
from maskteacher.models import build_sam
from maskteacher.models.everything import encode_images
from maskteacher.models.prompt_decoder import build_prompt_decoder
from maskteacher.train.data.batch import Batch, PromptSet, TeacherTargets, TrainSample, collate
from maskteacher.train.data.online_teacher import MASK_FIELDS, OnlineTeacher
from maskteacher.train.data.prompts import SingleSettings, single_prompts
from maskteacher.train.distill.feature_kd import FeatureDistillation, KDTeacher
from maskteacher.train.distill.prompt_blocks import (
    DecoderMaskToken,
    DenseMaskLogits,
    EncoderPatch,
    PromptEmbed,
)
from maskteacher.train.distill.teacher_decoder import TeacherDecoder
from maskteacher.train.schedule import EpochSettings, build_optimizer
from maskteacher.train.student import Predictions, StudentForward, run_forward
from maskteacher.train.supervision.base import StepContext
from maskteacher.train.supervision.criterion import MaskCriterion, weighted_total
from maskteacher.train.supervision.gt import GTSupervision, SingleSupervision
from maskteacher.train.supervision.mask_teacher import DualSupervision
from maskteacher.train.supervision.matcher import MatchSettings

LOSS_WEIGHTS = {"bce": 1.0, "focal": 15.0, "dice": 1.0, "iou": 1.0, "cls": 1.0}


# ------------------------------------------------------------------------------ the batch


def synthetic_batch(*, batch: int, prompts: int, masks: int, image_size: int, seed: int) -> Batch:
    """B random images with M random elliptic objects each and a grid of ~P prompts."""
    gen = np.random.default_rng(seed)
    low = image_size // 4
    yy, xx = np.mgrid[0:low, 0:low]
    side = max(1, int(round(prompts**0.5)))
    samples = []
    for i in range(batch):
        image = torch.from_numpy(gen.integers(0, 256, (3, image_size, image_size), dtype=np.uint8))
        cy, cx = gen.uniform(0, low, (2, masks))
        ry, rx = gen.uniform(low / 30, low / 4, (2, masks))
        gt = ((yy[None] - cy[:, None, None]) / ry[:, None, None]) ** 2 + (
            (xx[None] - cx[:, None, None]) / rx[:, None, None]
        ) ** 2 < 1
        pts = point_grid(side, (image_size, image_size))[:prompts]
        samples.append(
            TrainSample(
                image_id=str(i),
                image=image,
                input_hw=(image_size, image_size),
                orig_hw=(image_size, image_size),
                gt_masks=torch.from_numpy(gt),
                prompts=PromptSet.from_points(torch.from_numpy(pts)),
            )
        )
    return collate(samples)


# ------------------------------------------------------------------------------ variants


def naive_forward(sam, batch: Batch) -> Predictions:
    """The baseline: segment-anything's decoder, one call per image, fp32."""
    emb = sam.image_encoder(sam.preprocess(batch.images.float()))
    offsets = batch.prompt_offsets.tolist()
    logits, ious = [], []
    for i in range(batch.num_images):
        pts = batch.points[offsets[i] : offsets[i + 1]]
        labels = batch.labels[offsets[i] : offsets[i + 1]]
        sparse, dense = sam.prompt_encoder(points=(pts, labels), boxes=None, masks=None)
        masks, iou = sam.mask_decoder(
            image_embeddings=emb[i : i + 1],
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        logits.append(masks)
        ious.append(iou)
    return Predictions(torch.cat(logits), torch.cat(ious), None, emb)


@dataclass(frozen=True)
class Variant:
    """One way of running the step; ``forward(sam, batch)`` returns the predictions."""

    name: str
    help: str
    bf16: bool = False
    loss_points: bool = False
    checkpoint_decoder: bool = False
    compile: bool = False
    naive: bool = False
    teacher: str | None = None  # None: GT only; "cache": dual from cached outputs; "online"
    point_decoding: bool = False
    single: bool = False  # single-mode prompts (one per object, points or a box)
    kd: str | None = None  # the four distillation blocks: "cache" or "online" teacher


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("naive", "per-image decoder calls, fp32 (baseline)", naive=True),
        Variant("batched", "one decoder call for all prompts, fp32"),
        Variant("batched_points", "batched + losses on sampled pixels", loss_points=True),
        Variant(
            "batched_ckpt",
            "batched_points + decoder activation checkpointing",
            loss_points=True,
            checkpoint_decoder=True,
        ),
        Variant("batched_bf16", "batched_points + bf16 autocast", bf16=True, loss_points=True),
        Variant(
            "bf16_ckpt",
            "batched_bf16 + decoder activation checkpointing",
            bf16=True,
            loss_points=True,
            checkpoint_decoder=True,
        ),
        Variant(
            "compiled",
            "batched_bf16 + torch.compile",
            bf16=True,
            loss_points=True,
            compile=True,
        ),
        Variant(
            "compiled_ckpt",
            "compiled + decoder activation checkpointing",
            bf16=True,
            loss_points=True,
            compile=True,
            checkpoint_decoder=True,
        ),
        Variant(
            "points",
            "batched_points + point-sampled decoding",
            loss_points=True,
            point_decoding=True,
        ),
        Variant(
            "points_bf16",
            "batched_bf16 + point-sampled decoding",
            bf16=True,
            loss_points=True,
            point_decoding=True,
        ),
        Variant(
            "points_compiled",
            "compiled + point-sampled decoding",
            bf16=True,
            loss_points=True,
            compile=True,
            point_decoding=True,
        ),
        Variant(
            "dual_cache",
            "batched_points + dual_supervision, teacher from the cache",
            loss_points=True,
            teacher="cache",
        ),
        Variant(
            "dual_online",
            "batched_points + dual_supervision, teacher run online",
            loss_points=True,
            teacher="online",
        ),
        Variant("single", "single mode (mixed points / boxes), GT only", single=True),
        Variant(
            "single_kd_cache",
            "single + the 4 blocks, teacher decoder on cached embeddings",
            single=True,
            kd="cache",
        ),
        Variant(
            "single_kd_online",
            "single + the 4 blocks, full teacher run online",
            single=True,
            kd="online",
        ),
        Variant(
            "dual_cache_bf16",
            "batched_bf16 + dual_supervision, teacher from the cache",
            bf16=True,
            loss_points=True,
            teacher="cache",
        ),
        Variant(
            "dual_online_bf16",
            "batched_bf16 + dual_supervision, teacher run online (bf16)",
            bf16=True,
            loss_points=True,
            teacher="online",
        ),
    )
}

#: (numerator, denominator) pairs printed as ratios (ms/image and memory).
RATIOS: list[tuple[str, str]] = [
    ("batched", "naive"),
    ("batched_points", "naive"),
    ("batched_ckpt", "batched_points"),
    ("batched_bf16", "naive"),
    ("bf16_ckpt", "batched_bf16"),
    ("compiled", "naive"),
    ("compiled", "batched_bf16"),
    ("compiled_ckpt", "compiled"),
    ("points", "batched_points"),
    ("points_bf16", "batched_bf16"),
    ("points_compiled", "compiled"),
    ("points_compiled", "naive"),
    ("dual_cache", "batched_points"),  # target <= 1.10
    ("dual_online", "dual_cache"),  # target >= 3 (GPU, vit_h teacher)
    ("dual_cache_bf16", "batched_bf16"),  # target <= 1.10
    ("dual_online_bf16", "dual_cache_bf16"),  # target >= 3 (GPU, vit_h teacher)
    ("single_kd_cache", "single"),  # target <= 1.3
    ("single_kd_online", "single_kd_cache"),  # target >= 3
]
#: Variants run when --variants is not given.
DEFAULT_VARIANTS = {
    "cpu": [
        "naive",
        "batched",
        "batched_points",
        "points",
        "batched_ckpt",
        "dual_cache",
        "dual_online",
    ],
    "cuda": [
        "naive",
        "batched",
        "batched_points",
        "batched_bf16",
        "points_bf16",
        "bf16_ckpt",
        "dual_cache_bf16",
        "dual_online_bf16",
    ],
}


@dataclass
class Measurement:
    variant: str
    ms_per_image: float
    ms_per_image_min: float
    peak_mb: float
    loss: float


def online_teacher(args, device: torch.device, bf16: bool) -> OnlineTeacher:
    """The trainer's online-teacher hook around a random teacher (module docstring)."""
    torch.manual_seed(1)
    model = build_sam(args.teacher_model, image_size=args.image_size)
    with torch.no_grad():
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(args.teacher_logit_scale)
            mlp.layers[-1].bias.mul_(args.teacher_logit_scale)
    model.requires_grad_(False)
    generation = {
        "points_per_side": args.teacher_grid,
        "points_per_batch": args.teacher_points_per_batch,
        "pred_iou_thresh": 0.0,
        "stability_score_thresh": 0.0,
        "stability_score_offset": 1.0,
        "box_nms_thresh": 1.0,  # random masks all span the image: NMS at 0.7 keeps one
        "max_masks_per_image": args.teacher_masks,
        "multimask_output": True,
        "bf16": bf16,
    }
    return OnlineTeacher(
        model.to(device).eval(),
        generation=generation,
        provides=MASK_FIELDS,
        image_size=args.image_size,
        logit_clip=CACHE_CODEC.clip,
    )


#: The cache codec the cached variant stores its teacher logits with (the default, int8).
CACHE_CODEC = Codec("int8")


def cached_teacher(batch: Batch, hook: OnlineTeacher) -> list[TeacherTargets]:
    """The teacher's outputs as a cache returns them: int8 codes + scale, computed once."""
    out = []
    for t in hook.teacher_outputs(batch):
        codes, _ = encode_logits(t.logits.float().cpu().numpy(), CACHE_CODEC)
        out.append(
            TeacherTargets(
                logits=torch.from_numpy(codes).to(batch.images.device),
                logit_scale=CACHE_CODEC.scale,
                points=t.points,
                iou=t.iou,
                stability=t.stability,
                boxes=t.boxes,
            )
        )
    return out


def single_batch(*, batch: int, prompts: int, masks: int, image_size: int, seed: int) -> Batch:
    """The synthetic images of :func:`synthetic_batch` with single-mode prompts: one per object
    (up to ``prompts``), points (1-3) or a jittered box with equal odds."""
    samples = []
    for i in range(batch):
        base = synthetic_batch(
            batch=1, prompts=1, masks=masks, image_size=image_size, seed=seed + i
        )
        settings = SingleSettings(mode="mixed", max_prompts=prompts, max_bbox_shift=8)
        pr = single_prompts(
            base.gt_masks[0], settings=settings, input_hw=(image_size, image_size),
            orig_hw=(image_size, image_size), image_size=image_size,
            rng=np.random.default_rng(seed + i),
        )  # fmt: skip
        samples.append(
            TrainSample(
                image_id=str(i), image=base.images[0], input_hw=(image_size, image_size),
                orig_hw=(image_size, image_size), gt_masks=base.gt_masks[0], prompts=pr,
            )
        )  # fmt: skip
    return collate(samples)


KD_BLOCKS = [
    EncoderPatch(w_l2=1.0, w_cos=1.0, weight=1.0),
    PromptEmbed(w_mse=0.7, w_cos=0.3, weight=1.0),
    DecoderMaskToken(w_kl=1.0, temperature=0.5, weight=1.0),
    DenseMaskLogits(w_kl=0.6, w_focal=0.4, gamma=2.0, weight=1.0),
]


def kd_teacher(variant: Variant, args, batch: Batch, device: torch.device) -> KDTeacher:
    """The distillation teacher: its decoder, and where its embedding comes from each step --
    the batch as the cache gives it (fp16; random values of the teacher's shape: the cached run
    never builds the teacher's encoder, so neither does this one), or its encoder run online."""
    torch.manual_seed(1)
    if variant.kd == "online":
        full = build_sam(args.kd_teacher, image_size=args.image_size).to(device).eval()
        model: torch.nn.Module = full.requires_grad_(False)

        def source(b: Batch) -> list[TeacherTargets]:
            emb = encode_images(full, b.images, b.input_hw)  # the teacher's encoder, every step
            return [TeacherTargets(embedding=e) for e in emb]

    else:
        model = build_prompt_decoder(args.kd_teacher, args.image_size).requires_grad_(False)
        model = model.to(device)
        grid = args.image_size // 16
        shape = (batch.num_images, model.width, grid, grid)
        cached = [TeacherTargets(embedding=e) for e in torch.randn(shape, device=device).half()]

        def source(b: Batch) -> list[TeacherTargets]:
            return cached

    decoder = TeacherDecoder(model, multimask_output=False, chunk=max(1, batch.num_prompts))
    return KDTeacher("teacher", 1.0, source, from_batch=False, decoder=decoder)


def make_kd_step(variant: Variant, args, device: torch.device) -> tuple[Callable[[], float], Batch]:
    """A single-mode step, with the four distillation blocks when the variant has them."""
    torch.manual_seed(0)
    sam = build_sam(args.kd_student, image_size=args.image_size).to(device).train()
    batch = single_batch(
        batch=args.batch, prompts=args.prompts, masks=args.masks,
        image_size=args.image_size, seed=0,
    ).to(device)  # fmt: skip
    strategy = SingleSupervision(criterion=MaskCriterion(loss_points=args.loss_points))
    kd = None
    if variant.kd is not None:
        teacher = kd_teacher(variant, args, batch, device)
        kd = FeatureDistillation(teachers=[teacher], blocks=KD_BLOCKS, batch_fields=frozenset())
    forward = StudentForward(
        sam, points_per_batch=max(1, batch.num_prompts), return_features=kd is not None
    )
    optimizer = build_optimizer(sam, lr=1e-5, weight_decay=1e-4, encoder_lr_scale=0.1)
    settings = EpochSettings(LOSS_WEIGHTS, True, 1.0, (True, True, True))
    counter = {"step": 0}

    def step() -> float:
        ctx = StepContext(
            settings=settings,
            generator=torch.Generator().manual_seed(counter["step"]),
            reduce_count=float,
            image_size=args.image_size,
        )
        counter["step"] += 1
        preds = run_forward(forward, batch)
        out = strategy(preds, batch, ctx)
        terms, weights = dict(out.terms), dict(out.weights)
        if kd is not None:
            extra = kd(preds, batch, ctx, out)
            terms.update(extra.terms)
            weights.update(extra.weights)
        loss = weighted_total(terms, weights)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, batch


def make_step(variant: Variant, args, device: torch.device) -> tuple[Callable[[], float], Batch]:
    if variant.single:
        return make_kd_step(variant, args, device)
    torch.manual_seed(0)
    sam = build_sam(args.model, image_size=args.image_size).to(device).train()
    batch = synthetic_batch(
        batch=args.batch,
        prompts=args.prompts,
        masks=args.masks,
        image_size=args.image_size,
        seed=0,
    ).to(device)
    loss_points = args.loss_points if variant.loss_points else None
    criterion = MaskCriterion(loss_points=loss_points)
    match = MatchSettings(iou_threshold=args.match_threshold)
    strategy = GTSupervision(criterion=criterion, match=match)
    hook = None
    if variant.teacher is not None:
        strategy = DualSupervision(
            criterion=criterion,
            match=match,
            iou_threshold=args.teacher_iou,
            soft_type=args.soft_type,
            soft_weight=0.5,
        )
        hook = online_teacher(args, device, variant.bf16)
        if variant.teacher == "cache":
            batch.teacher = cached_teacher(batch, hook)
            del hook.model
            hook = None
            if device.type == "cuda":  # the teacher never is on the device in a cached run
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
    # checkpointing only lowers the peak when the decoder runs in several chunks (each chunk is
    # recomputed and freed in turn during backward)
    chunk = args.ckpt_chunk if variant.checkpoint_decoder else batch.num_prompts
    forward = StudentForward(
        sam,
        points_per_batch=max(1, chunk),
        checkpoint_decoder=variant.checkpoint_decoder,
        point_decoding=variant.point_decoding,
    )
    module = torch.compile(forward) if variant.compile else forward
    optimizer = build_optimizer(sam, lr=1e-5, weight_decay=1e-4, encoder_lr_scale=0.1)
    settings = EpochSettings(LOSS_WEIGHTS, False, 1.0, (True, True, True))
    counter = {"step": 0}

    def step() -> float:
        ctx = StepContext(
            settings=settings,
            generator=torch.Generator().manual_seed(counter["step"]),
            reduce_count=float,
            image_size=args.image_size,
        )
        counter["step"] += 1
        b = batch if hook is None else hook(batch)  # the online teacher runs in the step
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant.bf16):
            preds = naive_forward(sam, b) if variant.naive else run_forward(module, b)
        out = strategy(preds, b, ctx)
        loss = weighted_total(out.terms, out.weights)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _timed(step: Callable[[], float], device: torch.device) -> tuple[float, float]:
    start = time.perf_counter()
    loss = step()
    _sync(device)
    return time.perf_counter() - start, loss


def measure_cuda(variant: Variant, args) -> Measurement:
    """CUDA: one variant at a time; peak = max allocated from its setup to its last step."""
    device = torch.device(args.device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    step, batch = make_step(variant, args, device)
    for _ in range(args.warmup):
        step()
    times, loss = [], float("nan")
    for _ in range(args.steps):
        t, loss = _timed(step, device)
        times.append(t)
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    del step, batch
    torch.cuda.empty_cache()
    return _measurement(variant.name, times, args.batch, peak, loss)


def _reset_peak_rss() -> None:
    """Reset the kernel's resident-set high-water mark (VmHWM) of this process (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover


def measure_cpu_memory(variant: Variant, args) -> float:
    """CPU: resident-set growth (MB) from before the variant's setup to the peak of 2 steps
    (the high-water mark is reset after the imports, whose transient peak would hide it)."""
    device = torch.device(args.device)
    _reset_peak_rss()
    before = _rss_mb()
    step, _ = make_step(variant, args, device)
    step()
    step()
    return _peak_rss_mb() - before


def measure_cpu(names: list[str], args, passthrough: list[str]) -> list[Measurement]:
    """CPU: steps of all variants interleaved in one process (load from other processes hits
    every variant alike); memory from a fresh process per variant."""
    device = torch.device(args.device)
    steps = {n: make_step(VARIANTS[n], args, device)[0] for n in names}
    for n in names:
        for _ in range(args.warmup):
            steps[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    losses: dict[str, float] = {}
    for _ in range(args.steps):
        for n in names:
            t, losses[n] = _timed(steps[n], device)
            times[n].append(t)
    out = []
    for n in names:
        peak = _isolated_memory(n, passthrough)
        out.append(_measurement(n, times[n], args.batch, peak, losses[n]))
    return out


def _isolated_memory(name: str, passthrough: list[str]) -> float:
    cmd = [sys.executable, __file__, *passthrough, "--memory-of", name]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"variant {name} failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def _measurement(name, times, images, peak, loss) -> Measurement:
    per_image = [1000 * t / images for t in times]
    return Measurement(
        variant=name,
        ms_per_image=statistics.median(per_image),
        ms_per_image_min=min(per_image),
        peak_mb=peak,
        loss=loss,
    )


# ------------------------------------------------------------------------------ driver


def _strip_variants(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if a == "--variants":
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        if a not in ("--json", "--compile"):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="vit_t_tiny")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per image")
    parser.add_argument("--masks", type=int, default=16, help="ground-truth masks per image")
    parser.add_argument(
        "--loss-points", type=int, default=None, help="sampled pixels per pair (default L*L/4)"
    )
    parser.add_argument("--match-threshold", type=float, default=0.0)
    parser.add_argument("--teacher-model", default="vit_b_tiny", help="dual_* variants' teacher")
    parser.add_argument("--teacher-grid", type=int, default=16, help="teacher points per side")
    parser.add_argument("--teacher-points-per-batch", type=int, default=256)
    parser.add_argument("--teacher-masks", type=int, default=64, help="teacher masks per image")
    parser.add_argument(
        "--teacher-iou",
        type=float,
        default=0.0,
        help="mask_teacher.iou_threshold (0: every overlapping pair gets the soft loss, the most "
        "work; a random student reaches no real threshold)",
    )
    parser.add_argument("--teacher-logit-scale", type=float, default=1000.0)
    parser.add_argument("--soft-type", default="kl", choices=["l2", "kl"])
    parser.add_argument("--kd-student", default=None, help="single_* variants' student (--model)")
    parser.add_argument(
        "--kd-teacher", default="vit_b_tiny", help="single_kd_* variants' teacher (same width)"
    )
    parser.add_argument(
        "--ckpt-chunk", type=int, default=None, help="prompts per checkpointed chunk (default P)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--variants", nargs="+", default=None, choices=sorted(VARIANTS))
    parser.add_argument("--compile", action="store_true", help="also run the compiled variant")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.loss_points is None:
        args.loss_points = (args.image_size // 4) ** 2 // 4
    if args.ckpt_chunk is None:
        args.ckpt_chunk = args.prompts
    if args.kd_student is None:
        args.kd_student = args.model
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        print(measure_cpu_memory(VARIANTS[args.memory_of], args))
        return 0
    names = args.variants
    if names is None:
        names = list(DEFAULT_VARIANTS["cuda" if args.device.startswith("cuda") else "cpu"])
        if args.compile:
            names.append("compiled")
    if args.device.startswith("cuda"):
        results = []
        for n in names:
            try:
                results.append(measure_cuda(VARIANTS[n], args))
            except Exception as exc:  # one failing variant (e.g. out of memory) ends only itself
                print(f"variant {n} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")
                torch.cuda.empty_cache()
    else:
        passthrough = _strip_variants(sys.argv[1:] if argv is None else argv)
        results = measure_cpu(names, args, passthrough)
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
        return 0
    memory = "peak MB" if args.device.startswith("cuda") else "RSS+ MB"
    print(
        f"device={args.device} model={args.model} image_size={args.image_size} batch={args.batch} "
        f"prompts/image={args.prompts} gt masks/image={args.masks} loss_points={args.loss_points} "
        f"threads={torch.get_num_threads()} steps={args.steps} (median)"
    )
    if any(VARIANTS[r.variant].single for r in results):
        print(f"single_*: student {args.kd_student}, teacher {args.kd_teacher}")
    print(f"{'variant':<16}{'ms/image':>10}{'min':>9}{memory:>10}{'loss':>9}  what")
    for r in results:
        print(
            f"{r.variant:<16}{r.ms_per_image:>10.1f}{r.ms_per_image_min:>9.1f}{r.peak_mb:>10.0f}"
            f"{r.loss:>9.3f}  {VARIANTS[r.variant].help}"
        )
    by = {r.variant: r for r in results}
    for a, b in RATIOS:
        if a in by and b in by:
            print(
                f"ratio {a} / {b}: time {by[a].ms_per_image / by[b].ms_per_image:.2f}, "
                f"memory {by[a].peak_mb / max(by[b].peak_mb, 1e-9):.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
