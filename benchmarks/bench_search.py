"""Search-strategy benchmark: replay brute-forced GPU tuning spaces and score search strategies.

Needs the Kernel Tuner cache files of ``../shared/data/tuning_spaces`` (relative to the repository
root) or ``--spaces DIR``; skips with a message when they are absent. Scores follow PAPERS.md,
"Scoring a search strategy" (autotune/search_scoring.py). Strategies, all on the same spaces in the
same run:

- ``kdsl``: kdsl's default strategy (autotune/strategy.py), the one the tuner uses;
- ``random``: uniform sampling without replacement;
- ``optuna-*``: Optuna's other samplers behind the same ask/tell loop (rank-encoded parameters,
  failures pruned, no configuration measured twice), so only the sampler differs;
- ``kt-*``: Kernel Tuner's strategies in simulation mode on unpacked copies of the same cache files,
  with a restriction admitting exactly the cached configurations (failed ones included, so a
  failure costs every strategy an evaluation).

Usage: ``python benchmarks/bench_search.py [--spaces DIR] [--repeats 25] [--quick]`` or
``kdsl bench search ...``.
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures as cf
import datetime
import json
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from autotune import search_scoring as scoring  # noqa: E402
from autotune import strategy as kdsl_strategy  # noqa: E402

DEFAULT_SPACES = REPO_ROOT.parent / "shared" / "data" / "tuning_spaces"
# Per 220-evaluation run on one core: kdsl, random, NSGA-II and most Kernel Tuner strategies take
# about a second; Optuna's TPE, QMC and CMA-ES samplers 2-10 s (their per-trial cost grows with the
# trials, and they re-propose measured points), Kernel Tuner's bayes_opt and basinhopping 3-15 s, and
# Optuna's GP sampler minutes. The default set keeps a 25-repeat run to minutes on two cores; --all
# adds the slow ones (GP only when named in --strategies).
OPTUNA_STRATEGIES = ("kdsl", "random", "optuna-tpe", "optuna-qmc", "optuna-nsga2", "optuna-cmaes",
                     "optuna-gp")
DEFAULT_OPTUNA = ("kdsl", "random", "optuna-nsga2")
ALL_OPTUNA = ("kdsl", "random", "optuna-tpe", "optuna-qmc", "optuna-nsga2", "optuna-cmaes")
KT_STRATEGIES = ("genetic_algorithm", "simulated_annealing", "random_sample", "greedy_ils",
                 "dual_annealing", "pso", "diff_evo", "firefly_algorithm", "mls")
KT_SLOW = ("basinhopping", "bayes_opt")
QUICK_OPTUNA = ("kdsl", "random", "optuna-nsga2")
QUICK_KT = ("genetic_algorithm", "pso", "random_sample")


# ---- strategies: each runs one search and returns its unique evaluations in order (None = failed)

def _optuna_sampler(name: str, seed: int):
    import optuna

    if name == "optuna-tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "optuna-qmc":
        return optuna.samplers.QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False,
                                          warn_asynchronous_seeding=False)
    if name == "optuna-nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "optuna-cmaes":
        import cmaes  # noqa: F401  (Optuna's CMA-ES needs it; ImportError -> skipped with the reason)

        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "optuna-gp":
        return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False)
    raise ValueError(f"unknown Optuna strategy {name}")


def run_optuna(space: scoring.TuningSpace, name: str, budget: int, seed: int) -> list:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    params = space.tunable

    def feasible(config):
        return None if space.contains(config) else "outside the space's restrictions"

    sampler = None if name == "kdsl" else _optuna_sampler(name, seed)
    study = kdsl_strategy.make_study(params, seed=seed, sampler=sampler, feasible=feasible)

    values = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while len(values) < budget:
            try:
                trial, config = kdsl_strategy.ask_config(study, params, feasible)
            except Exception as exc:  # an exhausted space ends the run early
                if "exhausted" in str(exc):
                    break
                raise
            value = space.evaluate(config)
            if value is None:
                kdsl_strategy.report_failure(study, trial, "failed in the brute-force measurement")
            else:
                kdsl_strategy.report_result(study, trial, value)
            values.append(value)
    return values


def run_random(space: scoring.TuningSpace, budget: int, seed: int) -> list:
    keys = list(space.times)
    rng = random.Random(seed)
    return [space.times[k] for k in rng.sample(keys, min(budget, len(keys)))]


class _KernelTunerFiles:
    """Unpacked cache copies per space, one temp dir per worker process (Kernel Tuner wants .json)."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="kdsl_kt_"))
        atexit.register(shutil.rmtree, self.dir, ignore_errors=True)
        self.files: dict[str, Path] = {}
        self.raw: dict[str, dict] = {}

    def get(self, space: scoring.TuningSpace, source: Path):
        if space.name not in self.files:
            import gzip

            opener = gzip.open if source.suffix == ".gz" else open
            with opener(source, "rt") as fh:
                data = json.load(fh)
            path = self.dir / (space.name.replace("/", "_") + ".json")
            path.write_text(json.dumps(data))
            self.files[space.name], self.raw[space.name] = path, data
        return self.files[space.name], self.raw[space.name]


