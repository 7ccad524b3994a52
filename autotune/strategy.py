"""kdsl's default search strategy over a discrete tuning space, as an Optuna setup.

Independent of measurement: the tuner (or the search benchmark) asks for a configuration with
:func:`ask_config`, measures it however it measures, and reports back with :func:`report_result`,
:func:`report_failure` or :func:`report_invalid`.

Choices, and why (measured with ``kdsl bench search`` on the brute-forced spaces of
``../shared/data/tuning_spaces``; numbers in benchmarks/results/):

- **Ordinal encoding.** Every tunable value list is sorted and Optuna sees the *rank* of a value
  (``IntDistribution(0, n - 1)``), not a category: tile sizes, warps and stages are ordered and
  neighbouring values perform alike. The real values are kept in the trial's user attribute
  ``config``.
- **An exact discrete TPE** (:class:`DiscreteTPESampler`). Tuning spaces are small enough (a few
  thousand points after constraints) to score every unmeasured feasible point with the TPE ratio
  l(x)/g(x), instead of drawing a few dozen candidates as Optuna's ``TPESampler`` does. It never
  proposes a measured, running or infeasible point, which matters when every evaluation is a
  compile and a benchmark; it costs milliseconds per trial. A short random start, a small good
  fraction, a narrow kernel and a little random exploration won on the benchmark against Optuna's
  TPE/QMC/NSGA-II/CMA-ES/GP samplers and Kernel Tuner's strategies.
- **Warm start** from the cost model's top candidates and configs tuned for nearby shapes:
  :func:`make_study` enqueues them ahead of the random start.
- **Failures teach.** A configuration that failed to compile or run, or was rejected before running
  (constraint, static check), is reported as a PRUNED trial with its reason in the user attribute
  ``failure`` / ``invalid``; the sampler counts it with the bad points, so it avoids the region.
- **No measurement twice.** Proposals equal to a measured configuration (warm-start repeats, other
  samplers) are answered from the study; after ``MAX_DUPLICATES`` in a row the next configuration
  is an unmeasured neighbour of the best one, or a random unmeasured one.
- Several workers on one study (shared storage) do not receive each other's RUNNING points.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import optuna
from optuna.distributions import IntDistribution
from optuna.trial import FrozenTrial, Trial, TrialState

from dsl.errors import TuningError

log = logging.getLogger(__name__)

Params = Mapping[str, Sequence]
Config = dict
Feasible = Callable[[Config], "str | None"]   # returns the reason a config is invalid, or None

STARTUP_TRIALS = 5
MAX_DUPLICATES = 3
CONFIG_ATTR = "config"
FAILURE_ATTR = "failure"
INVALID_ATTR = "invalid"


def ordered_values(values: Sequence) -> tuple:
    """The distinct values of a parameter, in order (numeric order where they are numbers)."""
    distinct = list(dict.fromkeys(values))
    if not distinct:
        raise TuningError("a tunable parameter has no values")
    try:
        return tuple(sorted(distinct))
    except TypeError:  # mixed types: keep the declared order
        return tuple(distinct)


def _space(params: Params) -> dict[str, tuple]:
    return {name: ordered_values(values) for name, values in params.items()}


def distributions(params: Params) -> dict[str, IntDistribution]:
    """What Optuna sees: the rank of each value of each parameter with more than one value."""
    return {name: IntDistribution(0, len(values) - 1) for name, values in _space(params).items()
            if len(values) > 1}


def suggest_config(trial: Trial, params: Params) -> Config:
    """Draw a configuration from ``trial`` (rank-encoded); the real values go to user attrs."""
    config = {}
    for name, values in _space(params).items():
        config[name] = values[0] if len(values) == 1 else values[trial.suggest_int(name, 0, len(values) - 1)]
    trial.set_user_attr(CONFIG_ATTR, config)
    return config


def encode(config: Mapping, params: Params) -> dict[str, int]:
    """Ranks of a configuration's values; raises TuningError for a value outside the space."""
    ranks = {}
    for name, values in _space(params).items():
        if name not in config:
            raise TuningError(f"configuration {dict(config)} lacks parameter {name}")
        if config[name] not in values:
            raise TuningError(f"{name}={config[name]!r} is not one of {list(values)}")
        if len(values) > 1:
            ranks[name] = values.index(config[name])
    return ranks


