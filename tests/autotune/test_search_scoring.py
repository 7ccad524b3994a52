"""Search-strategy scoring math on small synthetic spaces, and the benchmark on a tiny space."""

from __future__ import annotations

import gzip
import itertools
import json
import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autotune import search_scoring as sc
from dsl.errors import TuningError


def synthetic_space(n_x=8, n_y=8, fail_every=7, name="synthetic/bowl") -> sc.TuningSpace:
    """A smooth bowl over two ordinal parameters, with some failed configurations."""
    params = {"x": tuple(range(n_x)), "y": tuple(range(n_y)), "fixed": (1,)}
    times = {}
    for i, (x, y) in enumerate(itertools.product(params["x"], params["y"])):
        times[(x, y, 1)] = None if i % fail_every == 3 else 1.0 + (x - 5) ** 2 + 0.5 * (y - 2) ** 2
    return sc.TuningSpace(name=name, params=params, keys=("x", "y", "fixed"), times=times)


def test_random_baseline_sorted_index_formula():
    times = [5.0, 1.0, 4.0, 2.0, 3.0]  # N = 5
    # worst-to-best: 5 4 3 2 1; budget 1 -> index round(1*6/2) = 3 -> 3.0 (the median)
    assert sc.random_baseline(times, 1) == 3.0
    # budget 2 -> round(2*6/3) = 4 -> 2.0; budget 5 -> round(5*6/6) = 5 -> 1.0 (the optimum)
    assert sc.random_baseline(times, 2) == 2.0
    assert sc.random_baseline(times, 5) == 1.0
    assert sc.random_baseline(times, 1000) == 1.0
    with pytest.raises(TuningError):
        sc.random_baseline([], 3)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.01, 100.0), min_size=2, max_size=200), st.integers(1, 500))
def test_random_baseline_is_the_expected_rank_of_the_best_draw(times, budget):
    # Equivalent ascending form: the best of M draws sits at 1-based rank (N+1)/(M+1).
    n = len(times)
    ascending = sorted(times)
    index = n + 1 - round(budget * (n + 1) / (budget + 1))
    assert sc.random_baseline(times, budget) == ascending[min(max(index, 1), n) - 1]
    # Monotone: more evaluations never make random search worse.
    assert sc.random_baseline(times, budget + 1) <= sc.random_baseline(times, budget)


def test_random_baseline_matches_monte_carlo_random_search():
    rng = random.Random(0)
    times = [rng.uniform(1, 10) for _ in range(400)]
    for budget in (5, 20, 60):
        draws = [min(rng.sample(times, budget)) for _ in range(3000)]
        # The value at the expected rank is close to the mean best of random draws.
        assert sc.random_baseline(times, budget) == pytest.approx(np.mean(draws), rel=0.06)


def test_target_value():
    space = synthetic_space()
    assert sc.target_value(space) == pytest.approx(space.optimum + 0.05 * (space.median - space.optimum))
    assert sc.target_value(space, p=1.0) == space.optimum


def test_best_so_far_and_evaluations_to_target():
    values = [5.0, None, 3.0, 4.0, 1.0]
    assert sc.best_so_far(values, [1, 2, 3, 5, 9], worst=10.0).tolist() == [5.0, 5.0, 3.0, 1.0, 1.0]
    assert sc.best_so_far([None, None], [1, 2], worst=10.0).tolist() == [10.0, 10.0]
    assert sc.evaluations_to_target(values, 3.0) == 3
    assert sc.evaluations_to_target(values, 0.5) is None


def test_an_oracle_scores_one():
    space = synthetic_space()
    budgets = [2, 4, 8, 16]
    best_first = [[space.optimum] * 16 for _ in range(25)]
    result = sc.score_runs(space, "oracle", best_first, budgets)
    assert result.score == pytest.approx(1.0)
    assert result.reached_target == 1.0 and result.mean_evals_to_target == 1.0


