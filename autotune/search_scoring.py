"""Scoring a search strategy on brute-forced tuning spaces (Kernel Tuner cache files).

The methodology is the one of the auto-tuning benchmark hub (see PAPERS.md, "Scoring a search
strategy"):

- a space is a fully measured set of configurations; failed configurations have no time;
- the *target* is ``f* + (f_med - f*) * (1 - p)`` with ``p = 0.95``;
- the random-search baseline at a budget of ``M`` evaluations is the value at sorted index
  ``round(M (N + 1) / (M + 1))`` (1-based) of the ``N`` valid times sorted from worst to best,
  i.e. the expected rank of the best of ``M`` draws without replacement;
- a strategy's best-so-far curve, averaged over repeats, is standardised at each budget as
  ``(f_strategy - f_random) / (f* - f_random)``: 0 is random search, 1 is the optimum;
- the score is the mean of the standardised curve over budgets, then over spaces.

A budget counts *unique* evaluations, failed ones included (a configuration that crashes still cost a
compile and a run); proposals outside the space cost nothing, as a tuner rejects them before running.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from dsl.errors import TuningError

TARGET_P = 0.95

ConfigKey = tuple


@dataclasses.dataclass(frozen=True)
class TuningSpace:
    """A brute-forced space: every configuration in it and its measured time (None = failed)."""

    name: str
    params: dict[str, tuple]               # the declared values of every tunable parameter
    keys: tuple[str, ...]                  # parameter order of configuration keys
    times: dict[ConfigKey, float | None]   # every configuration of the space -> time or None

    def __post_init__(self):
        valid = [t for t in self.times.values() if t is not None]
        if not valid:
            raise TuningError(f"tuning space '{self.name}' has no successfully measured configuration")
        object.__setattr__(self, "_valid", np.sort(np.asarray(valid, dtype=float)))

    @property
    def valid_times(self) -> np.ndarray:
        """The valid times, sorted from best (smallest) to worst."""
        return self._valid  # type: ignore[attr-defined]

    @property
    def optimum(self) -> float:
        return float(self.valid_times[0])

    @property
    def median(self) -> float:
        return float(np.median(self.valid_times))

    @property
    def tunable(self) -> dict[str, tuple]:
        """Parameters with more than one value: the ones a strategy actually chooses."""
        return {k: v for k, v in self.params.items() if len(v) > 1}

    def key(self, config: Mapping) -> ConfigKey:
        return tuple(config[k] if k in config else self.params[k][0] for k in self.keys)

    def contains(self, config: Mapping) -> bool:
        return self.key(config) in self.times

    def evaluate(self, config: Mapping) -> float | None:
        """The measured time of a configuration; None if it failed. KeyError outside the space."""
        return self.times[self.key(config)]

    def configs(self) -> list[dict]:
        return [dict(zip(self.keys, key)) for key in self.times]


def _is_time(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_kernel_tuner_cache(path: str | Path, name: str | None = None) -> TuningSpace:
    """Read a Kernel Tuner cache file (``.json`` or ``.json.gz``) into a :class:`TuningSpace`."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise TuningError(f"{path}: not a readable Kernel Tuner cache file ({exc})") from exc
    for field in ("tune_params", "cache"):
        if field not in data:
            raise TuningError(f"{path}: missing '{field}' (not a Kernel Tuner cache file)")
    params = {k: tuple(v) for k, v in data["tune_params"].items()}
    keys = tuple(data.get("tune_params_keys") or params)
    objective = data.get("objective", "time")
    times: dict[ConfigKey, float | None] = {}
    for entry in data["cache"].values():
        key = tuple(entry[k] for k in keys)
        value = entry.get(objective)
        # Failed configurations carry a string such as "RuntimeFailedConfig" instead of a number.
        times[key] = float(value) if _is_time(value) else None
    if name is None:
        stem = path.name.removesuffix(".gz").removesuffix(".json")
        name = f"{path.parent.name}/{stem}"
    return TuningSpace(name=name, params=params, keys=keys, times=times)