_KT_FILES: _KernelTunerFiles | None = None


def run_kernel_tuner(space: scoring.TuningSpace, source: Path, strategy: str, budget: int, seed: int) -> list:
    global _KT_FILES
    from constraint import FunctionConstraint
    from kernel_tuner import tune_kernel

    if _KT_FILES is None:
        _KT_FILES = _KernelTunerFiles()
    path, data = _KT_FILES.get(space, source)
    keys = space.keys
    admitted = set(space.times)

    def cached_only(*values):
        return tuple(values) in admitted

    with warnings.catch_warnings(), open(os.devnull, "w") as devnull:
        warnings.simplefilter("ignore")
        stdout = sys.stdout
        sys.stdout = devnull  # some strategies print progress regardless of quiet
        try:
            results, _ = tune_kernel(
                data["kernel_name"], "", tuple(data["problem_size"]), [], data["tune_params"],
                restrictions=[FunctionConstraint(cached_only)], cache=str(path), simulation_mode=True,
                strategy=strategy, strategy_options={"max_fevals": budget}, quiet=True, seed=seed)
        finally:
            sys.stdout = stdout
    values, seen = [], set()
    for r in results:
        if not r:
            continue
        key = tuple(r[k] for k in keys)
        if key in seen:
            continue
        seen.add(key)
        values.append(space.times[key])
        if len(values) >= budget:
            break
    return values


# ---- parallel execution

_SPACES: dict[str, tuple[scoring.TuningSpace, Path]] = {}


def _init_worker(files: list[str]):
    for f in files:
        space = scoring.load_kernel_tuner_cache(f)
        _SPACES[space.name] = (space, Path(f))


def _task(strategy: str, space_name: str, budget: int, seed: int):
    space, source = _SPACES[space_name]
    start = time.perf_counter()
    try:
        if strategy == "random":
            values = run_random(space, budget, seed)
        elif strategy.startswith("kt-"):
            values = run_kernel_tuner(space, source, strategy[3:], budget, seed)
        else:
            values = run_optuna(space, strategy, budget, seed)
    except Exception as exc:  # a strategy that cannot run is reported as skipped with its reason
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        return strategy, space_name, seed, None, reason, time.perf_counter() - start
    return strategy, space_name, seed, values, None, time.perf_counter() - start


