"""Everything-mode generation speed: the speed options and the hierarchical strategy vs our grid.

Same teacher, same images, one run, each row the best of --rounds timed passes (interleaved)
after a warm-up:

  options     generate_everything with the default settings (fp32, grid) vs sdpa, bf16 (CUDA or
              --bf16), bf16 + sdpa, and with --compile the last of those + compile (the compile
              itself happens in the warm-up): ms/image, ratio, largest logit difference to the
              default (the same prompts, so the same masks up to float rounding). The mask
              upscaling needs no channels-last option: the transformer's output it reads is a
              channels-last view already.
  encoder     the ViT encoder alone with segment-anything's Attention vs SDPA: ms/image and the
              max abs difference of the embeddings
  strategies  grid vs hierarchical (stride --stride, each --logit-thresh): decoder prompts per
              image, ms/image, masks per image and agreement: the share of the grid's masks
              that have a hierarchical mask at IoU >= 0.9 in the original frame (and vice versa)

The teacher: ``--teacher CKPT`` (weights for ``--model``), or ``--train-teacher DIR``: the demo's
teacher stage (``maskteacher.demo.teacher_config``: vit_t_tiny @128 trained from random weights
on 48 sample images for 60 epochs on the ground truth, ~3 min on 2 CPU cores), kept in DIR and
reused by later runs; without either, a random-weight teacher calibrated like
``bench/precompute.py`` does (SAM-like logits and thresholds; its masks mean little, so use
its agreement figure for plumbing only). The images are sample data (seed 1000, unseen in
training) at the teacher's image size.

    python bench/generation.py --train-teacher /tmp/demo_teacher      # CPU, the acceptance run
    python bench/generation.py --device cuda --model vit_h --image-size 1024 --bf16 --compile
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from maskteacher.data import generate_sample, to_model_input
from maskteacher.models import build_sam
from maskteacher.models.everything import encode_images, generate_everything, lowres_to_masks


def train_teacher(folder: Path, prompts: str = "gt") -> Path:
    """The demo's teacher stage in ``folder`` (reused when its export exists); ``prompts``:
    the demo's ``gt`` (object points only) or ``mixed`` (grid points too, so that prompts on
    the background learn a low predicted IoU through the cls term)."""
    from maskteacher.config import config_from_dict
    from maskteacher.data import make_sample
    from maskteacher.demo import DemoSettings, teacher_config
    from maskteacher.train import train

    settings = DemoSettings()
    run = folder / "runs" / ("teacher" if prompts == "gt" else f"teacher_{prompts}")
    export = run / "student_official.pth"
    if export.is_file():
        return export
    if not (folder / "data" / "train").is_dir():
        make_sample(
            folder / "data" / "train", format="folder", images=settings.train_images, seed=0
        )
    raw = teacher_config(folder, settings)
    raw["dataset"]["val_dataset"] = None
    raw["model"]["save_path"] = str(run)
    raw["train"]["prompt_source"] = prompts
    result = train(config_from_dict(raw))
    return Path(result.export_path)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 2):
    """(best seconds of ``repeats`` calls after one warm-up, the last result)."""
    return interleaved({"fn": fn}, device, repeats)["fn"]


def interleaved(fns: dict, device: torch.device, rounds: int = 3) -> dict:
    """name -> (best seconds, last result) of each function: one warm-up call each, then
    ``rounds`` rounds calling each once in turn (load from other processes hits them alike)."""
    results = {name: fn() for name, fn in fns.items()}
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            results[name] = fn()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: (best[name], results[name]) for name in fns}


def generate(model, batch, settings: dict):
    """generate_everything over ``batch`` (model inputs, input_hw, orig_hw), outputs on the CPU."""
    images, input_hw, orig_hw = batch
    outs = generate_everything(model, images, input_hw, orig_hw, **settings)
    return [o.to("cpu") for o in outs]


def masks_agreement(want: list, got: list, batch, image_size: int) -> tuple[float, float]:
    """Share of ``want``'s masks with a ``got`` mask at IoU >= 0.9 (original frame), and the
    reverse; an empty mask (no pixel left after upsampling) matches an empty mask."""
    found = [0, 0]
    totals = [0, 0]
    for a, b, hw, og in zip(want, got, batch[1], batch[2]):
        ma, mb = (
            lowres_to_masks(o.logits, image_size=image_size, input_hw=hw, orig_hw=og)
            .flatten(1)
            .float()
            for o in (a, b)
        )
        totals[0] += len(ma)
        totals[1] += len(mb)
        if len(ma) and len(mb):
            inter = ma @ mb.T
            union = ma.sum(1)[:, None] + mb.sum(1)[None] - inter
            iou = torch.where(union > 0, inter / union.clamp(min=1), 1.0)  # two empty masks agree
            found[0] += int((iou.max(1).values >= 0.9).sum())
            found[1] += int((iou.max(0).values >= 0.9).sum())
    return found[0] / max(totals[0], 1), found[1] / max(totals[1], 1)


def option_rows(model, batch, base: dict, args, device) -> list[str]:
    """Each speed option alone, then all together (with bf16 on CUDA or with --bf16); the
    compiled decoder only in the last row (one compile: a compile per dtype / layout would
    cost minutes)."""
    variants = {"default": {}, "sdpa": {"sdpa": True}}
    together, name = {"sdpa": True}, "sdpa"
    if device.type == "cuda" or args.bf16:
        variants["bf16"] = {"bf16": True}
        together["bf16"] = True
        name = "bf16 + sdpa"
        variants[name] = dict(together)
    if args.compile:
        variants[name + " + compile"] = {**together, "compile": True}
    n = len(batch[1])
    runs = interleaved(
        {name: (lambda extra=extra: generate(model, batch, {**base, **extra}))
         for name, extra in variants.items()},
        device, args.rounds,
    )  # fmt: skip
    base_s, want = runs["default"]
    rows = []
    for name, (seconds, outs) in runs.items():
        same = all(len(a) == len(b) for a, b in zip(outs, want))
        diff = max(
            (float((a.logits - b.logits).abs().max()) for a, b in zip(outs, want) if len(a) == len(b) and len(a)),
            default=0.0,
        )  # fmt: skip
        rows.append(
            f"| {name} | {1000 * seconds / n:.0f} | {base_s / seconds:.2f}x | "
            f"{'same' if same else 'differ'} | {diff:.1e} |"
        )
    return rows


def encoder_row(model, batch, device, rounds: int) -> str:
    from maskteacher.models.attention import sdpa_attention
    from maskteacher.models.features import encode_features

    images, input_hw, _ = batch
    hw = torch.tensor(input_hw)
    with sdpa_attention(model.image_encoder) as swapped:
        if not swapped:
            return (
                f"encoder: {type(model.image_encoder).__name__} has no segment-anything Attention"
            )
    runs = interleaved(
        {
            "original": lambda: encode_images(model, images, hw),
            "sdpa": lambda: encode_features(model, images, hw, sdpa=True, with_hq=False).embeddings,
        },
        device,
        rounds,
    )
    (t0, e0), (t1, e1) = runs["original"], runs["sdpa"]
    n = len(input_hw)
    return (
        f"encoder, segment-anything Attention {1000 * t0 / n:.0f} ms/image vs SDPA "
        f"{1000 * t1 / n:.0f} ms/image (**{t0 / t1:.2f}x**), max abs diff "
        f"{float((e1 - e0).abs().max()):.1e} (embeddings up to {float(e0.abs().max()):.1f})"
    )


def strategy_rows(model, batch, base: dict, args, device) -> list[str]:
    """grid, grid in other chunks (the agreement's noise floor: batching changes logits in the
    last bits, which flips candidates at the filters' and NMS's thresholds), hierarchical."""
    n = len(batch[1])
    variants = {"grid": base, "grid, points_per_batch 100": {**base, "points_per_batch": 100}}
    for thresh in args.logit_thresh:
        variants[f"hierarchical, stride {args.stride}, logit > {thresh:g}"] = {
            **base, "strategy": "hierarchical", "hierarchical_stride": args.stride,
            "hierarchical_logit_thresh": thresh,
        }  # fmt: skip
    runs = interleaved(
        {name: (lambda s=s: generate(model, batch, s)) for name, s in variants.items()},
        device,
        args.rounds,
    )
    grid_s, grid = runs["grid"]
    rows = []
    for name, (seconds, outs) in runs.items():
        prompts = sum(o.decoded_prompts for o in outs) / n
        found, back = masks_agreement(grid, outs, batch, args.image_size)
        rows.append(
            f"| {name} | {prompts:.0f} | {1000 * seconds / n:.0f} | {grid_s / seconds:.2f}x | "
            f"{sum(map(len, outs)) / n:.1f} | {found:.1%} / {back:.1%} |"
        )
    return rows


def load_teacher(args, device: torch.device, images: list) -> tuple[torch.nn.Module, dict, str]:
    """(teacher, generation settings, description) per the module docstring."""
    settings = {
        "points_per_side": args.points_per_side,
        "points_per_batch": args.points_per_batch,
        "multimask_output": args.multimask,
    }
    if args.teacher or args.train_teacher:
        path = (
            Path(args.teacher)
            if args.teacher
            else train_teacher(Path(args.train_teacher), args.train_prompts)
        )
        model = build_sam(args.model, path, image_size=args.image_size).to(device).eval()
        # the demo's precompute thresholds for its teacher (--pred-iou-thresh: its IoU filter)
        settings.update(
            pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=0.3, box_nms_thresh=0.7
        )
        return model, settings, f"trained {args.model} ({path})"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from random_teacher import build_teacher, calibrate  # bench/random_teacher.py

    model, factor = build_teacher(args, device, images[0])
    th = calibrate(model, images, args, device)
    settings.update(
        pred_iou_thresh=th.pred_iou_thresh,
        stability_score_thresh=th.stability_score_thresh,
        box_nms_thresh=th.box_nms_thresh,
    )
    return model, settings, f"random-weight {args.model}, calibrated (mask head x{factor:.3g})"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="vit_t_tiny")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--teacher", default=None, help="teacher weights for --model")
    p.add_argument("--train-teacher", default=None, help="folder: train the demo's teacher there")
    p.add_argument(
        "--train-prompts", default="gt", choices=["gt", "mixed"], help="the trained teacher's"
    )
    p.add_argument("--pred-iou-thresh", type=float, default=0.0, help="trained teacher's filter")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--points-per-side", type=int, default=32)
    p.add_argument("--points-per-batch", type=int, default=256)
    p.add_argument("--multimask", action="store_true", help="3 masks per prompt (SAM's default)")
    p.add_argument("--stride", type=int, default=4, help="hierarchical_stride")
    p.add_argument("--logit-thresh", type=float, nargs="+", default=[8.5, 4.0, 2.0])
    p.add_argument("--compile", action="store_true", help="also time compile=True")
    p.add_argument("--bf16", action="store_true", help="also time bf16 (always on CUDA)")
    p.add_argument("--skip", nargs="*", default=[], choices=["options", "encoder", "strategies"])
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (best of)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--masks", type=int, default=100, help="random teacher: calibration target")
    p.add_argument("--logit-std", type=float, default=8.0, help="random teacher: logit spread")
    args = p.parse_args(argv)
    args.keep_upscaling = False  # bench/precompute.py's calibration reads these two
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    start = time.perf_counter()
    samples = generate_sample(args.images, 1000, size_range=(args.image_size, 2 * args.image_size))
    images = [s.image for s in samples]
    model, base, what = load_teacher(args, device, images)
    inputs = [to_model_input(image, args.image_size) for image in images]
    batch = (
        torch.stack([x for x, _ in inputs]).to(device),
        [hw for _, hw in inputs],
        [image.shape[:2] for image in images],
    )
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"teacher: {what}; image_size {args.image_size}; {args.images} sample images; {where}, "
          f"{torch.get_num_threads()} threads; grid {args.points_per_side}^2, multimask "
          f"{args.multimask}; settings {base}")  # fmt: skip
    if "options" not in args.skip:
        print("\n| generator settings | ms/image | speed vs default | masks | max logit diff |")
        print("|---|---|---|---|---|")
        print("\n".join(option_rows(model, batch, base, args, device)))
    if "encoder" not in args.skip:
        print("\n" + encoder_row(model, batch, device, args.rounds))
    if "strategies" not in args.skip:
        print("\n| strategy | prompts/image | ms/image | speed vs grid | masks/image | "
              "grid masks found / hierarchical masks in grid (IoU >= 0.9) |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        print("\n".join(strategy_rows(model, batch, base, args, device)))
    print(f"\nbench wall time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.exit(main())
