"""``maskteacher config check|reference``."""

from __future__ import annotations

import argparse
import json

from maskteacher.cli.common import add_config_arguments, config_from_args
from maskteacher.config import reference_markdown


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("config", help="check a config file or print the config reference")
    group = parser.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")

    check = group.add_parser(
        "check", help="validate a config and print it fully resolved (exit 2 on error)"
    )
    add_config_arguments(check)
    check.add_argument(
        "--json", action="store_true", help="print the resolved config as JSON instead of YAML"
    )
    check.set_defaults(func=run_check)

    ref = group.add_parser(
        "reference", help="print every config key with its type, default and meaning (Markdown)"
    )
    ref.set_defaults(func=run_reference)


def run_check(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    print(
        json.dumps(cfg.to_dict(), indent=2) if args.json else cfg.to_yaml(),
        end="" if not args.json else "\n",
    )
    return 0


def run_reference(args: argparse.Namespace) -> int:
    print(reference_markdown(), end="")
    return 0
