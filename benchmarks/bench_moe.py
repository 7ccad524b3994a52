"""MoE layer benchmark: kdsl's compiled MoE op against the per-expert Python loop of popular model
code (Mixtral-style: a one-hot expert mask, then per expert a gather, gate/up/down GEMMs and an
index_add of the weighted result), same run, same inputs.

CPU (always): kdsl's torch backend (``runtime.ops.moe(..., backend="torch")``: slots sorted by
expert once, one GEMM per expert over contiguous rows) against the loop, forward, fp32, several
token counts. GPU (only when CUDA is available): kdsl's Triton kernels (routing, align, grouped
GEMM with SwiGLU epilogue, grouped GEMM with weight + combine epilogue) against the unfused loop and
against a dense-GEMM roofline: the same FLOPs as two dense GEMMs ([T*k, D] x [D, 2H] and
[T*k, H] x [H, D]) through cuBLAS, i.e. what the experts would cost if routing were free and
perfectly balanced. FLOPs of the layer: 2*T*D*E (router) + 2*T*k*D*3H (experts). Reports TFLOP/s
and ratios (kdsl time / other time: < 1 means kdsl is faster) and writes JSON under
benchmarks/results/.

Usage: ``kdsl bench moe [--tokens 64,256,1024,4096] [--dim D --hidden H --experts E --top-k K]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import median_time, write_results  # noqa: E402


def mixtral_loop(x, router_weight, w13, w2, top_k):
    """The per-expert loop as Mixtral's reference implementation writes it."""
    logits = x @ router_weight.T
    probs = torch.softmax(logits.float(), dim=-1)
    weights, selected = torch.topk(probs, top_k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
    out = torch.zeros_like(x)
    mask = F.one_hot(selected, num_classes=w13.shape[0]).permute(2, 1, 0)
    hidden = w2.shape[-1]
    for e in range(w13.shape[0]):
        slot, tok = torch.where(mask[e])
        if tok.numel() == 0:
            continue
        gate_up = x[tok] @ w13[e].T
        h = F.silu(gate_up[:, :hidden]) * gate_up[:, hidden:]
        out.index_add_(0, tok, (h @ w2[e].T) * weights[tok, slot, None])
    return out


def layer_flops(tokens, dim, hidden, experts, top_k) -> float:
    return 2.0 * tokens * dim * experts + 2.0 * tokens * top_k * dim * 3 * hidden


def _inputs(tokens, dim, hidden, experts, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) / 10).to(device=device, dtype=dtype)  # noqa: E731
    return r(tokens, dim), r(experts, dim), r(experts, 2 * hidden, dim), r(experts, dim, hidden)


def run(tokens_list, dim, hidden, experts, top_k, device, dtype, repeats):
    from runtime.ops import moe_ops

    backend = "triton" if device == "cuda" else "torch"
    rows = []
    for tokens in tokens_list:
        x, rw, w13, w2 = _inputs(tokens, dim, hidden, experts, dtype, device)
        with torch.no_grad():
            kdsl = lambda: moe_ops.moe(x, rw, w13, w2, top_k, backend=backend)  # noqa: E731
            loop = lambda: mixtral_loop(x, rw, w13, w2, top_k)  # noqa: E731
            err = (kdsl().float() - loop().float()).abs().max().item()
            t_kdsl, _ = median_time(kdsl, repeats=repeats)
            t_loop, _ = median_time(loop, repeats=repeats)
            row = {"tokens": tokens, "dim": dim, "hidden": hidden, "experts": experts, "top_k": top_k,
                   "backend": backend, "max_abs_diff": err, "kdsl_s": t_kdsl, "loop_s": t_loop,
                   "kdsl_over_loop": t_kdsl / t_loop}
            flops = layer_flops(tokens, dim, hidden, experts, top_k)
            row["kdsl_tflops"] = flops / t_kdsl / 1e12
            row["loop_tflops"] = flops / t_loop / 1e12
            if device == "cuda":
                a1 = torch.randn(tokens * top_k, dim, device=device, dtype=dtype)
                b1 = torch.randn(dim, 2 * hidden, device=device, dtype=dtype)
                a2 = torch.randn(tokens * top_k, hidden, device=device, dtype=dtype)
                b2 = torch.randn(hidden, dim, device=device, dtype=dtype)
                t_dense, _ = median_time(lambda: (a1 @ b1, a2 @ b2), repeats=repeats)
                row["dense_roofline_s"] = t_dense
                row["dense_tflops"] = 2.0 * tokens * top_k * dim * 3 * hidden / t_dense / 1e12
                row["kdsl_over_dense"] = t_kdsl / t_dense
        rows.append(row)
    return rows


