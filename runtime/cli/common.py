"""Helpers the subcommands share: loading an op from FILE.py:OP, parsing --shape."""

from __future__ import annotations

from pathlib import Path

from dsl.errors import KdslError
from dsl.loader import load_op  # noqa: F401  (the CLI's op loader)

REPO_ROOT = Path(__file__).resolve().parents[2]


def parse_shape(text: str | None) -> dict[str, int]:
    """``M=128,N=256,K=64`` -> {"M": 128, ...} (the one parser: autotune.shape_keys.parse_shape_arg)."""
    from autotune.shape_keys import parse_shape_arg

    return parse_shape_arg(text) if text else {}


def parse_dtype(name: str):
    import dsl.dtypes as dt

    if name not in dt.ALL:
        raise KdslError(f"unknown dtype '{name}' (choose from {', '.join(dt.ALL)})")
    return dt.ALL[name]


def add_slo_arguments(parser, *, abort_help: str) -> None:
    """The serving SLO (the Past-Future paper's defaults) and whether to drop requests that miss it."""
    parser.add_argument("--slo-ttft", type=float, default=10.0, help="SLO: time to first token in s (default 10)")
    parser.add_argument("--slo-gap", type=float, default=1.5,
                        help="SLO: largest gap between two output tokens in s (default 1.5)")
    parser.add_argument("--abort-missed", action="store_true", help=abort_help)


def slo_from_args(args):
    from runtime.serve.request import SLO

    return SLO(args.slo_ttft, args.slo_gap)
