"""LLEP vs standard expert parallelism: one MoE layer at balanced, 50%, 90% and 95% routing skew.

Two measurements in one run:

1. A cost model at GPU scale (default 8 x H100, gpt-oss-120b's MoE shape: 128 experts, top-4,
   dim = hidden = 2880, bf16): per-device grouped-GEMM time (roofline per expert piece from the
   device's peak bf16 FLOP/s at ``--gemm-efficiency`` and its memory bandwidth), all-to-all dispatch
   and combine and LLEP's weight copies over NVLink (``--link-gbps`` per direction per GPU, the busiest
   device's traffic sets the time), and the peak activation memory of the busiest device.
   The backward is modelled as twice the GEMM FLOPs plus the same exchanges again (token gradients
   back, weight gradients of borrowed experts back to their native device).
2. A real run on local CPU processes (gloo): runtime.parallel.expert_parallel.ep_moe forward and
   backward on ``--gloo-ranks`` processes: the minimum wall time over a few repetitions, and the
   busiest rank's CPU time of its main thread (compute, without waiting), which still shows the
   imbalance when the host is shared with other work.

Skew s means a share s of the tokens picks expert 0 among its top-k; the remaining assignments are
spread evenly over the other experts. Results go to benchmarks/results/llep_<device>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

from autotune.devices import get_device
from runtime.parallel import llep

SKEWS: list[tuple[str, float | None]] = [("balanced", None), ("50%", 0.5), ("90%", 0.9), ("95%", 0.95)]
RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class LayerShape:
    experts: int = 128
    top_k: int = 4
    dim: int = 2880
    hidden: int = 2880
    tokens_per_device: int = 8192
    bytes_per_elem: int = 2


def skewed_loads(total_tokens: int, shape: LayerShape, skew: float | None) -> list[int]:
    assignments = total_tokens * shape.top_k
    if skew is None:
        base = [assignments // shape.experts] * shape.experts
        base[0] += assignments - sum(base)
        return base
    hot = round(skew * total_tokens)
    rest = assignments - hot
    loads = [rest // (shape.experts - 1)] * shape.experts
    for i in range(rest - sum(loads[1:])):
        loads[1 + i % (shape.experts - 1)] += 1
    loads[0] = hot
    return loads


def _traffic(plan: llep.LlepPlan, loads: list[int], devices: int) -> tuple[list[float], list[float]]:
    """Token rows each device sends to / receives from other devices in the dispatch.

    Each source device holds an equal contiguous share of every expert's global token order (the
    routing is assumed independent of where a token lives).
    """
    send, recv = [0.0] * devices, [0.0] * devices
    for e, segs in enumerate(plan.segments):
        share = loads[e] / devices
        for src in range(devices):
            lo, hi = src * share, (src + 1) * share
            for seg in segs:
                rows = max(0.0, min(hi, seg.end) - max(lo, seg.start))
                if rows and seg.device != src:
                    send[src] += rows
                    recv[seg.device] += rows
    return send, recv


def simulate(plan: llep.LlepPlan, loads: list[int], shape: LayerShape, device_name: str, link_gbps: float,
             efficiency: float, latency_us: float = 20.0) -> dict:
    dev = get_device(device_name)
    peak = dev.flops("bf16") * efficiency
    bw_link = link_gbps * 1e9
    d, h, b = shape.dim, shape.hidden, shape.bytes_per_elem
    weight_bytes = 3 * d * h * b
    gemm = [0.0] * plan.num_devices
    rows_on = [0] * plan.num_devices
    for segs in plan.segments:
        for seg in segs:
            if seg.size:
                flops = 6.0 * seg.size * d * h
                moved = weight_bytes + seg.size * (2 * d + 3 * h) * b
                gemm[seg.device] += max(flops / peak, moved / dev.mem_bandwidth)
                rows_on[seg.device] += seg.size
    send, recv = _traffic(plan, loads, plan.num_devices)
    w_send, w_recv = [0] * plan.num_devices, [0] * plan.num_devices
    for t in plan.transfers:
        w_send[t.src] += weight_bytes
        w_recv[t.dst] += weight_bytes
    lat = latency_us * 1e-6
    row = d * b
    dispatch = max(max(s * row + ws, r * row + wr) for s, r, ws, wr in zip(send, recv, w_send, w_recv)) / bw_link + lat
    combine = max(max(s, r) for s, r in zip(send, recv)) * row / bw_link + lat
    weights_only = max(max(ws, wr) for ws, wr in zip(w_send, w_recv)) / bw_link
    planning = lat if plan.spilled or plan.transfers else 0.0     # all-gather of the per-expert counts
    forward = planning + dispatch + max(gemm) + combine
    backward = combine + 2 * max(gemm) + dispatch                  # grads of tokens and borrowed weights return
    peak_mem = max(rows_on[i] * (2 * d + 3 * h) * b + w_recv[i] for i in range(plan.num_devices))
    return {"forward_ms": forward * 1e3, "fwd_bwd_ms": (forward + backward) * 1e3, "gemm_ms": max(gemm) * 1e3,
            "a2a_ms": (dispatch + combine) * 1e3, "weight_copy_ms": weights_only * 1e3,
            "max_device_rows": max(rows_on), "mean_device_rows": sum(rows_on) / len(rows_on),
            "transfers": len(plan.transfers), "peak_act_gib": peak_mem / 2**30}


def cost_model_rows(args) -> list[dict]:
    shape = LayerShape(args.experts, args.top_k, args.dim, args.hidden, args.tokens_per_device)
    total = shape.tokens_per_device * args.devices
    rows = []
    for label, skew in SKEWS:
        loads = skewed_loads(total, shape, skew)
        ep = simulate(llep.plain_ep_plan(loads, args.devices), loads, shape, args.device, args.link_gbps,
                      args.gemm_efficiency)
        plan = llep.plan(loads, args.devices, alpha=args.alpha, m=args.min_chunk, lam=args.lam)
        ll = simulate(plan, loads, shape, args.device, args.link_gbps, args.gemm_efficiency)
        rows.append({"skew": label, "ep": ep, "llep": ll, "llep_spilled": plan.spilled,
                     "speedup_fwd": ep["forward_ms"] / ll["forward_ms"],
                     "speedup_fwd_bwd": ep["fwd_bwd_ms"] / ll["fwd_bwd_ms"],
                     "peak_mem_ratio": ep["peak_act_gib"] / ll["peak_act_gib"]})
    return rows


# ----------------------------------------------------------------------------------- gloo on CPU

def _gloo_worker(rank, world, cfg):
    import torch

    from runtime.parallel.expert_parallel import LlepConfig, ep_moe

    e, k, dim, hidden, tokens, reps = (cfg[x] for x in ("experts", "top_k", "dim", "hidden", "tokens", "reps"))
    per = e // world
    g = torch.Generator().manual_seed(1234 + rank)
    w13 = (torch.randn(per, 2 * hidden, dim, generator=g) / dim ** 0.5).requires_grad_(True)
    w2 = (torch.randn(per, dim, hidden, generator=g) / hidden ** 0.5).requires_grad_(True)
    x = torch.randn(tokens, dim, generator=g).requires_grad_(True)
    out = {}
    for label, skew in SKEWS:
        logits = torch.randn(tokens, e, generator=g)
        if skew is not None:
            logits[torch.rand(tokens, generator=g) < skew, 0] += 30.0
        weights, ids = torch.softmax(logits, -1).topk(k, -1)
        times = {"ep": [], "llep": []}
        cpu = {"ep": [], "llep": []}
        # Alternate the modes and keep the minimum: other processes on a shared host add noise, never speed.
        for rep in range(reps + 1):
            for mode in ("ep", "llep"):
                cfg_llep = LlepConfig(alpha=1.0, m=cfg["min_chunk"], lam=1.3) if mode == "llep" else None
                torch.distributed.barrier()
                t0, c0 = time.perf_counter(), time.thread_time()
                y, _ = ep_moe(x, ids, weights, w13, w2, num_experts=e, llep=cfg_llep)
                y.sum().backward()
                c1 = time.thread_time()
                torch.distributed.barrier()
                if rep:                      # the first round warms up allocators and gloo pairs
                    times[mode].append(time.perf_counter() - t0)
                    cpu[mode].append(c1 - c0)
                x.grad = w13.grad = w2.grad = None
        for mode, ts in times.items():
            out[(label, mode)] = min(ts) * 1e3
            out[(label, mode, "cpu")] = min(cpu[mode]) * 1e3
    return out


def gloo_rows(args) -> tuple[list[dict], dict]:
    from runtime.parallel.local import run_local_group

    cfg = {"experts": args.gloo_experts, "top_k": 2, "dim": args.gloo_dim, "hidden": args.gloo_hidden,
           "tokens": args.gloo_tokens, "reps": args.gloo_reps, "min_chunk": 64}
    per_rank = run_local_group(_gloo_worker, args.gloo_ranks, cfg, timeout=600)
    rows = []
    for label, _ in SKEWS:
        ep = max(r[(label, "ep")] for r in per_rank)
        ll = max(r[(label, "llep")] for r in per_rank)
        ep_cpu = max(r[(label, "ep", "cpu")] for r in per_rank)
        ll_cpu = max(r[(label, "llep", "cpu")] for r in per_rank)
        rows.append({"skew": label, "ep_ms": ep, "llep_ms": ll, "speedup": ep / ll,
                     "ep_busiest_cpu_ms": ep_cpu, "llep_busiest_cpu_ms": ll_cpu, "cpu_speedup": ep_cpu / ll_cpu})
    return rows, cfg


# ----------------------------------------------------------------------------------------- main

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdsl bench llep", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="h100", help="device descriptor for the cost model (autotune.devices)")
    p.add_argument("--devices", type=int, default=8, help="GPUs in the expert-parallel group")
    p.add_argument("--experts", type=int, default=128, help="experts in the layer")
    p.add_argument("--top-k", type=int, default=4, help="experts per token")
    p.add_argument("--dim", type=int, default=2880, help="model dimension")
    p.add_argument("--hidden", type=int, default=2880, help="expert FFN hidden size")
    p.add_argument("--tokens-per-device", type=int, default=8192, help="tokens each GPU routes")
    p.add_argument("--link-gbps", type=float, default=450.0, help="NVLink GB/s per direction per GPU")
    p.add_argument("--gemm-efficiency", type=float, default=0.7, help="fraction of peak bf16 FLOP/s a GEMM reaches")
    p.add_argument("--alpha", type=float, default=1.0, help="LLEP capacity factor")
    p.add_argument("--min-chunk", type=int, default=1024, help="LLEP minimum tokens per spilled chunk (m)")
    p.add_argument("--lam", type=float, default=1.3, help="LLEP imbalance threshold (lambda)")
    p.add_argument("--no-gloo", action="store_true", help="skip the CPU gloo measurement")
    p.add_argument("--gloo-ranks", type=int, default=2, help="CPU processes for the gloo measurement")
    p.add_argument("--gloo-experts", type=int, default=8, help="experts in the gloo measurement")
    p.add_argument("--gloo-dim", type=int, default=256, help="model dimension in the gloo measurement")
    p.add_argument("--gloo-hidden", type=int, default=512, help="expert hidden size in the gloo measurement")
    p.add_argument("--gloo-tokens", type=int, default=2048, help="tokens per rank in the gloo measurement")
    p.add_argument("--gloo-reps", type=int, default=3, help="timed repetitions (after one warm-up)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/llep_<device>.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    args = _parser().parse_args(argv)
    console = Console(width=max(Console().width, 140))
    model = cost_model_rows(args)
    table = Table(title=f"MoE layer, {args.devices} x {args.device}: {args.experts} experts top-{args.top_k}, "
                        f"dim {args.dim}, hidden {args.hidden}, {args.tokens_per_device} tokens/GPU (cost model)")
    for col in ("skew", "EP fwd ms", "LLEP fwd ms", "speedup fwd", "EP fwd+bwd ms", "LLEP fwd+bwd ms",
                "speedup fwd+bwd", "EP/LLEP peak act", "copies"):
        table.add_column(col, justify="right")
    for r in model:
        table.add_row(r["skew"], f"{r['ep']['forward_ms']:.3f}", f"{r['llep']['forward_ms']:.3f}",
                      f"{r['speedup_fwd']:.2f}x", f"{r['ep']['fwd_bwd_ms']:.3f}", f"{r['llep']['fwd_bwd_ms']:.3f}",
                      f"{r['speedup_fwd_bwd']:.2f}x", f"{r['peak_mem_ratio']:.2f}x", str(r["llep"]["transfers"]))
    console.print(table)
    balanced = model[0]["ep"]["forward_ms"]
    console.print(f"standard EP at 95% skew is {model[-1]['ep']['forward_ms'] / balanced:.1f}x slower than balanced")
    result = {"device": args.device, "devices": args.devices, "shape": dataclasses.asdict(
        LayerShape(args.experts, args.top_k, args.dim, args.hidden, args.tokens_per_device)),
        "link_gbps": args.link_gbps, "gemm_efficiency": args.gemm_efficiency,
        "llep": {"alpha": args.alpha, "m": args.min_chunk, "lam": args.lam}, "cost_model": model,
        "host": platform.node(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if not args.no_gloo:
        rows, cfg = gloo_rows(args)
        gtable = Table(title=f"measured: {args.gloo_ranks} gloo CPU processes, {cfg['experts']} experts top-2, "
                             f"dim {cfg['dim']}, hidden {cfg['hidden']}, {cfg['tokens']} tokens/rank, fwd+bwd")
        for col in ("skew", "EP wall ms", "LLEP wall ms", "speedup", "EP busiest-rank CPU ms",
                    "LLEP busiest-rank CPU ms", "CPU speedup"):
            gtable.add_column(col, justify="right")
        for r in rows:
            gtable.add_row(r["skew"], f"{r['ep_ms']:.1f}", f"{r['llep_ms']:.1f}", f"{r['speedup']:.2f}x",
                           f"{r['ep_busiest_cpu_ms']:.1f}", f"{r['llep_busiest_cpu_ms']:.1f}",
                           f"{r['cpu_speedup']:.2f}x")
        console.print(gtable)
        result["gloo"] = {"ranks": args.gloo_ranks, **cfg, "rows": rows}
    out = args.out or RESULTS / f"llep_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.exit(main())