def config_of(trial: FrozenTrial, params: Params) -> Config | None:
    """The configuration a finished trial stands for (None for a trial that never drew one)."""
    if CONFIG_ATTR in trial.user_attrs:
        return dict(trial.user_attrs[CONFIG_ATTR])
    space = _space(params)
    if not all(name in trial.params or len(values) == 1 for name, values in space.items()):
        return None
    return {name: values[trial.params[name]] if len(values) > 1 else values[0]
            for name, values in space.items()}


def _key(config: Mapping) -> tuple:
    return tuple(sorted(config.items()))


class DiscreteTPESampler(optuna.samplers.BaseSampler):
    """Tree-structured Parzen estimation over an enumerated discrete space.

    Optuna's ``TPESampler`` draws a couple of dozen points from the density of good trials and keeps
    the one with the best good/bad density ratio; on a small discrete space those draws often repeat
    measured or infeasible points, and each ask walks every trial again. Tuning spaces have a few
    thousand points, so this sampler scores *every* unmeasured feasible point exactly:

    - each observed configuration contributes a product kernel over parameter ranks (a Gaussian of
      ``bandwidth`` ranks per parameter, normalised over its values), cached per observation;
    - the best ``gamma`` fraction (at most ``max_good``) of measured trials forms the good density
      l(x); the rest and every failed or rejected (PRUNED) trial the bad density g(x); both are mixed
      with a uniform prior of weight ``prior_weight``;
    - the next point is the unmeasured feasible one with the largest log l(x) - log g(x); with
      probability ``local`` the best-scoring one among the neighbours of the incumbent (one
      parameter one rank away), which refines a good region faster than the global ratio does;
      with probability ``explore`` (and for the first ``n_startup_trials``) a uniformly random one,
      so a wrong early model cannot trap the search.

    Points of RUNNING trials (other workers) are not proposed again. Spaces larger than
    ``MAX_ENUMERATED`` points are scored on a fresh random pool each step.
    """

    MAX_ENUMERATED = 50_000
    POOL = 20_000

    def __init__(self, params: Params, *, feasible: Feasible | None = None, seed: int | None = None,
                 n_startup_trials: int = STARTUP_TRIALS, gamma: float = 0.1, max_good: int = 25,
                 bandwidth: float = 0.5, prior_weight: float = 1.0, explore: float = 0.1, local: float = 0.25):
        self._space = _space(params)
        self._names = [n for n, v in self._space.items() if len(v) > 1]
        self._sizes = np.array([len(self._space[n]) for n in self._names], dtype=np.int64)
        self._dists = distributions(params)
        self._feasible = feasible
        self._rng = np.random.default_rng(seed)
        self._seed = seed
        self.n_startup_trials = n_startup_trials
        self.gamma, self.max_good = gamma, max_good
        self.prior_weight, self.explore, self.local = prior_weight, explore, local
        # Per parameter: kernel[v, w] = weight of value rank v for an observation at rank w.
        self._kernels = []
        for n in self._sizes:
            r = np.arange(n)
            k = np.exp(-0.5 * ((r[:, None] - r[None, :]) / bandwidth) ** 2)
            self._kernels.append(k / k.sum(axis=0, keepdims=True))
        total = int(np.prod(self._sizes)) if len(self._sizes) else 1
        self._enumerated = total <= self.MAX_ENUMERATED
        self._points: np.ndarray | None = None     # candidate rank vectors (enumerated spaces)
        self._finished: dict[int, tuple] = {}        # trial id -> (ranks, value or inf)
        self._row_of: dict[tuple, int] = {}          # observed point -> row of self._rows
        self._rows: np.ndarray | None = None         # kernel weight of each observed point, all candidates
        self._lookup: np.ndarray | None = None       # point code -> index in the enumerated points
        # Mixed-radix code of a rank vector: a unique int per point of the space.
        self._radix = np.cumprod(np.concatenate([[1], self._sizes[::-1][:-1]]))[::-1].astype(np.int64) \
            if len(self._sizes) else np.zeros(0, dtype=np.int64)

    # -- Optuna sampler interface

    def reseed_rng(self) -> None:
        self._rng = np.random.default_rng()

    def infer_relative_search_space(self, study, trial):
        return dict(self._dists)

    def sample_independent(self, study, trial, param_name, param_distribution):
        # Only reached for parameters outside the declared space (or enqueued odd ones).
        return optuna.samplers.RandomSampler(seed=int(self._rng.integers(1 << 31))).sample_independent(
            study, trial, param_name, param_distribution)

    def sample_relative(self, study, trial, search_space):
        if not search_space or not self._names:
            return {}
        observed, values, busy = self._observations(study, trial)
        points = self._candidates(observed, busy)
        if len(points) == 0:
            return {}  # nothing unmeasured left: the caller's duplicate handling takes over
        if len(observed) < self.n_startup_trials:
            choice = points[self._rng.integers(len(points))]
        elif self.local and self._rng.random() < self.local and np.isfinite(values).any():
            # A local move: the best-scoring unmeasured point one rank away from the incumbent.
            incumbent = np.asarray(observed[int(np.argmin(values))])
            near = points[np.abs(points - incumbent).sum(axis=1) == 1]
            pool = near if len(near) else points
            choice = pool[self._best(pool, observed, values)]
        elif self._rng.random() < self.explore:
            choice = points[self._rng.integers(len(points))]
        else:
            choice = points[self._best(points, observed, values)]
        return {name: int(choice[j]) for j, name in enumerate(self._names)}

    # -- model

    def _observations(self, study, current):
        observed, values, busy = [], [], set()
        for t in study.get_trials(deepcopy=False):
            if t.number == current.number:
                continue
            if t.state in (TrialState.RUNNING, TrialState.WAITING):
                ranks = self._ranks_of(t)
                if ranks is not None:
                    busy.add(ranks)
                continue
            # A finished trial never changes: parse it once.
            entry = self._finished.get(t._trial_id)
            if entry is None:
                ranks = self._ranks_of(t)
                ok = t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)
                # Failed or rejected trials count with the bad points.
                entry = self._finished[t._trial_id] = (ranks, float(t.value) if ok else math.inf)
            if entry[0] is not None:
                observed.append(entry[0])
                values.append(entry[1])
        return observed, np.asarray(values, dtype=float), busy

    def _ranks_of(self, t) -> tuple | None:
        try:
            ranks = tuple(int(t.params[n]) for n in self._names)
        except KeyError:
            return None
        if any(r < 0 or r >= s for r, s in zip(ranks, self._sizes)):
            return None  # a trial from an older version of the space
        return ranks

    def _all_points(self) -> np.ndarray:
        if self._points is None:
            grids = np.meshgrid(*[np.arange(n) for n in self._sizes], indexing="ij")
            points = np.stack([g.ravel() for g in grids], axis=1)
            if self._feasible is not None:
                keep = [self._feasible(self._config(p)) is None for p in points]
                points = points[np.asarray(keep, dtype=bool)]
            self._points = points
        return self._points

    def _config(self, ranks) -> Config:
        config = {n: v[0] for n, v in self._space.items() if len(v) == 1}
        for j, name in enumerate(self._names):
            config[name] = self._space[name][int(ranks[j])]
        return config

    def _codes(self, points: np.ndarray) -> np.ndarray:
        return points @ self._radix

    def _candidates(self, observed, busy) -> np.ndarray:
        if self._enumerated:
            points = self._all_points()
        else:
            points = np.stack([self._rng.integers(0, n, size=self.POOL) for n in self._sizes], axis=1)
            points = np.unique(points, axis=0)
            if self._feasible is not None:
                points = points[np.asarray([self._feasible(self._config(p)) is None for p in points], dtype=bool)]
        taken = list(observed) + list(busy)
        if not taken:
            return points
        used = self._codes(np.asarray(taken, dtype=np.int64))
        return points[~np.isin(self._codes(points), used)]

    def _kernel_row(self, points: np.ndarray, obs) -> np.ndarray:
        row = np.full(len(points), float(np.prod(self._sizes)))  # scaled so the uniform density is 1
        for j, k in enumerate(self._kernels):
            row *= k[points[:, j], obs[j]]
        return row

    def _densities(self, points: np.ndarray, observed, good, bad) -> tuple[np.ndarray, np.ndarray]:
        """Summed kernel weights of the good and the bad observations at every candidate."""
        if not self._enumerated:
            rows = np.stack([self._kernel_row(points, obs) for obs in observed])
            return rows[good].sum(axis=0), rows[bad].sum(axis=0)
        full = self._all_points()
        if self._lookup is None:
            self._lookup = np.full(int(np.prod(self._sizes)), -1, dtype=np.int64)
            self._lookup[self._codes(full)] = np.arange(len(full))
        # One cached row per distinct observed point, over the whole enumerated space.
        slots = []
        for obs in observed:
            slot = self._row_of.get(obs)
            if slot is None:
                if self._rows is None or len(self._row_of) == len(self._rows):
                    grown = np.empty((max(64, 2 * len(self._row_of)), len(full)))
                    if self._rows is not None:
                        grown[:len(self._rows)] = self._rows
                    self._rows = grown
                slot = self._row_of[obs] = len(self._row_of)
                self._rows[slot] = self._kernel_row(full, obs)
            slots.append(slot)
        slots = np.asarray(slots, dtype=np.int64)
        idx = self._lookup[self._codes(points)]
        l_sum = self._rows[slots[good]].sum(axis=0)[idx] if len(good) else np.zeros(len(points))
        g_sum = self._rows[slots[bad]].sum(axis=0)[idx] if len(bad) else np.zeros(len(points))
        return l_sum, g_sum

    def _best(self, points: np.ndarray, observed, values: np.ndarray) -> int:
        finite = np.isfinite(values)
        n_good = int(min(self.max_good, max(1, math.ceil(self.gamma * finite.sum()))))
        order = np.argsort(np.where(finite, values, np.inf), kind="stable")
        good, bad = order[:n_good], order[n_good:]
        l_sum, g_sum = self._densities(points, observed, good, bad)
        w = self.prior_weight
        log_l = np.log((l_sum + w) / (len(good) + w))
        log_g = np.log((g_sum + w) / (len(bad) + w))
        score = log_l - log_g
        best = np.flatnonzero(score >= score.max() - 1e-12)
        return int(best[self._rng.integers(len(best))])