def print_table(rows):
    gpu = "dense_roofline_s" in rows[0] if rows else False
    head = f"{'tokens':>7} {'kdsl ms':>9} {'loop ms':>9} {'kdsl/loop':>9} {'kdsl TF/s':>9} {'loop TF/s':>9}"
    if gpu:
        head += f" {'dense TF/s':>10} {'kdsl/dense':>10}"
    print(head + f" {'max|diff|':>10}")
    for r in rows:
        line = (f"{r['tokens']:>7} {r['kdsl_s'] * 1e3:>9.3f} {r['loop_s'] * 1e3:>9.3f} {r['kdsl_over_loop']:>9.3f} "
                f"{r['kdsl_tflops']:>9.4f} {r['loop_tflops']:>9.4f}")
        if gpu:
            line += f" {r['dense_tflops']:>10.2f} {r['kdsl_over_dense']:>10.3f}"
        print(line + f" {r['max_abs_diff']:>10.2e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kdsl bench moe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default=None, help="comma-separated token counts (default: CPU 64,256,1024,4096; "
                                                       "GPU 16,256,2048,8192,32768)")
    parser.add_argument("--dim", type=int, default=None, help="model dim D (default: CPU 512, GPU 4096)")
    parser.add_argument("--hidden", type=int, default=None, help="expert hidden size H (default: CPU 256, GPU 1408)")
    parser.add_argument("--experts", type=int, default=None, help="number of experts E (default: CPU 16, GPU 64)")
    parser.add_argument("--top-k", type=int, default=None, help="experts per token (default: CPU 2, GPU 6)")
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16"], help="GPU dtype (CPU: fp32)")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per measurement (median)")
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU part even when CUDA is available")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_moe_<date>.json)")
    args = parser.parse_args(argv)

    payload = {}
    cpu_tokens = [int(t) for t in (args.tokens or "64,256,1024,4096").split(",")]
    cpu = dict(dim=args.dim or 512, hidden=args.hidden or 256, experts=args.experts or 16, top_k=args.top_k or 2)
    print(f"CPU: kdsl torch backend vs Mixtral-style per-expert loop, fp32, {cpu}")
    payload["cpu"] = {"config": cpu, "rows": run(cpu_tokens, device="cpu", dtype=torch.float32,
                                                 repeats=args.repeats, **cpu)}
    print_table(payload["cpu"]["rows"])
    if torch.cuda.is_available() and not args.cpu_only:
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        gpu = dict(dim=args.dim or 4096, hidden=args.hidden or 1408, experts=args.experts or 64,
                   top_k=args.top_k or 6)
        gpu_tokens = [int(t) for t in (args.tokens or "16,256,2048,8192,32768").split(",")]
        print(f"GPU ({torch.cuda.get_device_name()}): kdsl kernels vs loop vs dense-GEMM roofline, {args.dtype}, {gpu}")
        payload["gpu"] = {"config": gpu, "dtype": args.dtype,
                          "rows": run(gpu_tokens, device="cuda", dtype=dtype, repeats=args.repeats, **gpu)}
        print_table(payload["gpu"]["rows"])
    path = write_results("bench_moe", payload, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
