"""`kdsl show FILE.py:OP`: the traced graph, its kernels and their generated Triton source."""

from __future__ import annotations

from .common import load_op, parse_dtype


def register(sub) -> None:
    p = sub.add_parser("show", help="print an op's graph IR and generated Triton source",
                       description="Trace FILE.py:OP, partition it into kernels and print the graph and "
                                   "the generated Triton source of every kernel.")
    p.add_argument("target", metavar="FILE.py:OP", help="the file and the name of a @dsl.op function")
    p.add_argument("--dtype", default=None,
                   help="element type for parameters whose annotation leaves it open (default f32)")
    p.add_argument("--backward", action="store_true", help="also show the backward graph and its kernels")
    p.add_argument("--no-source", action="store_true", help="print the kernel list without sources")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console
    from rich.syntax import Syntax

    import dsl
    from codegen.program import TritonProgram

    op, _ = load_op(args.target)
    dtypes = None
    if args.dtype:
        d = parse_dtype(args.dtype)
        dtypes = tuple(p.spec.dtype or d for p in op.params)
    graph = op.trace(dtypes)
    console = Console()
    graphs = [("forward", graph)] + ([("backward", dsl.grad(graph))] if args.backward else [])
    for label, g in graphs:
        console.rule(f"{op.name}: {label} graph")
        console.print(str(g), markup=False, highlight=False)
        program = TritonProgram(g, op.name if label == "forward" else f"{op.name}_backward")
        console.rule(f"{label} kernels: {len(program.infos)}")
        for info in program.infos:
            console.print(f"{info.name}  template={info.template}  hash={info.source_hash}  "
                          f"nodes={', '.join('%' + str(n) for n in info.nodes)}", markup=False)
            if not args.no_source:
                console.print(Syntax(info.source, "python", line_numbers=False, word_wrap=False))
    return 0
