"""`kdsl bench serve`: replay a request trace against a running server, or compare engines on CPU.

* ``--trace FILE --url URL``: a load generator. Each trace request is sent at its (scaled) arrival
  time as a streamed completion of token ids (the trace knows only lengths; prompts are synthesised
  by runtime.serve.traces and folded into the vocabulary); reports throughput, TTFT/TBT percentiles
  and goodput (TTFT <= 10 s, max inter-token gap <= 1.5 s, both times the trace's time scale).
* ``--cpu-engine``: in one process and one run, the same tiny model and the same requests served by
  kdsl's engine (continuous batching, paged KV cache) and by static batching (a plain generate loop:
  fixed batches of ``--static-batch`` requests, a batch starts when the previous one has finished
  and its requests have arrived, and runs until its longest answer is done). Greedy decoding, so
  both produce the same tokens; reports tokens/s and TTFT percentiles of each.

Results are written as JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _requests_from_trace(path: str | None, n: int, max_prompt: int, max_output: int, vocab: int,
                         time_scale: float, rate: float | None, seed: int = 0):
    """[(arrival s, prompt ids, max_tokens)] and the trace's time scale."""
    import numpy as np

    from runtime.serve.traces import load_trace

    if path:
        trace = load_trace(path)
        trace = trace.head(min(n, len(trace)))
        if rate:
            trace = trace.with_rate(rate)
        if time_scale != 1.0:
            trace = trace.scale_time(time_scale)
        first = trace.requests[0].arrival
        out = []
        for i, r in enumerate(trace.requests):
            ids = trace.prompt_token_ids(i)[:max_prompt] % vocab
            out.append((r.arrival - first, [int(t) for t in ids], max(1, min(r.output_len, max_output))))
        return out, trace.time_scale
    # No trace: Poisson arrivals at ``rate`` with lengths uniform in the limits.
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / (rate or 4.0), size=n)
    arrivals = np.cumsum(gaps) - gaps[0]
    return [(float(a), [int(t) for t in rng.integers(0, vocab, size=int(rng.integers(2, max_prompt + 1)))],
             int(rng.integers(1, max_output + 1))) for a in arrivals], 1.0


# --- load generator against a server ------------------------------------------------------------
async def _one(http, url: str, model: str | None, i: int, start: float, arrival: float, prompt, max_tokens):
    from runtime.serve.metrics import RequestRecord

    await asyncio.sleep(max(0.0, start + arrival - time.monotonic()))
    sent = time.monotonic()
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if model:
        body["model"] = model
    times, reason = [], None
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return RequestRecord.rejected(f"r{i}", sent - start, len(prompt)), r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                now = time.monotonic() - start
                times.extend([now] * len(choice.get("token_ids", [])))
                reason = choice.get("finish_reason") or reason
    except Exception as exc:  # a load generator records failures instead of stopping the run
        return RequestRecord.rejected(f"r{i}", sent - start, len(prompt)), type(exc).__name__
    finish = times[-1] if times else None
    return RequestRecord(f"r{i}", sent - start, tuple(times), finish, reason, len(prompt)), 200


async def _replay(url: str, model: str | None, reqs, concurrency: int):
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=None, limits=limits) as http:
        start = time.monotonic()
        return await asyncio.gather(*(_one(http, url, model, i, start, a, p, n)
                                      for i, (a, p, n) in enumerate(reqs)))


def run_against_server(args) -> dict:
    import httpx

    from runtime.serve.metrics import summarize

    url = args.url.rstrip("/")
    models = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
    model = args.model or models[0]["id"]
    max_len = models[0].get("max_model_len") or (args.max_prompt + args.max_output)
    max_prompt = min(args.max_prompt, max_len - 1)
    reqs, scale = _requests_from_trace(args.trace, args.num_requests, max_prompt,
                                       min(args.max_output, max_len - max_prompt), args.vocab_size,
                                       args.time_scale, args.rate)
    results = asyncio.run(_replay(url, model, reqs, args.concurrency))
    records = [r for r, _ in results]
    statuses: dict[str, int] = {}
    for _, s in results:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    summary = summarize(records, time_scale=scale).to_dict()
    return {"mode": "server", "url": url, "model": model, "trace": args.trace, "time_scale": scale,
            "num_requests": len(reqs), "statuses": statuses, "metrics": summary}


