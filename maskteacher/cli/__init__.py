"""``maskteacher`` command line: ``maskteacher <command> ...``.

Each command group lives in its own module under ``maskteacher.cli`` with a
``register(subparsers)`` function that adds its parser and sets ``func``. This module only
assembles them, runs the chosen one and turns user errors into one line + exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from maskteacher import __version__

# Command modules, in the order ``maskteacher --help`` lists them.
COMMAND_MODULES = ("config", "data", "cache", "precompute", "train", "eval", "sweep", "demo")

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskteacher",
        description="Fine-tune SAM-family students in segment-everything mode with a cached mask teacher.",
    )
    parser.add_argument("--version", action="version", version=f"maskteacher {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(f"maskteacher.cli.{name}") is not None:
            importlib.import_module(f"maskteacher.cli.{name}").register(sub)
    return parser


def _user_error_types() -> tuple[type[BaseException], ...]:
    from maskteacher.cache_format.errors import CacheError
    from maskteacher.errors import UserError

    return (UserError, CacheError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        code = args.func(args)
    except _user_error_types() as exc:
        print(f"maskteacher: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("maskteacher: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
