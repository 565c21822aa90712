"""Everything-mode teacher generation: our generator vs segment-anything's SamAutomaticMaskGenerator.

Same teacher weights, same images, same grid / batch / thresholds, in one run:

  reference   SamAutomaticMaskGenerator(crop_n_layers=0).generate(image) per image (fp32):
              full-resolution masks, stability, boxes and RLE on every candidate that passes
              the IoU filter, binary masks out
  ours        to_model_input + generate_everything on batches of --batch images, outputs
              copied to the host (what precompute writes), fp32 and (on CUDA) bf16 autocast
  pipeline    the whole precompute job on the same images saved as a folder dataset:
              DataLoader decode + resize, generation, int8 encoding + zstd + zarr shards in the
              background writer (generation-phase images/s from its summary)

The teacher has random weights (no internet, no checkpoint). Their mask logits are ~0.03 in
size, where every stability score is 0, so the mask head is scaled to a SAM-like logit spread
(std ``--logit-std``, default 8), the IoU head is centred on 0.5, and the random 2x2
transposed-conv kernels of the mask upscaling are replaced by their mean over the taps (random
kernels stamp a checkerboard into every mask, which trained kernels do not). Thresholds are then calibrated so that about ``--masks``
(100) masks per image survive, as a real SAM-H does on SA-1B photos: stability_score_thresh
stays 0.95 while enough candidates pass it, pred_iou_thresh is the value that keeps ~100 masks
per image. Random weights give image-wide masks whose boxes coincide, so box NMS at 0.7 would
keep one or two; when it would keep fewer than half the target, box_nms_thresh is set to 1.0
(printed). The reference then RLE-encodes and decodes ~100 masks per image, fewer than a real
SAM-H run (which also encodes the duplicates that NMS removes later), so the ratio is
conservative. Agreement: share of the reference's masks that have one of ours at IoU >= 0.9
in the original frame, and vice versa.

SAM-HQ teachers (``--model vit_b_tiny_hq``, ``vit_h_hq``, ...) are compared with
segment-anything-hq's own SamAutomaticMaskGenerator (its default ``hq_token_only=False``); the
HQ token's mask head and the HQ feature path's transposed convolutions get the same treatment.
``--vs-sam`` then also times our generator with the SAM type of the same backbone, calibrated
the same way, and prints the cost ratio SAM-HQ / SAM at the same image size (interleaved runs,
best of two each).

    python bench/precompute.py                  # CPU, tiny teacher (vit_b_tiny, 256), ~2 min
    python bench/precompute.py --device cuda --model vit_h --image-size 1024   # GPU, < 5 min
    python bench/precompute.py --model vit_b_tiny_hq --vs-sam   # CPU, SAM-HQ vs its reference
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator

from maskteacher.cache_format import Codec, StoreFlags
from maskteacher.data import generate_sample, to_model_input
from maskteacher.models import HQ_VARIANTS, is_hq_model
from maskteacher.models.everything import generate_everything, lowres_to_masks
from maskteacher.precompute import (
    GenerationParams,
    PrecomputeJob,
    SplitSource,
    TeacherSpec,
    run_precompute,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_teacher import build_teacher, calibrate  # noqa: E402  (bench/random_teacher.py)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_generator(model: torch.nn.Module, **kwargs):
    """segment-anything's SamAutomaticMaskGenerator, or segment-anything-hq's for SAM-HQ."""
    if not is_hq_model(model):
        return SamAutomaticMaskGenerator(model, **kwargs)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's deprecation warnings
        from segment_anything_hq import SamAutomaticMaskGenerator as HQMaskGenerator
    return HQMaskGenerator(model, **kwargs)


def run_reference(model, images, kwargs) -> tuple[float, list[torch.Tensor]]:
    generator = reference_generator(model, crop_n_layers=0, output_mode="binary_mask", **kwargs)
    device = model.pixel_mean.device
    generator.generate(images[0])  # warm-up
    sync(device)
    start = time.perf_counter()
    results = [generator.generate(image) for image in images]
    sync(device)
    seconds = time.perf_counter() - start
    masks = [
        torch.from_numpy(np.stack([a["segmentation"] for a in anns]))
        if anns
        else torch.zeros(0, *image.shape[:2], dtype=torch.bool)
        for anns, image in zip(results, images)
    ]
    return seconds, masks


def run_ours(model, images, kwargs, args, *, bf16: bool) -> tuple[float, list]:
    device = model.pixel_mean.device

    def batch_outputs(batch):
        inputs = [to_model_input(image, args.image_size) for image in batch]
        outs = generate_everything(
            model,
            torch.stack([x for x, _ in inputs]).to(device, non_blocking=True),
            [hw for _, hw in inputs],
            [image.shape[:2] for image in batch],
            bf16=bf16,
            **kwargs,
        )
        return [(o.to("cpu"), hw) for o, (_, hw) in zip(outs, inputs)]

    batch_outputs(images[: args.batch])  # warm-up (kernels for these shapes)
    sync(device)
    start = time.perf_counter()
    outputs = []
    for i in range(0, len(images), args.batch):
        outputs.extend(batch_outputs(images[i : i + args.batch]))
    sync(device)
    return time.perf_counter() - start, outputs


def run_pipeline(model, images, kwargs, args, device, folder: Path) -> tuple[float, int]:
    """The precompute job on the images saved as a folder dataset (no ground truth)."""
    data = folder / "data"
    (data / "image").mkdir(parents=True)
    (data / "mask").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(data / "image" / f"img_{i:04d}.png", compress_level=1)
    ckpt = folder / "teacher.pt"
    torch.save(model.state_dict(), ckpt)
    job = PrecomputeJob(
        cache_path=str(folder / "cache"),
        teacher=TeacherSpec(args.model, str(ckpt), args.image_size),
        splits=[SplitSource("train", str(data), format="folder")],
        generation=GenerationParams(**kwargs, bf16=args.device == "cuda"),
        store=StoreFlags(teacher=True, gt=False),
        codec=Codec("int8"),
        shard_size=max(args.batch, len(images) // 2),
        batch_size=args.batch,
        num_workers=args.workers,
        device=str(device),
        progress=False,
    )
    summary = run_precompute(job)
    return summary.generate_s, summary.masks


def agreement(ref: list[torch.Tensor], ours: list, image_size: int, device) -> tuple[float, float]:
    found_ref = found_ours = total_ref = total_ours = 0
    for r, (out, hw) in zip(ref, ours):
        mine = lowres_to_masks(
            out.logits.to(device), image_size=image_size, input_hw=hw, orig_hw=r.shape[1:]
        )
        if len(r) == 0 or len(mine) == 0:
            total_ref, total_ours = total_ref + len(r), total_ours + len(mine)
            continue
        a = r.to(device).reshape(len(r), -1).float()
        b = mine.reshape(len(mine), -1).float()
        inter = a @ b.T
        iou = inter / (a.sum(1)[:, None] + b.sum(1)[None, :] - inter).clamp(min=1)
        found_ref += int((iou.max(1).values >= 0.9).sum())
        found_ours += int((iou.max(0).values >= 0.9).sum())
        total_ref, total_ours = total_ref + len(r), total_ours + len(mine)
    return found_ref / max(total_ref, 1), found_ours / max(total_ours, 1)


def hq_over_sam(args, images, device, hq_model, hq_kwargs) -> tuple[float, float, float, str]:
    """Our generator with the SAM type of ``args.model``'s backbone, calibrated alike, timed
    interleaved with the SAM-HQ teacher (best of two each): (HQ s, SAM s, SAM masks, SAM type)."""
    sam_type = next((sam for sam, hq in HQ_VARIANTS.items() if hq == args.model), None)
    if sam_type is None:
        raise SystemExit(f"--vs-sam needs a SAM-HQ --model, got {args.model}")
    sam_model, _ = build_teacher(args, device, images[0], sam_type)
    th = calibrate(sam_model, images, args, device)
    names = ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh")
    sam_kwargs = {**hq_kwargs, **{k: getattr(th, k) for k in names}}
    hq_s, sam_s = [], []
    for _ in range(2):
        seconds, sam_out = run_ours(sam_model, images, sam_kwargs, args, bf16=False)
        sam_s.append(seconds)
        hq_s.append(run_ours(hq_model, images, hq_kwargs, args, bf16=False)[0])
    return min(hq_s), min(sam_s), sum(len(o) for o, _ in sam_out), sam_type


def generation_tables(model, images, kwargs, args, device) -> None:
    """bench/generation.py's speed-option, encoder and strategy tables (``--extra``)."""
    import generation  # bench/generation.py, beside this file

    inputs = [to_model_input(image, args.image_size) for image in images]
    batch = (torch.stack([x for x, _ in inputs]).to(device), [hw for _, hw in inputs],
             [image.shape[:2] for image in images])  # fmt: skip
    gen_args = argparse.Namespace(
        compile=args.compile, bf16=device.type == "cuda", rounds=2, stride=4,
        logit_thresh=[8.5, 4.0], points_per_side=args.points_per_side, image_size=args.image_size,
    )  # fmt: skip
    if "options" in args.extra:
        print("\n| generator settings | ms/image | speed vs default | masks | max logit diff |")
        print("|---|---|---|---|---|\n" + "\n".join(
            generation.option_rows(model, batch, kwargs, gen_args, device)))  # fmt: skip
    if "encoder" in args.extra:
        print("\n" + generation.encoder_row(model, batch, device, gen_args.rounds))
    if "strategies" in args.extra:
        print(
            "\n| strategy | prompts/image | ms/image | speed vs grid | masks/image | grid masks "
            "found / hierarchical masks in grid (IoU >= 0.9) |\n|---|---|---|---|---|---|"
        )
        print("\n".join(generation.strategy_rows(model, batch, kwargs, gen_args, device)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="vit_b_tiny", help="registry name (vit_h for the real thing)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--images", type=int, default=None, help="default: 3 (cpu), 8 (cuda)")
    p.add_argument("--min-side", type=int, default=None, help="default: 320 (cpu), 1200 (cuda)")
    p.add_argument("--max-side", type=int, default=None, help="default: 480 (cpu), 1600 (cuda)")
    p.add_argument("--points-per-side", type=int, default=32)
    p.add_argument("--points-per-batch", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="images per generate_everything call")
    p.add_argument("--masks", type=int, default=100, help="calibration target per image")
    p.add_argument("--logit-std", type=float, default=8.0)
    p.add_argument(
        "--keep-upscaling",
        action="store_true",
        help="keep the random transposed-conv kernels (checkerboard masks)",
    )
    p.add_argument("--workers", type=int, default=2, help="pipeline DataLoader workers")
    p.add_argument("--no-pipeline", action="store_true", help="skip the full-job row")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1 on CPU: on shared cores, OpenMP barriers with 2 "
        "threads slow down up to 10x whenever other processes take a core)",
    )
    p.add_argument(
        "--vs-sam",
        action="store_true",
        help="with a SAM-HQ --model: also time its SAM type and print the cost ratio",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="also print the figures as JSON")
    p.add_argument(
        "--extra",
        nargs="*",
        default=[],
        choices=["options", "encoder", "strategies"],
        help="also bench/generation.py's tables on this teacher, images and thresholds",
    )
    p.add_argument("--compile", action="store_true", help="--extra options: also compile=True")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.images = args.images or (8 if cuda else 3)
    args.min_side = args.min_side or (1200 if cuda else 320)
    args.max_side = args.max_side or (1600 if cuda else 480)
    device = torch.device(args.device)
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    t0 = time.perf_counter()

    samples = generate_sample(args.images, args.seed, size_range=(args.min_side, args.max_side))
    images = [s.image for s in samples]
    model, factor = build_teacher(args, device, images[0])
    th = calibrate(model, images, args, device)
    kwargs = {
        "points_per_side": args.points_per_side,
        "points_per_batch": args.points_per_batch,
        "pred_iou_thresh": th.pred_iou_thresh,
        "stability_score_thresh": th.stability_score_thresh,
        "stability_score_offset": 1.0,
        "box_nms_thresh": th.box_nms_thresh,
    }
    # ours before and after the reference, best of the two (the reference takes long enough
    # for other load on the machine to change)
    ours_s, ours_out = run_ours(model, images, kwargs, args, bf16=False)
    ref_s, ref_masks = run_reference(model, images, kwargs)
    ours_s = min(ours_s, run_ours(model, images, kwargs, args, bf16=False)[0])
    rows = [
        ("SamAutomaticMaskGenerator (crop_n_layers=0), fp32", ref_s, sum(map(len, ref_masks))),
        ("ours: generate_everything, fp32", ours_s, sum(len(o) for o, _ in ours_out)),
    ]
    ratios = {"fp32": ref_s / ours_s}
    if cuda:
        bf16_s, bf16_out = run_ours(model, images, kwargs, args, bf16=True)
        rows.append(("ours: generate_everything, bf16", bf16_s, sum(len(o) for o, _ in bf16_out)))
        ratios["bf16"] = ref_s / bf16_s
    if not args.no_pipeline:
        with tempfile.TemporaryDirectory() as tmp:
            pipe_s, pipe_masks = run_pipeline(model, images, kwargs, args, device, Path(tmp))
        label = "ours: precompute job (loader + generator + cache writer)" + (
            ", bf16" if cuda else ""
        )
        rows.append((label, pipe_s, pipe_masks))
        ratios["pipeline"] = ref_s / pipe_s
    ref_found, ours_found = agreement(ref_masks, ours_out, args.image_size, device)
    vs_sam = hq_over_sam(args, images, device, model, kwargs) if args.vs_sam else None

    n = len(images)
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name(device) if cuda else f"cpu, {threads} threads"
    sizes = f"{min(i.shape[0] for i in images)}-{max(max(i.shape[:2]) for i in images)} px"
    print(
        f"teacher {args.model} (random weights, mask head x{factor:.3g} -> logit std "
        f"{args.logit_std:g}), image_size {args.image_size}, {n} images ({sizes}), {where}"
    )
    print(
        f"grid {args.points_per_side}x{args.points_per_side}, points_per_batch "
        f"{args.points_per_batch}, batch {args.batch} images; calibrated: pred_iou_thresh "
        f"{th.pred_iou_thresh:.4f}, stability_score_thresh {th.stability_score_thresh:.4f}, "
        f"box_nms_thresh {th.box_nms_thresh:g}"
    )
    if th.note:
        print(f"  ({th.note})")
    print()
    print("| generator | images/s | ms/image | masks/image | speed vs reference |")
    print("|---|---|---|---|---|")
    for label, seconds, masks in rows:
        print(
            f"| {label} | {n / seconds:.3f} | {1000 * seconds / n:.0f} | {masks / n:.1f} | "
            f"{ref_s / seconds:.2f}x |"
        )
    print()
    print(
        f"agreement (IoU >= 0.9, original frame): {ref_found:.1%} of reference masks found in "
        f"ours, {ours_found:.1%} of ours found in the reference"
    )
    if vs_sam is not None:
        hq_s, sam_s, sam_masks, sam_type = vs_sam
        ratios["hq_over_sam"] = hq_s / sam_s
        print(
            f"SAM-HQ / SAM cost of our generator at image_size {args.image_size}: "
            f"{args.model} {1000 * hq_s / n:.0f} ms/image vs {sam_type} {1000 * sam_s / n:.0f} "
            f"ms/image ({sam_masks / n:.1f} masks/image): **{hq_s / sam_s:.2f}x**"
        )
    if args.extra:
        generation_tables(model, images, kwargs, args, device)
    print(f"bench wall time {time.perf_counter() - t0:.0f} s")
    if args.json:
        print(
            json.dumps(
                {
                    "rows": [
                        {"generator": label, "seconds": s, "images": n, "masks": m}
                        for label, s, m in rows
                    ],
                    "ratios": ratios,
                    "agreement": {"reference_found": ref_found, "ours_found": ours_found},
                    "thresholds": th.__dict__,
                }
            )
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.exit(main())
