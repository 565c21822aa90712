"""``maskteacher`` command line: ``maskteacher <command> ...``.

Each command group lives in its own module under ``maskteacher.cli`` with a
``register(subparsers)`` function that adds its parser and sets ``func``; :data:`COMMANDS`
lists them in the order ``maskteacher --help`` shows. The modules import only the standard
library, the config and ``cache_format`` at the top; everything heavy (torch, the data
readers, models) is imported inside the function a command runs, so ``--help`` and
``maskteacher cache inspect`` start in a fraction of a second. This module assembles the
parser, runs the chosen command and turns user errors into one line + exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from maskteacher import __version__
from maskteacher.cli import cache, config, data, demo, precompute, sweep, train
from maskteacher.cli import eval as eval_command

#: Command modules, in the order ``maskteacher --help`` lists them.
COMMANDS = (config, data, cache, precompute, train, eval_command, sweep, demo)

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskteacher",
        description="Fine-tune SAM-family students in segment-everything mode with a cached mask teacher.",
    )
    parser.add_argument("--version", action="version", version=f"maskteacher {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
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
        from maskteacher.errors import user_message

        print(f"maskteacher: error: {user_message(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(
            f"maskteacher: {'terminated' if signum == signal.SIGTERM else 'interrupted'}",
            file=sys.stderr,
        )
        return 128 + int(signum)
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
