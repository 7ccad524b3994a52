"""Registers, spills and shared memory of candidate configs compiled for sm_90 (no GPU) exactly as
the runtime launches them (recorded on meta tensors, Triton's own specialisation), beside what the
templates' constraints say. Compile facts, not measurements of speed.

    PYTHONPATH=$PWD python benchmarks/bench_static_sm90.py benchmarks/results/static_sm90_<date>
"""
import json
import sys
from pathlib import Path

import torch

import dsl
from dsl import shapes as sh, moe
from dsl.autodiff import grad
from dsl.attention_prims import attention
from autotune.launch_spec import record_launches
from autotune.static_check import check_launches
from autotune.devices import get_device
from autotune.space import get_space
from codegen import kernels as K
try:
    from codegen.program import TritonProgram
except ImportError:
    from runtime.executor import TritonProgram
T = dsl.Tensor
dev = get_device("h100")

def meta_of(graph, ref, env):
    t = graph.type_of(ref)
    return torch.empty(tuple(sh.evaluate(d, env) for d in t.shape), dtype=t.dtype.torch, device="meta")

def kernels(graph, name, env):
    prog = TritonProgram(graph, name)
    for info in prog.infos:
        r = prog.rendered[info.name]
        yield r, prog.module(info.name), [meta_of(graph, x, env) for x in r.input_refs], [meta_of(graph, x, env) for x in r.output_refs]

@dsl.op
def mm(x: T["M", "K"], w: T["N", "K"]):
    return x @ w.T
@dsl.op
def ffn(x: T["T", "D"], w13: T["E", "H2", "D"], w2: T["E", "D", "H"], weights: T["T", 2], ids: T["T", 2]):
    return moe.moe_ffn(x, w13, w2, weights, ids)
@dsl.op
def att(q: T["B", "H", "S", "D"], k: T["B", "HK", "SK", "D"], v: T["B", "HK", "SK", "D"]):
    return attention(q, k, v, causal=True)

def cfg(names, *rows):
    return [dict(zip(names, r)) for r in rows]
G = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
A = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
gemm_cfgs = cfg(G, (64, 64, 32, 4, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 128, 64, 8, 4),
                (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 256, 32, 4, 4), (128, 128, 32, 4, 4),
                (128, 256, 64, 4, 3), (256, 256, 64, 8, 2), (128, 128, 128, 8, 3))
moe_cfgs = cfg(G, (64, 64, 32, 4, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 8, 5),
               (128, 128, 64, 4, 3), (64, 128, 64, 4, 3), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3))
fwd_cfgs = cfg(A, (64, 32, 4, 2), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 2), (128, 128, 4, 2),
               (64, 64, 4, 2), (64, 128, 4, 2), (128, 64, 4, 3), (64, 64, 4, 3), (256, 64, 8, 2))
bwd_cfgs = cfg(A, (32, 64, 8, 2), (32, 64, 4, 2), (64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 4, 2),
               (64, 64, 8, 2), (32, 128, 4, 2), (64, 128, 4, 2), (32, 64, 8, 3))
jobs = [
    ("gemm f16 M=N=K=4096", mm.trace((dsl.f16, dsl.f16)), {"M": 4096, "N": 4096, "K": 4096}, {"gemm": gemm_cfgs}),
    ("moe_ffn f16 Mixtral T=4096 D=4096 H=14336 E=8 k=2", ffn.trace((dsl.f16, dsl.f16, dsl.f16, dsl.f32, dsl.i32)),
     {"T": 4096, "D": 4096, "E": 8, "H2": 28672, "H": 14336}, {"moe_gemm": moe_cfgs}),
    ("attention f16 causal B=1 H=32 HK=8 S=4096 D=128", att.trace((dsl.f16,) * 3),
     {"B": 1, "H": 32, "HK": 8, "S": 4096, "SK": 4096, "D": 128}, {"attention_fwd": fwd_cfgs}),
    ("attention bwd f16 causal B=1 H=32 HK=8 S=4096 D=128", grad(att.trace((dsl.f16,) * 3)),
     {"B": 1, "H": 32, "HK": 8, "S": 4096, "SK": 4096, "D": 128}, {"attention_bwd": bwd_cfgs}),
]


def table(rows) -> str:
    lines = ["| problem | template | config (BM, BN, BK, warps, stages) | kernel: regs / spill B / shared B | "
             "verdict | constraints violated today |", "|---|---|---|---|---|---|"]
    for r in rows:
        c = r["config"]
        cfg = ", ".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages") if k in c)
        per = "<br>".join(f"{n.split('_', 1)[-1]}: {regs} / {spill} / {shared}" for n, regs, spill, shared, _ in
                          r["per_kernel"])
        verdict = "ok" if r["ok"] else "rejected: " + r["reason"].split(": ", 1)[-1]
        lines.append(f"| {r['problem']} | {r['template']} | {cfg} | {per} | {verdict} | "
                     f"{', '.join(r['violations']) or '-'} |")
    return "\n".join(lines)


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(out / "results.jsonl", "w") as f:
        for title, graph, env, by_template in jobs:
            cands, meta = [], []
            for r, mod, ins, outs in kernels(graph, "m", env):
                if r.template not in by_template:
                    continue
                problem = K.PROBLEMS[r.template](r, env)
                for c in by_template[r.template]:
                    c = {**c, "GROUP_M": 8} if "BLOCK_K" in c else c
                    cands.append(record_launches(K.INVOKERS[r.template], mod, r, ins, outs, env, c))
                    meta.append((title, r.name, r.template, c, get_space(r.template).violations(c, problem, dev)))
            for (title, kname, tpl, c, viol), v in zip(meta, check_launches(cands, dev)):
                per = [(n, kv.registers, kv.spill_bytes, kv.shared_bytes, kv.ok) for n, kv in v.kernels]
                rows.append({"problem": title, "kernel": kname, "template": tpl, "config": c, "ok": v.ok,
                             "reason": v.reason, "per_kernel": per, "violations": viol})
                f.write(json.dumps(rows[-1]) + "\n")
                f.flush()
    print(table(rows))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--table":
        print(table([json.loads(line) for line in open(sys.argv[2])]))
    else:
        main(sys.argv[1])
