"""``maskteacher data``: ``make-sample`` (write a synthetic dataset) and ``stats`` (summarise and
check a dataset).

Exit codes of ``stats``: 0 when no bad items were found (or ``--skip-bad`` accepts them), 1 when
bad items were found, 2 when the dataset cannot be read at all (the CLI's user-error code).
"""

from __future__ import annotations

import argparse
import json
import typing

from maskteacher.config import DatasetConfig

EXIT_BAD_ITEMS = 1


def dataset_formats() -> tuple[str, ...]:
    """The dataset layouts ``dataset.format`` accepts (the config's Literal), read without
    importing the data readers (they import torch)."""
    hint = typing.get_type_hints(DatasetConfig)["format"]
    return tuple(a for arg in typing.get_args(hint) for a in typing.get_args(arg))


def _make_sample(args: argparse.Namespace) -> int:
    from maskteacher.data import make_sample
    from maskteacher.data.sample_styles import SAMPLE_STYLES
    from maskteacher.errors import UserError

    if args.style not in SAMPLE_STYLES:
        raise UserError(
            f"--style: unknown sample style {args.style!r}; expected one of "
            f"{', '.join(SAMPLE_STYLES)}"
        )
    out = make_sample(
        args.out,
        format=args.format,
        images=args.images,
        seed=args.seed,
        style=args.style,
        unlabelled=args.unlabelled,
    )
    unlabelled = f", {args.unlabelled:g} of the objects unlabelled" if args.unlabelled else ""
    print(
        f"wrote {args.images} {args.format} sample images (style {args.style}, seed "
        f"{args.seed}{unlabelled}) to {out}"
    )
    return 0


def _stats(args: argparse.Namespace) -> int:
    from maskteacher.data import dataset_stats

    stats = dataset_stats(args.root, format=args.format, full=args.full)
    if args.json:
        print(json.dumps(stats.to_dict(), indent=2))
    else:
        print("\n".join(stats.lines()))
    return EXIT_BAD_ITEMS if stats.bad and not args.skip_bad else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("data", help="make sample data, check datasets")
    sub = group.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    make = sub.add_parser(
        "make-sample",
        help="write a small synthetic dataset with exact masks",
        description="Write a small synthetic segmentation dataset (textured shapes on textured "
        "backgrounds, exact instance masks) in the layout of one reader format.",
    )
    make.add_argument("out", help="new (or empty) output folder")
    make.add_argument(
        "--format", choices=dataset_formats(), default="folder", help="layout (default: folder)"
    )
    make.add_argument("--images", type=int, default=8, help="number of images (default: 8)")
    make.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    make.add_argument(
        "--style",
        default="shapes",
        help="look of the shapes and fills: shapes (default), shifted (another domain), mixed "
        "(both kinds, what the demo's teacher learns from)",
    )
    make.add_argument(
        "--unlabelled",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="leave this fraction of each image's objects out of the annotations (default: 0)",
    )
    make.set_defaults(func=_make_sample)

    stats = sub.add_parser(
        "stats",
        help="count images and objects, list image sizes and bad items",
        description="Summarise a dataset: images, objects per image, image sizes, masks that "
        "decode empty, mask files read with an inferred foreground rule, images with an EXIF "
        "orientation tag, and every bad item found (bad annotations counted apart). Exit code "
        "1 when bad items exist (0 with --skip-bad), 2 when unreadable.",
    )
    stats.add_argument("root", help="dataset folder, or COCO instances JSON")
    stats.add_argument("--format", choices=dataset_formats(), default=None, help="default: detect")
    stats.add_argument(
        "--skip-bad", action="store_true", help="bad items are acceptable (skipped): exit 0 anyway"
    )
    stats.add_argument(
        "--full",
        action="store_true",
        help="also decode every image (slow; finds damage header checks miss)",
    )
    stats.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    stats.set_defaults(func=_stats)
