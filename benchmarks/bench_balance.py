"""`kdsl bench balance`: the load-balancing methods side by side on the tiny preset.

Every method trains from the same seeds on the same token budget (steps x batch x seq_len); per run we
keep the final held-out perplexity per domain, MaxVio_global, AvgMaxVio / SupMaxVio over training
(and over the first steps, where BIP claims balance from the start) and the specialisation score
(mutual information between expert and domain, runtime.train.metrics). Results: mean and std over
seeds in benchmarks/results/balance.{json,md} and balance_*.png, plus a check of the published
directions (PAPERS.md "MoE load balancing").
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METHODS = ("none", "micro", "global", "aux_free", "bip")
EARLY_STEPS = 5


def _parse(argv):
    p = argparse.ArgumentParser(prog="kdsl bench balance", description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated balance methods")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (>= 3 for the published comparison)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 30; quick 16)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 8; quick 4)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 64; quick 32)")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per step (micro vs global differ only then)")
    p.add_argument("--lbl-weight", type=float, default=0.01, help="LBL weight of micro/global")
    p.add_argument("--aux-free-rate", type=float, default=1e-3, help="aux-free bias update rate")
    p.add_argument("--eval-windows", type=int, default=None, help="held-out sequences per domain (default 16; quick 8)")
    p.add_argument("--quick", action="store_true", help="a smoke-sized run (minutes)")
    p.add_argument("--summarise-only", action="store_true",
                   help="train nothing: rebuild the table and plots from the finished runs in OUT/balance_runs")
    p.add_argument("--data-dir", type=Path, default=None, help="prepared corpus (default: kdsl cache dir)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results directory")
    return p.parse_args(argv)


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_one(method, seed, args, runs_dir):
    from runtime.train.trainer import TrainConfig, Trainer

    out = runs_dir / f"{method}-s{seed}"
    if out.exists():
        shutil.rmtree(out)  # the benchmark's own scratch runs
    cfg = TrainConfig(preset="tiny", balance=method, steps=args.steps, seed=seed, lbl_weight=args.lbl_weight,
                      aux_free_rate=args.aux_free_rate, accum=args.accum, batch_size=args.batch_size,
                      seq_len=args.seq_len, eval_windows=args.eval_windows,
                      data_dir=str(args.data_dir) if args.data_dir else None)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, out)
    steps = trainer.run()
    ev = trainer.last_eval
    for ckpt in [*out.glob("ckpt_*.safetensors"), out / "checkpoint.json"]:
        ckpt.unlink(missing_ok=True)   # ~30 MB each; the metrics are what the benchmark keeps
    history = [r["maxvio_batch"] for r in steps]
    return {"method": method, "seed": seed, "ppl": ev["ppl"], "ppl_avg": ev["ppl_avg"],
            "maxvio_global": ev["maxvio_global"], "avg_maxvio": statistics.fmean(history),
            "sup_maxvio": max(history), "early_avg_maxvio": statistics.fmean(history[:EARLY_STEPS]),
            "specialisation": ev["specialisation"], "max_share": ev["max_share"],
            "final_loss": statistics.fmean(r["loss"] for r in steps[-3:]),
            "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in steps), "maxvio_history": history,
            "seconds": time.perf_counter() - t0, "run_dir": str(out)}


def record_from_run_dir(run_dir: Path) -> dict | None:
    """The result record of a finished run, rebuilt from its metrics.jsonl (None if it did not finish)."""
    from runtime.train.trainer import read_metrics

    config = json.loads((run_dir / "config.json").read_text())["train"]
    metrics = read_metrics(run_dir)
    steps = [m for m in metrics if m["kind"] == "step"]
    evals = [m for m in metrics if m["kind"] == "eval"]
    if not steps or len(steps) < config["steps"] or not evals:
        return None
    ev, history = evals[-1], [r["maxvio_batch"] for r in steps]
    return {"method": config["balance"], "seed": config["seed"], "ppl": ev["ppl"], "ppl_avg": ev["ppl_avg"],
            "maxvio_global": ev["maxvio_global"], "avg_maxvio": statistics.fmean(history),
            "sup_maxvio": max(history), "early_avg_maxvio": statistics.fmean(history[:EARLY_STEPS]),
            "specialisation": ev["specialisation"], "max_share": ev["max_share"],
            "final_loss": statistics.fmean(r["loss"] for r in steps[-3:]),
            "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in steps), "maxvio_history": history,
            "seconds": sum(r["seconds"] for r in steps), "run_dir": str(run_dir),
            "setup": (config["steps"], config["batch_size"], config["seq_len"], config["accum"])}


def summarise(runs, methods):
    table = {}
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        if not mine:
            continue
        row = {"seeds": len(mine)}
        for key in ("ppl_avg", "maxvio_global", "avg_maxvio", "sup_maxvio", "early_avg_maxvio", "specialisation",
                    "max_share", "final_loss", "tokens_per_s"):
            row[key], row[key + "_std"] = _mean_std([r[key] for r in mine])
        for d in mine[0]["ppl"]:
            row[f"ppl_{d}"], row[f"ppl_{d}_std"] = _mean_std([r["ppl"][d] for r in mine])
        table[m] = row
    return table


def directions(table):
    """The published claims as checks on the measured means (None where a method is missing)."""
    def get(m, k):
        return table.get(m, {}).get(k)

    out = {}
    if "micro" in table and "global" in table:
        out["global_lower_ppl_than_micro"] = get("global", "ppl_avg") < get("micro", "ppl_avg")
        out["global_more_specialised_than_micro"] = get("global", "specialisation") > get("micro", "specialisation")
    lbl = [m for m in ("micro", "global") if m in table]
    if "aux_free" in table and lbl:
        best = min(get(m, "maxvio_global") for m in lbl)
        out["aux_free_lower_maxvio_global_than_lbl"] = get("aux_free", "maxvio_global") < best
        ppl_lbl = min(get(m, "ppl_avg") for m in lbl)
        out["aux_free_ppl_within_2pct_of_lbl"] = abs(get("aux_free", "ppl_avg") / ppl_lbl - 1) <= 0.02
    if "bip" in table:
        others = [m for m in table if m != "bip"]
        out["bip_lowest_early_maxvio"] = all(get("bip", "early_avg_maxvio") < get(m, "early_avg_maxvio")
                                             for m in others)
        out["bip_lowest_sup_maxvio"] = all(get("bip", "sup_maxvio") < get(m, "sup_maxvio") for m in others)
    return out


def _fmt(v, s=None, digits=3):
    if v is None:
        return "-"
    return f"{v:.{digits}f}" + (f" ± {s:.{digits}f}" if s else "")


def write_markdown(path, table, checks, setup):
    domains = sorted(k[4:] for k in next(iter(table.values())) if k.startswith("ppl_") and not k.endswith("_std")
                     and k != "ppl_avg")
    lines = [f"# Load balancing on the tiny preset ({setup})", "",
             "| method | " + " | ".join(f"ppl {d}" for d in domains)
             + " | ppl avg | MaxVio_global | AvgMaxVio | SupMaxVio | early AvgMaxVio | specialisation (bits) "
             "| max share | tok/s |",
             "|---" * (len(domains) + 9) + "|"]
    for m, row in table.items():
        cells = [_fmt(row[f"ppl_{d}"], row[f"ppl_{d}_std"], 1) for d in domains]
        cells += [_fmt(row["ppl_avg"], row["ppl_avg_std"], 1), _fmt(row["maxvio_global"], row["maxvio_global_std"]),
                  _fmt(row["avg_maxvio"], row["avg_maxvio_std"]), _fmt(row["sup_maxvio"], row["sup_maxvio_std"]),
                  _fmt(row["early_avg_maxvio"], row["early_avg_maxvio_std"]),
                  _fmt(row["specialisation"], row["specialisation_std"], 4), _fmt(row["max_share"], None),
                  _fmt(row["tokens_per_s"], None, 0)]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Published directions (means over seeds):", ""]
    lines += [f"- {name}: {'yes' if ok else 'no'}" for name, ok in checks.items()]
    path.write_text("\n".join(lines) + "\n")


def plot(out, runs, table):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(table)
    domains = sorted(runs[0]["ppl"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        ax.bar([j + i * width for j in range(len(domains))], [table[m][f"ppl_{d}"] for d in domains], width,
               yerr=[table[m][f"ppl_{d}_std"] for d in domains], label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(domains))], domains)
    ax.set(ylabel="held-out perplexity", title="per-domain perplexity (mean over seeds)")
    ax.legend(fontsize=8)
    fig.savefig(out / "balance_ppl.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    for m in methods:
        hists = [r["maxvio_history"] for r in runs if r["method"] == m]
        mean = [statistics.fmean(h[i] for h in hists) for i in range(len(hists[0]))]
        ax.plot(range(1, len(mean) + 1), mean, label=m)
    ax.set(xlabel="step", ylabel="MaxVio_batch", title="MaxVio_batch over training (mean over seeds)")
    ax.legend(fontsize=8)
    fig.savefig(out / "balance_maxvio.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, title in zip(axes, ("maxvio_global", "avg_maxvio", "specialisation"),
                              ("MaxVio_global (held-out)", "AvgMaxVio (training)", "specialisation I(expert; domain)")):
        ax.bar(methods, [table[m][key] for m in methods], yerr=[table[m][key + "_std"] for m in methods])
        ax.set_title(title, fontsize=9)
    fig.savefig(out / "balance_summary.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    args = _parse(argv if argv is not None else sys.argv[1:])
    from dsl.errors import TrainingError
    from runtime.nn.moe import BALANCE_METHODS

    defaults = (16, 4, 32, 8) if args.quick else (30, 8, 64, 16)
    args.eval_windows = args.eval_windows or defaults[3]
    args.steps = args.steps or defaults[0]
    args.batch_size = args.batch_size or defaults[1]
    args.seq_len = args.seq_len or defaults[2]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in BALANCE_METHODS]
    if bad:
        raise TrainingError(f"unknown balance method(s) {', '.join(bad)}; valid: {', '.join(BALANCE_METHODS)}")
    if args.seeds < 1:
        raise TrainingError("--seeds must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    runs_dir = args.out / "balance_runs"
    runs = []
    t0 = time.perf_counter()
    if args.summarise_only:
        found = [record_from_run_dir(d) for d in sorted(runs_dir.glob("*-s*")) if (d / "config.json").is_file()]
        runs = [r for r in found if r is not None and r["method"] in methods]
        if not runs:
            raise TrainingError(f"no finished runs under {runs_dir}")
        args.steps, args.batch_size, args.seq_len, args.accum = runs[0]["setup"]
        if any(r["setup"] != runs[0]["setup"] for r in runs):
            raise TrainingError(f"the runs under {runs_dir} have different token budgets; rerun the benchmark")
        args.seeds = len({r["seed"] for r in runs})
        methods = [m for m in methods if any(r["method"] == m for r in runs)]
    for seed in range(0 if args.summarise_only else args.seeds):
        for m in methods:
            r = run_one(m, seed, args, runs_dir)
            runs.append(r)
            print(f"[{time.perf_counter() - t0:6.0f}s] {m:9s} seed {seed}: ppl {r['ppl_avg']:.1f} "
                  f"MaxVio_global {r['maxvio_global']:.3f} AvgMaxVio {r['avg_maxvio']:.3f} "
                  f"spec {r['specialisation']:.4f}", flush=True)
    table = summarise(runs, methods)
    checks = directions(table)
    setup = (f"{args.steps} steps x {args.batch_size} seqs x {args.seq_len} tokens, accum {args.accum}, "
             f"{args.seeds} seeds")
    (args.out / "balance.json").write_text(json.dumps({"setup": setup, "table": table, "directions": checks,
                                                       "runs": runs}, indent=2) + "\n")
    write_markdown(args.out / "balance.md", table, checks, setup)
    plot(args.out, runs, table)
    print((args.out / "balance.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