def load_spaces(directory: str | Path) -> list[TuningSpace]:
    """Every cache file below ``directory`` (sorted by path)."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.name.endswith((".json", ".json.gz")))
    return [load_kernel_tuner_cache(p) for p in files]


def target_value(space: TuningSpace, p: float = TARGET_P) -> float:
    return space.optimum + (space.median - space.optimum) * (1.0 - p)


def random_baseline(valid_times: Sequence[float], budget: int) -> float:
    """Expected best-so-far of random search after ``budget`` evaluations (sorted-index formula)."""
    worst_first = np.sort(np.asarray(valid_times, dtype=float))[::-1]
    n = len(worst_first)
    if n == 0:
        raise TuningError("random baseline of an empty set of times")
    index = round(budget * (n + 1) / (budget + 1))  # 1-based position in worst-to-best order
    return float(worst_first[min(max(index, 1), n) - 1])


def random_budget_to_target(space: TuningSpace, p: float = TARGET_P) -> int:
    """Evaluations random search needs, by the baseline formula, to reach the target."""
    target = target_value(space, p)
    n = len(space.valid_times)
    for budget in range(1, n + 1):
        if random_baseline(space.valid_times, budget) <= target:
            return budget
    return n


def best_so_far(values: Sequence[float | None], budgets: Iterable[int], worst: float) -> np.ndarray:
    """Best valid value within the first ``b`` evaluations for each budget ``b``.

    ``values`` are a run's unique evaluations in order (None for a failure). Before its first valid
    evaluation a run counts as ``worst``; a run that stopped early keeps its final best.
    """
    running, best = [], worst
    for v in values:
        if v is not None and v < best:
            best = v
        running.append(best)
    out = []
    for b in budgets:
        if b <= 0:
            out.append(worst)
        elif running:
            out.append(running[min(b, len(running)) - 1])
        else:
            out.append(worst)
    return np.asarray(out, dtype=float)


def evaluations_to_target(values: Sequence[float | None], target: float) -> int | None:
    """How many evaluations a run needed to reach ``target`` (None if it never did)."""
    for i, v in enumerate(values, 1):
        if v is not None and v <= target:
            return i
    return None


def standardise(curve: Sequence[float], space: TuningSpace, budgets: Sequence[int]) -> np.ndarray:
    """(f_strategy - f_random) / (f* - f_random) per budget; NaN where random already is optimal."""
    out = []
    for f, b in zip(curve, budgets):
        f_rand = random_baseline(space.valid_times, b)
        denom = space.optimum - f_rand
        out.append((f - f_rand) / denom if denom != 0 else math.nan)
    return np.asarray(out, dtype=float)


@dataclasses.dataclass
class SpaceScore:
    space: str
    strategy: str
    budgets: list[int]
    mean_curve: list[float]       # best-so-far averaged over repeats, per budget
    standardised: list[float]     # per budget
    score: float                  # mean of ``standardised`` over budgets
    repeats: int
    reached_target: float         # fraction of repeats that reached the target within the budget
    mean_evals_to_target: float | None  # over the repeats that reached it


def score_runs(space: TuningSpace, strategy: str, runs: Sequence[Sequence[float | None]],
               budgets: Sequence[int], p: float = TARGET_P) -> SpaceScore:
    """Score the repeated runs of one strategy on one space."""
    if not runs:
        raise TuningError(f"no runs of '{strategy}' on '{space.name}' to score")
    budgets = list(budgets)
    worst = float(space.valid_times[-1])
    curves = np.stack([best_so_far(r, budgets, worst) for r in runs])
    mean_curve = curves.mean(axis=0)
    std = standardise(mean_curve, space, budgets)
    target = target_value(space, p)
    hits = [evaluations_to_target(r[:max(budgets)], target) for r in runs]
    reached = [h for h in hits if h is not None]
    return SpaceScore(space=space.name, strategy=strategy, budgets=budgets,
                      mean_curve=mean_curve.tolist(), standardised=std.tolist(),
                      score=float(np.nanmean(std)) if np.isfinite(std).any() else math.nan,
                      repeats=len(runs), reached_target=len(reached) / len(runs),
                      mean_evals_to_target=float(np.mean(reached)) if reached else None)


def overall_score(scores: Iterable[SpaceScore]) -> float:
    """Mean over spaces of the per-space scores (each already a mean over budgets)."""
    values = [s.score for s in scores if math.isfinite(s.score)]
    return float(np.mean(values)) if values else math.nan