def make_sampler(params: Params, seed: int | None = None, feasible: Feasible | None = None
                 ) -> optuna.samplers.BaseSampler:
    """kdsl's default sampler for a discrete space (see the module docstring for the reasons)."""
    return DiscreteTPESampler(params, feasible=feasible, seed=seed)


def make_study(space_params: Params, seed: int | None = None, warm_start: Iterable[Mapping] = (), *,
               sampler: optuna.samplers.BaseSampler | None = None, feasible: Feasible | None = None,
               storage=None,
               study_name: str | None = None, load_if_exists: bool = True) -> optuna.Study:
    """A minimising study over ``space_params`` with warm-start candidates enqueued first.

    ``storage``/``study_name`` are passed to Optuna (the tuner keeps studies in the tuning
    database); warm-start configurations outside the space are skipped with a log message.
    """
    if not space_params:
        raise TuningError("cannot search an empty space (no parameters)")
    study = optuna.create_study(direction="minimize", sampler=sampler or make_sampler(space_params, seed, feasible),
                                storage=storage, study_name=study_name, load_if_exists=load_if_exists)
    study.set_user_attr("kdsl_seed", seed)
    enqueue_configs(study, space_params, warm_start)
    return study


def enqueue_configs(study: optuna.Study, params: Params, configs: Iterable[Mapping]) -> int:
    """Enqueue configurations to be proposed next (skipping ones outside the space); returns how many."""
    count = 0
    for config in configs:
        try:
            ranks = encode(config, params)
        except TuningError as exc:
            log.info("warm-start configuration skipped: %s", exc)
            continue
        study.enqueue_trial(ranks, skip_if_exists=True)
        count += 1
    return count


