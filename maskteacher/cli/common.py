"""Arguments shared by every command that reads a config: ``CONFIG`` and ``--set KEY=VALUE``."""

from __future__ import annotations

import argparse

from maskteacher.config import Config, load_config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="config file (.yaml, .yml or .json)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=1e-4 --set mask_teacher.cache_path=null "
        "(values are parsed as YAML scalars; repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)
