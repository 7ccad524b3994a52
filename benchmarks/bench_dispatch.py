"""Dispatch overhead of a cache hit: CompiledOp.__call__ vs the generated launcher called directly.

Same op, same shapes, same run. On a CPU-only machine the kernels run under Triton's interpreter
(the launch itself is slow), so the torch backend is measured too: CompiledOp vs evaluating the
graph's reference directly; the difference is kdsl's per-call cost (binding, custom-op dispatch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import dsl  # noqa: E402
from common import median_time, write_results  # noqa: E402


@dsl.op
def linear_gelu(x: dsl.Tensor["M", "K"], w: dsl.Tensor["N", "K"], b: dsl.Tensor["N"]):
    return dsl.gelu(x @ w.T + b)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kdsl bench dispatch", description=__doc__)
    parser.add_argument("--m", type=int, default=64)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)

    import runtime
    from dsl.reference import plan as reference_plan
    from dsl.reference import run as run_reference
    from dsl.trace import bind_shapes

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(args.m, args.k, device=device)
    w = torch.randn(args.n, args.k, device=device)
    b = torch.randn(args.n, device=device)
    rows = []

    # triton backend: CompiledOp vs the rendered module's launch()
    f = runtime.compile(linear_gelu, backend="triton")
    f(x, w, b)  # compile, cache the config
    variant = f.variant([x, w, b], {})
    program = variant.program
    (info,) = program.infos
    module = program.module(info.name)
    env = bind_shapes(variant.graph, [x, w, b], f.name)
    config = f.config_for(info, program.problem(info.name, env))
    out = torch.empty(args.m, args.n, device=device)
    wt = w.T
    t_op, _ = median_time(lambda: f(x, w, b), args.repeats)
    t_direct, _ = median_time(lambda: module.launch(x, wt, [b], [out], config), args.repeats)
    rows.append({"backend": "triton", "compiled_op_s": t_op, "direct_s": t_direct})

    # torch backend: CompiledOp vs the reference interpreter called directly
    g = runtime.compile(linear_gelu, backend="torch")
    g(x, w, b)
    graph = g.variant([x, w, b], {}).graph
    steps = reference_plan(graph)   # the direct path gets the same precomputed evaluation order
    t_op2, _ = median_time(lambda: g(x, w, b), args.repeats)
    t_direct2, _ = median_time(lambda: run_reference(graph, [x, w, b], env, steps), args.repeats)
    rows.append({"backend": "torch", "compiled_op_s": t_op2, "direct_s": t_direct2})

    print(f"{'backend':8} {'CompiledOp':>12} {'direct':>12} {'overhead':>12} {'ratio':>7}")
    for r in rows:
        r["overhead_s"] = r["compiled_op_s"] - r["direct_s"]
        r["ratio"] = r["compiled_op_s"] / r["direct_s"]
        print(f"{r['backend']:8} {r['compiled_op_s'] * 1e6:10.1f}us {r['direct_s'] * 1e6:10.1f}us "
              f"{r['overhead_s'] * 1e6:10.1f}us {r['ratio']:7.3f}")
    path = write_results("dispatch", {"shape": {"M": args.m, "N": args.n, "K": args.k}, "rows": rows},
                         args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
