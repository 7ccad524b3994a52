"""`kdsl demo`: compile the example ops and check both backends against PyTorch."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="compile the example ops, run them, check them against PyTorch",
                       description="Compiles kdsl's example ops (dense GEMM epilogues, norms, MoE, "
                                   "attention, quantized GEMM), runs each through the triton backend "
                                   "(Triton's interpreter on a CPU-only machine) and the torch backend, "
                                   "and prints the max error against an independent PyTorch computation.")
    p.add_argument("--backend", choices=["both", "triton", "torch"], default="both",
                   help="which backends to run (default both)")
    p.add_argument("--only", default=None, help="run only the examples whose name contains this text")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from runtime.demo import collect_cases, run_demo

    backends = ("triton", "torch") if args.backend == "both" else (args.backend,)
    console = Console()
    n = len([c for c in collect_cases() if args.only is None or args.only in c[0]]) * len(backends)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("compiling and checking", total=n)
        results, _ = run_demo(backends, args.only, progress=lambda: progress.advance(task))
    table = Table(title="kdsl demo")
    for col in ("op", "backend", "kernels", "max rel. error", "first call (incl. compile)"):
        table.add_column(col)
    for r in results:
        table.add_row(r.name, r.backend, r.kernels, f"{r.max_error:.2e}" + ("" if r.ok else " FAIL"),
                      f"{r.seconds * 1e3:.1f} ms")
    console.print(table)
    failed = [r for r in results if not r.ok]
    if failed:
        console.print(f"[red]{len(failed)} example(s) disagree with PyTorch[/red]")
        return 1
    console.print(f"all {len(results)} runs match PyTorch")
    return 0