def parse_budgets(text: str) -> list[int]:
    """``20:220:20`` (start:stop:step, stop included) or ``10,50,100``."""
    try:
        if ":" in text:
            start, stop, step = (int(x) for x in text.split(":"))
            budgets = list(range(start, stop + 1, step))
        else:
            budgets = [int(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"--budgets: expected START:STOP:STEP or a comma list of ints, got {text!r}")
    if not budgets or min(budgets) < 1:
        raise SystemExit(f"--budgets: budgets must be positive, got {text!r}")
    return sorted(set(budgets))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdsl bench search", description=__doc__.split("\n\n")[0])
    p.add_argument("--spaces", type=Path, default=DEFAULT_SPACES,
                   help="directory of Kernel Tuner cache files (*.json, *.json.gz), searched recursively "
                        f"(default: {DEFAULT_SPACES})")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results file (default: benchmarks/results/search_<date>.json); the plot goes "
                        "beside it as .png")
    p.add_argument("--repeats", type=int, default=25, help="runs per strategy and space (>= 25 for a score)")
    p.add_argument("--budgets", default="20:220:20",
                   help="evaluation budgets: START:STOP:STEP (stop included) or a comma list")
    p.add_argument("--strategies", default=None,
                   help=f"kdsl/random/Optuna strategies, comma separated (default: {','.join(DEFAULT_OPTUNA)}; "
                        f"known: {', '.join(OPTUNA_STRATEGIES)}; optuna-gp takes minutes per run)")
    p.add_argument("--kt-strategies", default=None,
                   help=f"Kernel Tuner strategies, comma separated ('' for none; default: {','.join(KT_STRATEGIES)}; "
                        f"slow, with --all: {', '.join(KT_SLOW)})")
    p.add_argument("--all", action="store_true",
                   help="also run the slow strategies (Optuna TPE, QMC, CMA-ES; Kernel Tuner "
                        f"{', '.join(KT_SLOW)}): tens of minutes on two cores")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="base seed; repeat r uses seed+r")
    p.add_argument("--quick", action="store_true",
                   help="CI-size run: 2 spaces, 5 repeats, budgets 10..100, a few strategies")
    p.add_argument("--no-plot", action="store_true", help="skip the matplotlib plot")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.spaces.is_dir():
        print(f"search benchmark skipped: no tuning spaces at {args.spaces} "
              f"(get ../shared/data/tuning_spaces or pass --spaces DIR)")
        return 0
    files = sorted(str(p) for p in args.spaces.rglob("*") if p.name.endswith((".json", ".json.gz")))
    if not files:
        print(f"search benchmark skipped: no Kernel Tuner cache files (*.json, *.json.gz) under {args.spaces}")
        return 0
    default_optuna, default_kt = (ALL_OPTUNA, KT_STRATEGIES + KT_SLOW) if args.all else (DEFAULT_OPTUNA,
                                                                                        KT_STRATEGIES)
    strategies = [s for s in (args.strategies if args.strategies is not None
                              else ",".join(default_optuna)).split(",") if s]
    kt = [s for s in (args.kt_strategies if args.kt_strategies is not None else ",".join(default_kt)).split(",")
          if s]
    budgets = parse_budgets(args.budgets)
    repeats = args.repeats
    if args.quick:
        files, repeats, budgets = files[:2], min(repeats, 5), list(range(10, 101, 10))
        strategies = [s for s in strategies if s in QUICK_OPTUNA] or list(QUICK_OPTUNA)
        kt = [s for s in kt if s in QUICK_KT] or list(QUICK_KT)
    for s in strategies:
        if s not in OPTUNA_STRATEGIES:
            raise SystemExit(f"--strategies: unknown strategy {s!r} (known: {', '.join(OPTUNA_STRATEGIES)})")
    names = strategies + [f"kt-{s}" for s in kt]
    if repeats < 1:
        raise SystemExit("--repeats must be >= 1")

    _init_worker(files)
    spaces = {name: space for name, (space, _) in _SPACES.items()}
    max_budget = max(budgets)
    tasks = [(s, sp, max_budget, args.seed + r) for s in names for sp in spaces for r in range(repeats)]
    # Slow strategies first, so the pool does not end on a straggler.
    slow = {"optuna-gp": 0, "kt-bayes_opt": 0, "optuna-tpe": 1, "optuna-qmc": 1, "optuna-cmaes": 1,
            "kt-dual_annealing": 2, "kt-basinhopping": 2}
    tasks.sort(key=lambda t: slow.get(t[0], 9))
    runs: dict[tuple[str, str], list] = {}
    skipped: dict[str, str] = {}
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    from rich.progress import Progress

    done = 0

    def advance(progress, bar):
        nonlocal done
        progress.advance(bar)
        done += 1
        # Without a terminal the bar is invisible: log every 5 %.
        if not sys.stderr.isatty() and (done % max(1, len(tasks) // 20) == 0 or done == len(tasks)):
            print(f"[bench search] {done}/{len(tasks)} runs, {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)

    with Progress(transient=True) as progress:
        bar = progress.add_task("search strategies", total=len(tasks))
        if args.jobs > 1:
            with cf.ProcessPoolExecutor(args.jobs, initializer=_init_worker, initargs=(files,)) as pool:
                futures = [pool.submit(_task, *t) for t in tasks]
                for fut in cf.as_completed(futures):
                    _collect(fut.result(), runs, skipped, seconds)
                    advance(progress, bar)
        else:
            for t in tasks:
                _collect(_task(*t), runs, skipped, seconds)
                advance(progress, bar)
    wall = time.perf_counter() - start

    results = []
    for s in names:
        if s in skipped:
            continue
        for sp_name, space in spaces.items():
            ordered = [values for _, values in sorted(runs[(s, sp_name)], key=lambda x: x[0])]
            results.append(scoring.score_runs(space, s, ordered, budgets))
    report = _report(results, names, spaces, skipped, seconds, budgets, repeats, wall)
    out = args.out or REPO_ROOT / "benchmarks" / "results" / f"search_{datetime.date.today():%Y%m%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    plot = None if args.no_plot else _plot(results, names, out.with_suffix(".png"))
    _print_tables(report, spaces)
    print(f"results: {out}" + (f", plot: {plot}" if plot else "") + f" ({wall:.0f} s)")
    return 0


def _collect(result, runs, skipped, seconds):
    strategy, space, seed, values, reason, secs = result
    seconds[strategy] = seconds.get(strategy, 0.0) + secs
    if values is None:
        skipped.setdefault(strategy, reason)
        return
    runs.setdefault((strategy, space), []).append((seed, values))


def _report(results, names, spaces, skipped, seconds, budgets, repeats, wall):
    overall = {}
    for s in names:
        mine = [r for r in results if r.strategy == s]
        if mine:
            overall[s] = scoring.overall_score(mine)
    kt_scores = {s: v for s, v in overall.items() if s.startswith("kt-") and s != "kt-random_sample"}
    best_kt = max(kt_scores, key=kt_scores.get) if kt_scores else None
    summary = {"kdsl": overall.get("kdsl"), "random": overall.get("random"), "best_kernel_tuner": best_kt,
               "best_kernel_tuner_score": kt_scores.get(best_kt)}
    if summary["kdsl"] is not None and summary["random"] is not None:
        summary["kdsl_beats_random"] = summary["kdsl"] > summary["random"]
    if summary["kdsl"] is not None and best_kt is not None:
        summary["kdsl_at_least_best_kernel_tuner"] = summary["kdsl"] >= kt_scores[best_kt]
    return {
        "summary": summary,
        "methodology": "PAPERS.md 'Scoring a search strategy': target p=0.95; random baseline by sorted "
                       "index round(M(N+1)/(M+1)); standardised best-so-far mean over budgets and spaces",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "budgets": budgets, "repeats": repeats, "wall_seconds": round(wall, 1),
        "spaces": {name: {"configs": len(sp.times), "valid": int(len(sp.valid_times)),
                          "optimum": sp.optimum, "median": sp.median,
                          "target": scoring.target_value(sp),
                          "random_evals_to_target": scoring.random_budget_to_target(sp)}
                   for name, sp in spaces.items()},
        "overall": overall,
        "skipped": skipped,
        "cpu_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "per_space": [r.__dict__ for r in results],
    }


def _print_tables(report, spaces):
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 140)
    per = report["per_space"]
    order = sorted(report["overall"], key=lambda s: -report["overall"][s])
    for name in spaces:
        info = report["spaces"][name]
        t = Table(title=f"{name}: {info['valid']} valid configs, optimum {info['optimum']:.4g}, "
                        f"random search needs {info['random_evals_to_target']} evals to the p=0.95 target")
        t.add_column("strategy")
        t.add_column("score", justify="right")
        t.add_column("reached target", justify="right")
        t.add_column("evals to target", justify="right")
        t.add_column(f"best @ {report['budgets'][-1]}", justify="right")
        for s in order:
            r = next((x for x in per if x["strategy"] == s and x["space"] == name), None)
            if r is None:
                continue
            ett = r["mean_evals_to_target"]
            t.add_row(s, f"{r['score']:.3f}", f"{100 * r['reached_target']:.0f}%",
                      "-" if ett is None else f"{ett:.0f}", f"{r['mean_curve'][-1]:.4g}")
        console.print(t)
    t = Table(title=f"Overall score (mean over budgets {report['budgets'][0]}..{report['budgets'][-1]} "
                    f"and {len(spaces)} spaces, {report['repeats']} repeats; 0 = random search, 1 = optimum)")
    t.add_column("strategy")
    for name in spaces:
        t.add_column(name.split("/")[-1], justify="right")
    t.add_column("overall", justify="right")
    t.add_column("cpu s", justify="right")
    for s in order:
        row = [s]
        for name in spaces:
            r = next((x for x in per if x["strategy"] == s and x["space"] == name), None)
            row.append("-" if r is None else f"{r['score']:.3f}")
        row += [f"{report['overall'][s]:.3f}", f"{report['cpu_seconds'].get(s, 0):.0f}"]
        t.add_row(*row)
    console.print(t)
    for s, reason in report["skipped"].items():
        console.print(f"skipped {s}: {reason}")
    summary = report["summary"]
    if summary.get("kdsl") is not None:
        line = f"kdsl {summary['kdsl']:.3f}"
        if summary.get("random") is not None:
            line += f" vs random {summary['random']:.3f}"
        if summary.get("best_kernel_tuner"):
            line += f" vs best Kernel Tuner strategy {summary['best_kernel_tuner']} " \
                    f"{summary['best_kernel_tuner_score']:.3f}"
        console.print(line)


def _plot(results, names, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError as exc:
        print(f"plot skipped: {exc}")
        return None
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colours = plt.get_cmap("tab20").colors
    for i, s in enumerate(names):
        mine = [r for r in results if r.strategy == s]
        if not mine:
            continue
        curve = np.nanmean(np.array([r.standardised for r in mine]), axis=0)
        style = {"linewidth": 1.2, "color": colours[i % len(colours)],
                 "linestyle": "--" if s.startswith("kt-") else "-"}
        if s == "kdsl":
            style.update(linewidth=3, color="black")
        ax.plot(mine[0].budgets, curve, label=s, **style)
    ax.axhline(0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("standardised best-so-far (0 = random, 1 = optimum)")
    ax.set_title("Search strategies on brute-forced tuning spaces (mean over spaces)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