def test_random_search_scores_about_zero():
    # Distinct times and no failures: the setting the sorted-index formula describes exactly.
    rng = random.Random(42)
    params = {"x": tuple(range(30)), "y": tuple(range(30))}
    times = {key: rng.uniform(1.0, 10.0) for key in itertools.product(params["x"], params["y"])}
    space = sc.TuningSpace(name="synthetic/uniform", params=params, keys=("x", "y"), times=times)
    keys = list(space.times)
    budgets = [5, 10, 20, 40]
    scores = []
    for chunk in range(8):
        runs = []
        for r in range(25):
            rng = random.Random(chunk * 100 + r)
            runs.append([space.times[k] for k in rng.sample(keys, 40)])
        scores.append(sc.score_runs(space, "random", runs, budgets).score)
    assert abs(np.mean(scores)) < 0.15


def test_worse_than_random_is_negative_and_overall_is_a_mean():
    space = synthetic_space()
    worst_first = [[float(space.valid_times[-1])] * 16 for _ in range(25)]
    bad = sc.score_runs(space, "worst", worst_first, [2, 4, 8])
    assert bad.score < 0
    good = sc.score_runs(space, "oracle", [[space.optimum] * 16] * 25, [2, 4, 8])
    assert sc.overall_score([bad, good]) == pytest.approx((bad.score + good.score) / 2)
    assert math.isnan(sc.overall_score([]))


def write_cache(path, space: sc.TuningSpace):
    cache = {}
    for key, t in space.times.items():
        entry = dict(zip(space.keys, key))
        entry["time"] = t if t is not None else "RuntimeFailedConfig"
        cache[",".join(map(str, key))] = entry
    data = {"device_name": "Synthetic", "kernel_name": "bowl", "problem_size": [64, 64],
            "tune_params_keys": list(space.keys), "tune_params": {k: list(v) for k, v in space.params.items()},
            "objective": "time", "cache": cache}
    with gzip.open(path, "wt") as fh:
        json.dump(data, fh)


def test_load_kernel_tuner_cache_roundtrip(tmp_path):
    space = synthetic_space()
    (tmp_path / "bowl").mkdir()
    write_cache(tmp_path / "bowl" / "GPU1.json.gz", space)
    loaded = sc.load_spaces(tmp_path)
    assert len(loaded) == 1 and loaded[0].name == "bowl/GPU1"
    assert loaded[0].times == space.times
    assert loaded[0].tunable == {"x": space.params["x"], "y": space.params["y"]}
    assert loaded[0].evaluate({"x": 5, "y": 2}) == 1.0
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(TuningError, match="tune_params"):
        sc.load_kernel_tuner_cache(tmp_path / "bad.json")


def test_kdsl_strategy_beats_random_on_a_synthetic_space():
    from benchmarks import bench_search

    space = synthetic_space(n_x=12, n_y=12)
    budgets = [10, 20, 30]
    kdsl_runs = [bench_search.run_optuna(space, "kdsl", 30, seed) for seed in range(5)]
    assert all(len(r) == 30 for r in kdsl_runs)
    assert all(len({v for v in r}) >= 1 for r in kdsl_runs)
    kdsl = sc.score_runs(space, "kdsl", kdsl_runs, budgets).score
    assert kdsl > 0.3


def test_bench_skips_cleanly_without_spaces(tmp_path, capsys):
    from benchmarks import bench_search

    assert bench_search.main(["--spaces", str(tmp_path / "missing")]) == 0
    assert "skipped" in capsys.readouterr().out


def test_bench_end_to_end_on_a_tiny_space(tmp_path, capsys):
    pytest.importorskip("kernel_tuner")
    from benchmarks import bench_search

    spaces = tmp_path / "spaces" / "bowl"
    spaces.mkdir(parents=True)
    write_cache(spaces / "GPU1.json.gz", synthetic_space())
    out = tmp_path / "search.json"
    code = bench_search.main(["--spaces", str(tmp_path / "spaces"), "--out", str(out), "--repeats", "3",
                              "--budgets", "5:15:5", "--strategies", "kdsl,random",
                              "--kt-strategies", "random_sample,no_such_strategy", "--jobs", "1"])
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report["overall"]) == {"kdsl", "random", "kt-random_sample"}
    assert "kt-no_such_strategy" in report["skipped"]
    rows = [r for r in report["per_space"] if r["strategy"] == "kt-random_sample"]
    assert rows and rows[0]["repeats"] == 3 and len(rows[0]["standardised"]) == 3
    assert out.with_suffix(".png").exists()
    assert "Overall score" in capsys.readouterr().out
