"""The ``neurorewrite`` command: parses arguments, calls the Python API, prints reports.

Each subcommand lives in ``neurorewrite/commands/<name>.py`` with ``register(subparsers)``; its
handler returns an exit code. A :class:`NeurorewriteError` becomes one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from neurorewrite.errors import NeurorewriteError

COMMANDS = ("expand", "inspect", "finetune", "analyze", "compile", "bench")


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr and exit 2, like every other error
    (argparse prints the whole usage first); subcommand parsers inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="neurorewrite",
        description="Rewrite the dense MLP blocks of ONNX models into FPE-expanded sparse blocks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"neurorewrite.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except NeurorewriteError as e:
        print(f"neurorewrite {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"neurorewrite {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