# --- kdsl engine vs static batching, same model, same run ----------------------------------------
def _bench_model(vocab: int):
    import torch

    from runtime.model import MoEConfig, MoETransformer

    config = MoEConfig(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, num_experts=8, top_k=2,
                       expert_hidden=64, backend="torch")
    torch.manual_seed(0)
    return MoETransformer(config).eval()


def _run_engine(model, reqs, args):
    from runtime.serve.engine import Engine
    from runtime.serve.metrics import RequestRecord
    from runtime.serve.request import SamplingParams

    max_len = args.max_prompt + args.max_output
    blocks = args.num_blocks or math.ceil(len(reqs) * max_len / 16)
    engine = Engine(model, scheduler=args.scheduler, num_blocks=blocks, block_size=16,
                    max_model_len=max_len, max_running=args.max_running)
    engine.start()
    start = time.monotonic()
    streams = []
    try:
        for a, p, n in reqs:
            time.sleep(max(0.0, start + a - time.monotonic()))
            streams.append(engine.submit(p, SamplingParams(max_tokens=n)))
        for s in streams:
            s.finished.wait()
    finally:
        engine.shutdown(drain=True, timeout=5)
    records, outputs = [], []
    for s in streams:
        r = s.request
        records.append(RequestRecord(r.request_id, r.arrival_time - start,
                                     tuple(t - start for t in r.token_times),
                                     None if r.finish_time is None else r.finish_time - start,
                                     r.finish_reason, r.num_prompt_tokens, r.num_preemptions))
        outputs.append(list(r.output_token_ids))
    return records, outputs, {"preemptions": engine.core.num_preemptions, "steps": engine.core.num_steps,
                              "forward_calls": engine.executor.num_forward_calls}


