"""The ``neurorewrite`` command: parses arguments, calls the Python API, prints reports.

Each subcommand lives in ``neurorewrite/commands/<name>.py`` with ``register(subparsers)``; its
handler returns an exit code. A :class:`NeurorewriteError` becomes one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

from neurorewrite.errors import NeurorewriteError, NeurorewriteWarning

COMMANDS = ("expand", "convert", "inspect", "finetune", "analyze", "compile", "bench")


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
    with warnings.catch_warnings():
        warnings.simplefilter("default", NeurorewriteWarning)
        # numpy's overflow/invalid-value warnings are multi-line noise: a result they poison is refused
        # by the command's own finite check (one line), and a finite result does not need them
        warnings.simplefilter("ignore", RuntimeWarning)
        shown = warnings.showwarning

        def one_line(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202
            if issubclass(category, NeurorewriteWarning):
                print(f"neurorewrite {args.command}: warning: {message}", file=sys.stderr)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = one_line
        try:
            return int(args.handler(args) or 0)
        except NeurorewriteError as e:
            print(f"neurorewrite {args.command}: error: {e}", file=sys.stderr)
            return e.exit_code
        except MemoryError:
            print(f"neurorewrite {args.command}: error: out of memory; nothing was written (try smaller options)",
                  file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"neurorewrite {args.command}: interrupted; nothing was written", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
