"""``maskteacher eval CONFIG --checkpoint CKPT [--out DIR]``."""

from __future__ import annotations

import argparse
import json
import math

from maskteacher.cli.common import add_config_arguments, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval",
        help="everything-mode evaluation of a student checkpoint (metrics.json, CSV, overlay PNGs)",
        description="Run the student in everything mode (grid prompts, the precompute section's "
        "filters) on the validation set and compare with ground truth and, when "
        "mask_teacher.cache_path holds the split, with the cached teacher.",
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--checkpoint", required=True, help="last.pt / best.pt or an exported state_dict"
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default: <model.save_path>/eval)"
    )
    parser.add_argument(
        "--split", default="val", choices=("val", "train"), help="which dataset to evaluate"
    )
    parser.add_argument(
        "--overlays", type=int, default=4, help="overlay PNGs for the first K images"
    )
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--device", default=None, help="override train.device (auto, cpu, cuda:N)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from maskteacher.eval.run import evaluate_checkpoint

    cfg = config_from_args(args)
    out = Path(args.out) if args.out else Path(cfg.model.save_path) / "eval"
    metrics = evaluate_checkpoint(
        cfg,
        args.checkpoint,
        out,
        split=args.split,
        overlays=args.overlays,
        limit=args.limit,
        device=args.device,
    )
    summary = {
        k: (None if isinstance(v, float) and math.isnan(v) else v)
        for k, v in metrics.summary().items()
    }
    print(json.dumps(summary, indent=2))
    print(
        f"wrote {out / 'metrics.json'}, {out / 'per_image.csv'} and overlays in {out / 'overlays'}"
    )
    return 0