def _run_static(model, reqs, batch: int):
    """A plain generate loop: fixed batches, each prompt prefilled, then lock-step decoding."""
    import torch

    from runtime.serve.executor import KVGeometry, _LayerCache
    from runtime.serve.metrics import RequestRecord

    geo = KVGeometry.of(model)
    max_len = max(len(p) + n for _, p, n in reqs)
    records, outputs = [None] * len(reqs), [None] * len(reqs)
    start = time.monotonic()
    forwards = 0
    with torch.no_grad():
        for b0 in range(0, len(reqs), batch):
            group = list(range(b0, min(b0 + batch, len(reqs))))
            # The batch starts once its last request has arrived (and the previous batch is done).
            time.sleep(max(0.0, start + max(reqs[i][0] for i in group) - time.monotonic()))
            nb = len(group)
            # Each row owns a contiguous run of 16-token blocks: the same kernels as the engine's
            # paged cache, so the comparison measures batching, not attention layouts.
            per_row = -(-max_len // 16)
            shape = (nb * per_row, 16, geo.n_kv_heads, geo.head_dim)
            ks = [torch.zeros(shape) for _ in range(geo.n_layers)]
            vs = [torch.zeros(shape) for _ in range(geo.n_layers)]
            table = torch.arange(nb * per_row, dtype=torch.int32).view(nb, per_row)
            last = []
            times = {i: [] for i in group}
            outs = {i: [] for i in group}
            for row, i in enumerate(group):
                prompt = reqs[i][1]
                caches = [_LayerCache(k, v, table[row:row + 1], torch.zeros(1, dtype=torch.int32))
                          for k, v in zip(ks, vs)]
                logits = model(torch.tensor([prompt]), torch.arange(len(prompt))[None], caches)
                forwards += 1
                last.append(int(logits[0, -1].argmax()))
            now = time.monotonic() - start
            for row, i in enumerate(group):
                outs[i].append(last[row])
                times[i].append(now)
            lens = torch.tensor([len(reqs[i][1]) for i in group], dtype=torch.int32)
            for _ in range(max(reqs[i][2] for i in group) - 1):
                caches = [_LayerCache(k, v, table, lens.clone()) for k, v in zip(ks, vs)]
                logits = model(torch.tensor(last)[:, None], lens.long()[:, None], caches)
                forwards += 1
                lens += 1
                last = logits[:, -1].argmax(-1).tolist()
                now = time.monotonic() - start
                for row, i in enumerate(group):
                    if len(outs[i]) < reqs[i][2]:      # finished rows still occupy their slot
                        outs[i].append(last[row])
                        times[i].append(now)
            for i in group:
                a, p, n = reqs[i]
                records[i] = RequestRecord(f"s{i}", a, tuple(times[i]), times[i][-1], "length", len(p))
                outputs[i] = outs[i]
    return records, outputs, {"forward_calls": forwards}


def run_cpu_engines(args) -> dict:
    import torch

    from runtime.serve.metrics import summarize

    torch.set_num_threads(max(1, args.threads))
    reqs, scale = _requests_from_trace(args.trace, args.num_requests, args.max_prompt, args.max_output,
                                       args.vocab_size, args.time_scale, args.rate)
    model = _bench_model(args.vocab_size)
    # Warm the compiled ops so neither side pays the first-call compile.
    _run_static(model, reqs[:2], 2)
    eng_records, eng_out, eng_info = _run_engine(model, reqs, args)
    # The engine computes on its background thread; run the baseline on a worker thread as well,
    # since torch's CPU thread settings differ between the main thread and others.
    box = {}
    worker = threading.Thread(target=lambda: box.setdefault("r", _run_static(model, reqs, args.static_batch)))
    worker.start()
    worker.join()
    st_records, st_out, st_info = box["r"]
    eng = summarize(eng_records, time_scale=scale).to_dict()
    st = summarize(st_records, time_scale=scale).to_dict()
    return {
        "mode": "cpu-engine", "trace": args.trace, "num_requests": len(reqs), "time_scale": scale,
        "max_prompt": args.max_prompt, "max_output": args.max_output, "static_batch": args.static_batch,
        "scheduler": args.scheduler, "outputs_equal": eng_out == st_out,
        "kdsl_engine": {**eng, **eng_info}, "static_batching": {**st, **st_info},
        "speedup_tok_s": (eng["throughput_tok_s"] / st["throughput_tok_s"]) if st["throughput_tok_s"] else None,
        "host": platform.node(), "threads": args.threads,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdsl bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", help="Azure CSV or Mooncake JSONL trace (without it: Poisson arrivals)")
    p.add_argument("--url", help="server to load, e.g. http://127.0.0.1:8000")
    p.add_argument("--cpu-engine", action="store_true",
                   help="in-process: kdsl engine vs static batching of the same tiny model")
    p.add_argument("--model", help="model id to request (default: the server's first)")
    p.add_argument("--num-requests", type=int, default=64, help="requests to replay (default 64)")
    p.add_argument("--time-scale", type=float, default=1.0, help="stretch trace time by this factor")
    p.add_argument("--rate", type=float, default=None, help="rescale arrivals to this many requests/s")
    p.add_argument("--max-prompt", type=int, default=64, help="clip prompts to this many tokens")
    p.add_argument("--max-output", type=int, default=32, help="clip answers to this many tokens")
    p.add_argument("--vocab-size", type=int, default=256, help="fold synthetic token ids into this vocabulary")
    p.add_argument("--concurrency", type=int, default=256, help="most open connections (server mode)")
    p.add_argument("--scheduler", default="past-future", help="engine scheduler (cpu-engine mode)")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks of 16 tokens (cpu-engine mode)")
    p.add_argument("--max-running", type=int, default=64, help="largest engine batch (cpu-engine mode)")
    p.add_argument("--static-batch", type=int, default=8, help="static batch size (cpu-engine mode)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (cpu-engine mode)")
    p.add_argument("--out", default=None, help="result JSON path (default: benchmarks/results/serve_*.json)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if bool(args.url) == bool(args.cpu_engine):
        raise SystemExit("kdsl bench serve: give either --url URL or --cpu-engine")
    result = run_against_server(args) if args.url else run_cpu_engines(args)
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = Path(args.out) if args.out else RESULTS / f"serve_{result['mode']}_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if result["mode"] == "cpu-engine":
        e, s = result["kdsl_engine"], result["static_batching"]
        print(f"kdsl engine    : {e['throughput_tok_s']:8.1f} tok/s  TTFT p50 {e['ttft_p50']:.3f}s "
              f"p99 {e['ttft_p99']:.3f}s  ({e['forward_calls']} forwards)")
        print(f"static batching: {s['throughput_tok_s']:8.1f} tok/s  TTFT p50 {s['ttft_p50']:.3f}s "
              f"p99 {s['ttft_p99']:.3f}s  ({s['forward_calls']} forwards)")
        print(f"outputs equal: {result['outputs_equal']}")
    else:
        m = result["metrics"]
        print(f"{result['num_requests']} requests {result['statuses']}: {m['throughput_tok_s']:.1f} tok/s, "
              f"goodput {m['goodput_req_s']:.3f} req/s, TTFT p50/p99 {m['ttft_p50']}/{m['ttft_p99']} s, "
              f"TBT p50/p99 {m['tbt_p50']}/{m['tbt_p99']} s")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