def _history(study: optuna.Study, params: Params):
    """Configurations already settled in the study: key -> (value or None) and the best one."""
    known: dict[tuple, float | None] = {}
    best, best_value = None, float("inf")
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.RUNNING or t.state == TrialState.WAITING:
            continue
        config = config_of(t, params)
        if config is None:
            continue
        key = _key(config)
        if t.state == TrialState.COMPLETE:
            known[key] = t.value
            if t.value is not None and t.value < best_value:
                best, best_value = config, t.value
        else:
            known.setdefault(key, None)
    return known, best


def _neighbours(config: Config, space: dict[str, tuple], rng: random.Random) -> list[Config]:
    out = []
    for name, values in space.items():
        i = values.index(config[name])
        for j in (i - 1, i + 1):
            if 0 <= j < len(values):
                out.append({**config, name: values[j]})
    rng.shuffle(out)
    return out


def _fallback(study, params, known, best, feasible, rng) -> Config | None:
    """An unmeasured feasible configuration near the best, else a random unmeasured one."""
    space = _space(params)
    frontier = [best] if best is not None else []
    seen = set()
    # Breadth-first around the best: nearest unmeasured points first.
    for _ in range(3):
        nxt = []
        for c in frontier:
            for n in _neighbours(c, space, rng):
                k = _key(n)
                if k in seen:
                    continue
                seen.add(k)
                if k not in known and (feasible is None or feasible(n) is None):
                    return n
                nxt.append(n)
        frontier = nxt
    for _ in range(10_000):
        c = {name: rng.choice(values) for name, values in space.items()}
        if _key(c) not in known and (feasible is None or feasible(c) is None):
            return c
    return None


