"""``maskteacher config check|reference``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from maskteacher.cli.common import add_config_arguments, config_from_args
from maskteacher.config import REFERENCE_BEGIN, REFERENCE_END, reference_markdown
from maskteacher.errors import UserError


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
    ref.add_argument(
        "--update",
        metavar="FILE",
        default=None,
        help="rewrite the reference between the config-reference markers of FILE (e.g. README.md)",
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
    if args.update:
        path = Path(args.update)
        path.write_text(
            replace_reference_block(path.read_text(), reference_markdown(), source=path)
        )
        print(f"updated the config reference in {path}")
        return 0
    print(reference_markdown(), end="")
    return 0


def replace_reference_block(text: str, reference: str, *, source: Path) -> str:
    """``text`` with the part between the reference markers replaced by ``reference``."""
    if REFERENCE_BEGIN not in text or REFERENCE_END not in text:
        raise UserError(f"{source}: no '{REFERENCE_BEGIN}' ... '{REFERENCE_END}' markers to update")
    head, rest = text.split(REFERENCE_BEGIN, 1)
    _, tail = rest.split(REFERENCE_END, 1)
    return f"{head}{REFERENCE_BEGIN}\n{reference}{REFERENCE_END}{tail}"
