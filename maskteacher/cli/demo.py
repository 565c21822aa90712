"""``maskteacher demo [--out DIR]``: the whole pipeline on built-in sample data."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="run the whole pipeline on built-in sample data (a few minutes on 2 CPU cores)",
        description="Make sample data, train a small teacher on its ground truth, precompute the "
        "teacher cache, train students with gt-only, replace_gt, dual l2 and dual kl from the "
        "cache, evaluate them and write report.md.",
    )
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--force", action="store_true", help="replace an earlier demo run in --out")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and all runs")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke-test size (a minute; every stage and file, meaningless figures)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from maskteacher.demo import QUICK, REAL_COMMANDS, DemoSettings, run_demo

    settings = dataclasses.replace(QUICK if args.quick else DemoSettings(), seed=args.seed)
    result = run_demo(args.out, settings=settings, force=args.force)
    total = sum(stage.seconds for stage in result.stages)
    print(f"\ndemo finished in {total:.0f} s; report: {result.report}")
    print("\nThe same pipeline with real checkpoints:\n")
    print(REAL_COMMANDS)
    return 0