def ask_config(study: optuna.Study, params: Params, feasible: Feasible | None = None,
               max_proposals: int = 200) -> tuple[Trial, Config]:
    """The next configuration to measure: feasible and not measured before in this study.

    Infeasible proposals are reported as invalid (with the reason ``feasible`` gave) and
    duplicates answered from the study, both without a measurement. Raises TuningError when the
    space has nothing left to measure.
    """
    known, best = _history(study, params)
    duplicates = 0
    rng = random.Random(f"{study.user_attrs.get('kdsl_seed')}-{len(known)}")
    for _ in range(max_proposals):
        if duplicates >= MAX_DUPLICATES:
            config = _fallback(study, params, known, best, feasible, rng)
            if config is None:
                break
            study.enqueue_trial(encode(config, params))
            duplicates = 0
        trial = study.ask()
        config = suggest_config(trial, params)
        key = _key(config)
        if key in known:
            value = known[key]
            if value is None:
                study.tell(trial, state=TrialState.PRUNED)
            else:
                study.tell(trial, value)
            duplicates += 1
            continue
        reason = feasible(config) if feasible is not None else None
        if reason:
            report_invalid(study, trial, reason)
            known[key] = None
            duplicates += 1
            continue
        return trial, config
    raise TuningError(f"search space exhausted: no unmeasured feasible configuration after "
                      f"{max_proposals} proposals ({len(known)} already settled)")


def report_result(study: optuna.Study, trial: Trial, seconds: float) -> None:
    study.tell(trial, seconds)


def report_failure(study: optuna.Study, trial: Trial, reason: str) -> None:
    """A measured candidate that failed (compile error, wrong result, timeout, crash)."""
    trial.set_user_attr(FAILURE_ATTR, str(reason)[:2000])
    study.tell(trial, state=TrialState.PRUNED)


def report_invalid(study: optuna.Study, trial: Trial, reason: str) -> None:
    """A proposal rejected before running (constraint, static check)."""
    trial.set_user_attr(INVALID_ATTR, str(reason)[:2000])
    study.tell(trial, state=TrialState.PRUNED)
