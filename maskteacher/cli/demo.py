"""``maskteacher demo [--out DIR]``: the main job in miniature on built-in sample data;
``maskteacher demo --make-teacher``: re-make the demo's shipped teacher checkpoint."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="run the main job on built-in sample data (under 10 minutes on 2 CPU cores)",
        description="Make sample data (an original domain and a shifted, partly annotated "
        "fine-tuning domain), train a student base, precompute the shipped teacher's cache, "
        "fine-tune the base with gt-only, replace_gt, dual l2 / kl / kl_teacher x 3 seeds from "
        "the cache (one maskteacher sweep), evaluate everything on fully annotated validation "
        "sets of both domains and write report.md. --make-teacher re-makes the teacher.",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default: demo_out; --make-teacher: demo_teacher, its work files)",
    )
    parser.add_argument("--force", action="store_true", help="replace an earlier run in --out")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the first run")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke-test size (well under a minute; every stage and file, meaningless figures)",
    )
    parser.add_argument(
        "--teacher",
        metavar="DIR",
        default=None,
        help="folder of the teacher (teacher.pth + teacher.json; default: the one shipped "
        "with the package); with --make-teacher: where the new teacher is written",
    )
    parser.add_argument(
        "--make-teacher",
        action="store_true",
        help="train the demo teacher by its fixed recipe (about 11 minutes on one CPU thread) "
        "and write it into the package (or --teacher DIR)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    if args.make_teacher:
        from maskteacher.demo.teacher import make_teacher

        teacher = make_teacher(args.out or "demo_teacher", args.teacher, force=args.force)
        print(f"demo teacher: {teacher.checkpoint} (sha256 {teacher.manifest['sha256']})")
        return 0
    from maskteacher.demo import QUICK, DemoSettings
    from maskteacher.demo.report import REAL_COMMANDS
    from maskteacher.demo.run import run_demo

    settings = dataclasses.replace(QUICK if args.quick else DemoSettings(), seed=args.seed)
    result = run_demo(
        args.out or "demo_out", settings=settings, force=args.force, teacher_dir=args.teacher
    )
    total = sum(stage.seconds for stage in result.stages)
    print(f"\ndemo finished in {total:.0f} s; report: {result.report}")
    print("\nThe same pipeline with real checkpoints:\n")
    print(REAL_COMMANDS)
    return 0
