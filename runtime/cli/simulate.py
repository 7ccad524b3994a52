"""`kdsl simulate`: replay a request trace through the schedulers on a modelled GPU."""

from __future__ import annotations

import argparse
import math
import sys

from dsl.errors import ServingError
from runtime.cli.common import add_slo_arguments, slo_from_args


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ServingError(f"--rates must be comma-separated numbers, got '{text}'") from None
    if not rates or any(not (r > 0 and math.isfinite(r)) for r in rates):
        raise ServingError(f"--rates must be positive request rates, got '{text}'")
    return sorted(set(rates))


def register(subparsers) -> None:
    from runtime.serve.scheduler import SCHEDULERS
    from runtime.serve.simulator import MODEL_PRESETS

    p = subparsers.add_parser(
        "simulate", help="replay a request trace through the serving schedulers on a modelled GPU",
        description="Replay a request trace (Azure CSV or Mooncake JSONL) through kdsl's scheduler, block "
                    "manager and engine loop, with a step-time model of the GPU in place of the model, and "
                    "compare schedulers by goodput (TTFT <= 10 s and max inter-token gap <= 1.5 s).")
    p.add_argument("--trace", required=True, help="trace file: .csv (Azure format) or .jsonl (Mooncake format)")
    p.add_argument("--gpu", default="h100", help="device descriptor to model (h100, a100, h200, ...; default h100)")
    p.add_argument("--model", default="mixtral-8x7b",
                   help=f"model preset ({', '.join(sorted(MODEL_PRESETS))}; default mixtral-8x7b)")
    p.add_argument("--scheduler", default="all",
                   help=f"scheduler: {', '.join(sorted(SCHEDULERS))}, a comma-separated list, or all (default)")
    p.add_argument("--rates", default=None,
                   help="comma-separated request rates in req/s to rescale the trace to (default: its own rate)")
    p.add_argument("--requests", type=int, default=None, help="replay only the first N requests of the trace")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="each request's max_tokens (default: smallest power of two >= the longest trace output)")
    p.add_argument("--block-size", type=int, default=16, help="KV cache block size in tokens (default 16)")
    p.add_argument("--kv-blocks", type=int, default=None,
                   help="override the KV cache size in blocks (default: from device memory minus weights)")
    p.add_argument("--max-batch-tokens", type=int, default=2048,
                   help="chunked-prefill token budget per step (default 2048)")
    p.add_argument("--max-running", type=int, default=256, help="most requests in a batch (default 256)")
    p.add_argument("--layer-groups", type=int, default=8, help="layer groups of layered prefill (default 8)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="disable the prefix cache: released blocks are not kept, so recompute after "
                        "preemption costs a full prefill")
    add_slo_arguments(p, abort_help="the engine drops each request as soon as it misses the SLO (an SLA-bound "
                                    "server, as in the Past-Future paper's evaluation)")
    p.add_argument("--seed", type=int, default=0, help="seed of past-future's sampling (default 0)")
    p.add_argument("--out", default="simulate_out", help="directory for simulate.json and goodput_vs_rate.png")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from runtime.serve.scheduler import SCHEDULERS, SchedulerConfig
    from runtime.serve.simulator import (
        get_model_config,
        kv_capacity_tokens,
        resolve_device,
        sweep,
        write_sweep,
    )
    from runtime.serve.traces import load_trace

    # Piped or captured output has no terminal width; don't squeeze the table into 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=130)
    names = sorted(SCHEDULERS) if args.scheduler.strip().lower() == "all" else \
        [s.strip().lower().replace("_", "-") for s in args.scheduler.split(",") if s.strip()]
    unknown = [n for n in names if n not in SCHEDULERS]
    if unknown or not names:
        raise ServingError(f"unknown scheduler {', '.join(unknown) or args.scheduler!r}; "
                           f"known: {', '.join(sorted(SCHEDULERS))}, all")
    model = get_model_config(args.model)
    device = resolve_device(args.gpu)
    trace = load_trace(args.trace)
    if args.requests is not None:
        trace = trace.head(args.requests)
    rates = _rates(args.rates) if args.rates else [None]
    config = SchedulerConfig(max_tokens_per_step=args.max_batch_tokens, max_running=args.max_running,
                             num_layer_groups=args.layer_groups, seed=args.seed)
    capacity = (args.kv_blocks * args.block_size if args.kv_blocks
                else kv_capacity_tokens(model, device) // args.block_size * args.block_size)
    console.print(f"trace {trace.name}: {len(trace)} requests at {trace.rate:.2f} req/s; model {model.name} "
                  f"({model.weight_bytes_total / 1e9:.1f} GB weights) on {device.full_name}; "
                  f"KV cache {capacity} tokens")

    def progress(res):
        m = res.metrics
        console.print(f"  {res.scheduler:>16} @ {res.rate:6.2f} req/s: goodput {m.goodput_req_s:.2f} req/s "
                      f"({res.wall_seconds:.1f} s)")

    results = sweep(trace, model, device, names, rates, progress=progress, block_size=args.block_size,
                    max_tokens=args.max_tokens, scheduler_config=config, num_blocks=args.kv_blocks,
                    enable_prefix_caching=not args.no_prefix_cache, slo=slo_from_args(args),
                    abort_missed=args.abort_missed)

    table = Table(title=f"{trace.name} on {device.name}, {model.name}", box=box.SIMPLE_HEAD)
    table.add_column("scheduler", no_wrap=True, min_width=15)
    for col in ("rate", "goodput", "SLO met", "req/s", "tok/s", "TTFT p50", "TTFT p99", "TBT p99", "preempt"):
        table.add_column(col, justify="right")
    for res in results:
        m = res.metrics
        table.add_row(res.scheduler, f"{res.rate:.2f}", f"{m.goodput_req_s:.2f}",
                      f"{100 * m.num_met_slo / max(m.num_requests, 1):.0f}%", f"{m.throughput_req_s:.2f}",
                      f"{m.throughput_tok_s:.0f}", f"{m.ttft_p50:.2f}", f"{m.ttft_p99:.2f}",
                      f"{m.tbt_p99 * 1000:.0f} ms", str(m.num_preemptions))
    console.print(table)
    heaviest = max(r.rate for r in results)
    at_peak = {r.scheduler: r.metrics.goodput_req_s for r in results if r.rate == heaviest}
    if "past-future" in at_peak and len(at_peak) > 1:
        for other, good in at_peak.items():
            if other != "past-future":
                ratio = at_peak["past-future"] / good if good > 0 else math.inf
                console.print(f"past-future / {other} goodput at {heaviest:.2f} req/s: {ratio:.2f}x")
    json_path, png_path = write_sweep(results, args.out, title=f"{trace.name}, {model.name} on {device.name}")
    console.print(f"wrote {json_path} and {png_path}")
    return 0
