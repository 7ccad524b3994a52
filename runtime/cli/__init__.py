"""The `kdsl` command: one entry, one module per subcommand under runtime/cli/.

Each subcommand module exposes ``register(subparsers)``; it adds its parser and sets
``func(args) -> int``. Errors kdsl raises on purpose become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dsl.errors import KdslError

# Order is the order of `kdsl --help`.
SUBCOMMANDS = ["show", "demo", "tune", "db", "bench", "data", "train", "report", "serve", "simulate"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints usage; keep it to one actionable line
        self.exit(2, f"kdsl: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdsl", description="kdsl: a kernel-DSL compiler with an autotuning database.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"runtime.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"runtime.cli.{name}":
                continue  # subcommand not built yet in this checkout
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KdslError as exc:
        print(f"kdsl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdsl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
