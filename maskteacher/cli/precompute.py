"""``maskteacher precompute CONFIG``: run the mask teacher once and write the teacher cache."""

from __future__ import annotations

import argparse
from typing import Any

from maskteacher.cli.common import add_config_arguments, config_from_args


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "precompute",
        help="run the mask teacher over the dataset in everything mode and write its cache",
        description=(
            "Writes the teacher cache to mask_teacher.cache_path (or a teachers[] entry's "
            "cache_path with --teacher). Resumable: re-running skips images in finished shards. "
            "Parallel: under torchrun every rank writes its own shards on its own GPU "
            "(LOCAL_RANK); job arrays pass --num-shards/--shard-index (same cache folder, or "
            "one --output per task combined with 'maskteacher cache merge'); one process per "
            "slice of the work: a second one for the same slice is refused. Exit code 1 when "
            "more than precompute.max_failed_fraction of the images failed or --verify found a "
            "mismatch, 2 on bad input, 143 on SIGTERM (the unfinished shard is removed)."
        ),
    )
    add_config_arguments(p)
    _add_work_arguments(p)
    _add_verify_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _add_work_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--teacher",
        metavar="NAME",
        help="precompute for the teachers[] entry NAME (into its cache_path) instead of mask_teacher",
    )
    p.add_argument(
        "--num-shards",
        type=int,
        default=1,
        metavar="N",
        help="job array: number of tasks sharing the work (default 1)",
    )
    p.add_argument(
        "--shard-index",
        type=int,
        default=0,
        metavar="I",
        help="job array: this task's index in [0, N), e.g. $SLURM_ARRAY_TASK_ID (default 0)",
    )
    p.add_argument(
        "--output",
        metavar="DIR",
        help="write the cache here instead of the configured cache_path",
    )
    p.add_argument(
        "--split",
        dest="splits",
        action="append",
        choices=("train", "val"),
        help="only this split (repeatable; default: train, and val when dataset.val_dataset is set)",
    )
    p.add_argument(
        "--limit", type=int, metavar="N", help="only the first N images of each split (a trial run)"
    )


def _add_verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verify",
        type=int,
        default=0,
        metavar="K",
        help="afterwards, re-run the teacher on K random cached images and compare the logits",
    )
    p.add_argument(
        "--verify-seed", type=int, default=0, help="which random images --verify picks (default 0)"
    )
    p.add_argument(
        "--verify-tolerance",
        type=float,
        metavar="LOGITS",
        help="recomputation tolerance on top of the codec bound (default 0.02, 0.5 with bf16)",
    )


def run(args: argparse.Namespace) -> int:
    from maskteacher.precompute import PrecomputeJob, WorkerContext, run_precompute

    job = PrecomputeJob.from_config(
        config_from_args(args),
        teacher=args.teacher,
        output=args.output,
        splits=args.splits,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
        limit=args.limit,
        verify=args.verify,
        verify_seed=args.verify_seed,
        verify_tolerance=args.verify_tolerance,
        progress=not args.no_progress,
    )
    summary = run_precompute(job)
    if WorkerContext.from_env(num_shards=args.num_shards, shard_index=args.shard_index).is_main:
        print(summary.format())
    return summary.exit_code
