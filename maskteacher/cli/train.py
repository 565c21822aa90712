"""``maskteacher train CONFIG [--set KEY=VALUE ...]``: fine-tune a student.

Runs on one process or under ``torchrun --nproc-per-node N -m maskteacher.cli train CONFIG``
(DDP). Bad input is one line and exit code 2 (handled by ``maskteacher.cli.main``).
"""

from __future__ import annotations

import argparse

from maskteacher.cli.common import add_config_arguments, config_from_args


def _train(args: argparse.Namespace) -> int:
    from maskteacher.train import train

    result = train(config_from_args(args))
    if result.is_main:
        best = "n/a" if result.best_metric is None else f"{result.best_metric:.4f}"
        stop = " (early stop)" if result.stopped_early else ""
        print(
            f"trained {result.epochs_done} epoch(s){stop}; best validation IoU {best}; "
            f"run folder {result.save_dir}; exported {result.export_path}"
        )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a student (everything or single mode), DDP under torchrun",
        description="Train a SAM-family student as the config says: checkpoints (last.pt, "
        "best.pt), TensorBoard logs and the resolved config go to model.save_path; the final "
        "student is exported as an official-format state dict. train.resume: true continues.",
    )
    add_config_arguments(parser)
    parser.set_defaults(func=_train)
