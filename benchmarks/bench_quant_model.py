"""Held-out perplexity of a trained MoE model before and after weight quantization.

Loads a ``kdsl train`` run directory, evaluates per-domain held-out perplexity in float, then again
after each ``--quant`` mode of ``kdsl serve`` (runtime.serve.loading.quantize_for_serving: every
linear layer and every expert, round-to-nearest, group 128, the experts packed as QuantExperts;
embeddings, norms and routers stay float), each on a fresh copy of the checkpoint. Same windows,
same run.

Usage: ``kdsl bench quant_model RUN_DIR [--modes w8,w4] [--windows 32] [--max-increase 5]``.
Exits 1 when a mode raises the average perplexity by more than ``--max-increase`` percent.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import write_results  # noqa: E402


def evaluate(run_dir: Path, modes: list[str], windows: int, data_dir: Path | None = None) -> dict:
    """{"float": {...}, mode: {...}}: per-domain perplexity and its average for each mode."""
    from runtime.serve.loading import load_checkpoint, quantize_for_serving
    from runtime.train.data import PackedDataset, default_data_dir
    from runtime.train.trainer import heldout_perplexity

    record = json.loads((run_dir / "checkpoint.json").read_text())
    train = record.get("train_config") or {}
    data_dir = data_dir or (Path(train["data_dir"]) if train.get("data_dir") else default_data_dir())
    mc = record["model_config"]
    results = {}
    for mode in ["float", *modes]:
        model, _, name = load_checkpoint(run_dir, backend="torch")
        summary = {"packed": 0, "simulated": 0} if mode == "float" else quantize_for_serving(model, mode)
        ppl = {}
        for domain in record["data"]["domains"]:
            data = PackedDataset(data_dir, "heldout", seq_len=mc["seq_len"], batch_size=mc["batch_size"],
                                 seed=0, domains=[domain])
            ppl[domain] = heldout_perplexity(model, data, windows, mc["batch_size"])
        results[mode] = {"ppl": ppl, "ppl_avg": sum(ppl.values()) / len(ppl), "model": name, **summary}
    base = results["float"]["ppl_avg"]
    for mode in modes:
        results[mode]["increase_pct"] = 100.0 * (results[mode]["ppl_avg"] / base - 1.0)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="kdsl bench quant_model", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, help="a `kdsl train` run directory")
    p.add_argument("--modes", default="w8,w4", help="comma-separated --quant modes (w8, w4)")
    p.add_argument("--windows", type=int, default=32, help="held-out sequences per domain")
    p.add_argument("--data-dir", type=Path, default=None, help="prepared corpus (default: the run's)")
    p.add_argument("--max-increase", type=float, default=5.0,
                   help="bound on the average perplexity increase in percent (exit 1 above it)")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/quant_model_DATE.json)")
    args = p.parse_args(argv)
    if not (args.run_dir / "checkpoint.json").is_file():
        print(f"kdsl bench quant_model: {args.run_dir} is not a training run (no checkpoint.json)", file=sys.stderr)
        return 2
    modes = [m for m in args.modes.split(",") if m]
    results = evaluate(args.run_dir, modes, args.windows, args.data_dir)

    from rich.console import Console
    from rich.table import Table

    domains = list(results["float"]["ppl"])
    table = Table(title=f"held-out perplexity of {results['float']['model']} ({args.windows} windows per domain)")
    for col in ["weights", *domains, "average", "vs float"]:
        table.add_column(col, justify="right")
    for mode, r in results.items():
        change = "-" if mode == "float" else f"{r['increase_pct']:+.2f}%"
        table.add_row(mode, *(f"{r['ppl'][d]:.2f}" for d in domains), f"{r['ppl_avg']:.2f}", change)
    Console().print(table)
    path = write_results("quant_model", {"run_dir": str(args.run_dir), "windows": args.windows,
                                         "bound_pct": args.max_increase, "results": results}, args.out)
    print(f"results: {path}")
    worst = max((results[m]["increase_pct"] for m in modes), default=0.0)
    return 0 if worst <= args.max_increase else 1


if __name__ == "__main__":
    raise SystemExit(main())
