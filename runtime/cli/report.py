"""`kdsl report`: plot training runs (loss, per-domain perplexity, MaxVio) from their metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from dsl.errors import TrainingError


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="plot loss, per-domain perplexity and MaxVio of training runs",
                              description="Read RUN_DIR/metrics.jsonl of one or more `kdsl train` runs and "
                              "write loss.png, perplexity.png and maxvio.png (runs overlaid).")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories of `kdsl train`")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for the PNGs (default: the first RUN_DIR)")
    p.set_defaults(func=_report)


def _label(run: Path, metrics: list[dict]) -> str:
    return run.name or str(run)


def plot_runs(runs: list[Path], out: Path) -> list[Path]:
    """Write loss.png, perplexity.png and maxvio.png for ``runs`` into ``out``; return the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from runtime.train.trainer import read_metrics

    loaded = [(run, read_metrics(run)) for run in runs]
    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    for run, metrics in loaded:
        steps = [m for m in metrics if m["kind"] == "step"]
        ax.plot([m["step"] for m in steps], [m["loss"] for m in steps], label=_label(run, metrics))
    ax.set(xlabel="step", ylabel="training loss (cross-entropy)", title="loss")
    ax.legend(fontsize=7)
    written.append(out / "loss.png")
    fig.savefig(written[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)

    evals_by_run = [(run, [m for m in metrics if m["kind"] == "eval"]) for run, metrics in loaded]
    domains = sorted({d for _, evals in evals_by_run for e in evals for d in e["ppl"]})
    if domains:
        fig, axes = plt.subplots(1, len(domains), figsize=(3.2 * len(domains), 3.4), squeeze=False)
        for ax, domain in zip(axes[0], domains):
            for run, evals in evals_by_run:
                pts = [(e["step"], e["ppl"][domain]) for e in evals if domain in e["ppl"]]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=run.name)
            ax.set(title=domain, xlabel="step", ylabel="held-out perplexity")
            ax.set_yscale("log")
        axes[0][0].legend(fontsize=7)
        written.append(out / "perplexity.png")
        fig.savefig(written[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)

    fig, (ax_b, ax_g) = plt.subplots(1, 2, figsize=(10, 3.6))
    for run, metrics in loaded:
        steps = [m for m in metrics if m["kind"] == "step"]
        ax_b.plot([m["step"] for m in steps], [m["maxvio_batch"] for m in steps], label=run.name)
        evals = [m for m in metrics if m["kind"] == "eval"]
        if evals:
            ax_g.plot([e["step"] for e in evals], [e["maxvio_global"] for e in evals], marker="o", label=run.name)
    ax_b.set(xlabel="step", ylabel="MaxVio_batch (mean over layers)", title="MaxVio per training batch")
    ax_g.set(xlabel="step", ylabel="MaxVio_global", title="MaxVio on the held-out set")
    ax_b.legend(fontsize=7)
    written.append(out / "maxvio.png")
    fig.savefig(written[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    return written


def _report(args) -> int:
    for run in args.runs:
        if not run.is_dir():
            raise TrainingError(f"{run} is not a directory")
    for path in plot_runs(list(args.runs), args.out or args.runs[0]):
        print(path)
    return 0
