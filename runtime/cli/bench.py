"""`kdsl bench NAME [args...]`: run a benchmark from benchmarks/bench_NAME.py (from a checkout)."""

from __future__ import annotations

import importlib.util
import sys

from dsl.errors import KdslError

from .common import REPO_ROOT

BENCH_DIR = REPO_ROOT / "benchmarks"


def available() -> list[str]:
    return sorted(p.stem[len("bench_"):] for p in BENCH_DIR.glob("bench_*.py"))


def register(sub) -> None:
    names = ", ".join(available()) or "none found"
    p = sub.add_parser("bench", help="run a benchmark (results under benchmarks/results/)",
                       description=f"Run benchmarks/bench_NAME.py. Available: {names}. "
                                   "Arguments after NAME go to the benchmark (NAME --help lists them).")
    p.add_argument("name", metavar="NAME", help=f"benchmark to run ({names})")
    p.add_argument("args", nargs="...", help="arguments for the benchmark")
    p.set_defaults(func=run)


def run(args) -> int:
    path = BENCH_DIR / f"bench_{args.name}.py"
    if not path.is_file():
        raise KdslError(f"unknown benchmark '{args.name}' (available: {', '.join(available()) or 'none'}); "
                        "benchmarks run from a source checkout")
    spec = importlib.util.spec_from_file_location(f"kdsl_bench_{args.name}", path)
    module = importlib.util.module_from_spec(spec)
    # Registered so that worker processes can unpickle the benchmark's own functions.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return int(module.main(list(args.args)) or 0)
