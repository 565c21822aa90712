"""``maskteacher sweep CONFIG --grid KEY=V1,V2 ... --seeds 0,1,2 --out DIR`` and
``maskteacher sweep collect DIR``: repeated fine-tuning from one cache.

Every combination of the ``--variant`` / ``--grid`` overrides trains once per seed (each run in
``DIR/runs/<combination>/seed_<S>``) and is evaluated; ``DIR/results.csv`` and
``DIR/summary.md`` follow. Finished runs are skipped when the command runs again. On a cluster,
a job array runs slice ``--index $SLURM_ARRAY_TASK_ID --count N`` per task, then
``maskteacher sweep collect DIR`` writes the summary of whatever finished. Heavy modules are
imported inside :func:`run`.
"""

from __future__ import annotations

import argparse

EXIT_RUN_FAILED = 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="train + evaluate a grid of config overrides x seeds from one cache; 'sweep collect DIR' summarises",
        description="Repeated fine-tuning: every combination of --variant / --grid overrides of "
        "CONFIG trains once per seed and is evaluated; DIR gets results.csv (one row per run) "
        "and summary.md (mean ± spread per combination, a plot). Finished runs are skipped on a "
        "re-run; a failing run is recorded (error.json) and the others go on. "
        "'maskteacher sweep collect DIR' rebuilds the summary from the run folders.",
    )
    parser.add_argument("config", metavar="CONFIG|collect", help="config file, or 'collect'")
    parser.add_argument("dir", nargs="?", metavar="DIR", help="collect: the sweep folder")
    parser.add_argument("--out", help="sweep folder (runs/, sweep.json, results.csv, summary.md)")
    _combination_arguments(parser)
    parser.add_argument(
        "--seeds", default="0", help="comma-separated train.seed values (default 0)"
    )
    parser.add_argument(
        "--eval",
        dest="evals",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also evaluate on this dataset (repeatable); dataset.val_dataset is 'val'",
    )
    parser.add_argument("--index", type=int, default=0, help="run slice INDEX of --count (0-based)")
    parser.add_argument(
        "--count", type=int, default=1, help="number of slices (a job array's size)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run (default 1: the same figures on every run of the command; "
        "0: torch's default, e.g. for GPU runs)",
    )
    parser.add_argument("--overlays", type=int, default=2, help="overlay pictures per evaluation")
    parser.set_defaults(func=run)


def _combination_arguments(parser: argparse.ArgumentParser) -> None:
    """--set (every run), --grid and --variant (the combinations)."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the base config for every run (as maskteacher train --set; repeatable)",
    )
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="vary a config key over comma-separated values (repeatable: the cartesian product)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        nargs="+",
        default=[],
        metavar="NAME KEY=VALUE",
        help="a named combination of overrides, e.g. --variant dual_kl "
        "mask_teacher.method=dual_supervision mask_teacher.soft_loss.type=kl (repeatable; "
        "combined with every --grid point)",
    )


def _evals(items: list[str]) -> dict[str, str]:
    from maskteacher.errors import UserError

    evals = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--eval {item!r}: expected NAME=PATH, e.g. original=data/val_orig")
        evals[name] = path
    return evals


def _collect(args: argparse.Namespace) -> int:
    from maskteacher.errors import UserError
    from maskteacher.sweep import collect

    if args.dir is None:
        raise UserError(
            "sweep collect: expected the sweep folder, e.g. maskteacher sweep collect runs/sweep"
        )
    results = collect(args.dir)
    print(
        f"collected {len(results.finished())} finished runs ({len(results.missing)} not run yet) "
        f"into {results.out / 'summary.md'}"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    if args.config == "collect":
        return _collect(args)
    from maskteacher.config import load_config
    from maskteacher.errors import UserError
    from maskteacher.sweep import Sweep, collect, expand, parse_grid, parse_variants, run_sweep
    from maskteacher.sweep.grid import parse_seeds, select_slice

    if args.dir is not None:
        raise UserError(f"unexpected argument {args.dir!r} (did you mean --out {args.dir}?)")
    if not args.out:
        raise UserError("sweep: --out DIR is required (the folder that holds the runs)")
    combinations = expand(parse_variants(args.variant), parse_grid(args.grid))
    sweep = Sweep.create(
        load_config(args.config, args.overrides),
        out=args.out,
        combinations=combinations,
        seeds=parse_seeds(args.seeds),
        evals=_evals(args.evals),
        threads=args.threads or None,
        overlays=args.overlays,
    )
    runs = select_slice(sweep.runs(), args.index, args.count)
    done = run_sweep(sweep, runs)
    print(
        f"sweep slice {args.index}/{args.count}: {len(done.finished)} runs finished, "
        f"{len(done.skipped)} skipped (finished earlier), {len(done.failed)} failed"
    )
    if args.count == 1:
        results = collect(sweep.out)
        print(f"summary: {results.out / 'summary.md'}; every run: {results.out / 'results.csv'}")
    else:
        print(f"when every slice has finished: maskteacher sweep collect {sweep.out}")
    return EXIT_RUN_FAILED if done.failed else 0
