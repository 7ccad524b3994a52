"""kdsl's default search strategy: encoding, warm start, no repeats, failures and invalid configs."""

from __future__ import annotations

import itertools

import optuna
import pytest
from optuna.trial import TrialState

from autotune import strategy as ks
from dsl.errors import TuningError

optuna.logging.set_verbosity(optuna.logging.ERROR)

PARAMS = {"BLOCK_M": [64, 16, 32, 128], "BLOCK_N": [32, 64], "num_warps": [4], "num_stages": [1, 2, 3]}


def cost(config):
    return abs(config["BLOCK_M"] - 64) + abs(config["BLOCK_N"] - 32) + (3 - config["num_stages"]) * 5 + 1.0


def test_rank_encoding_roundtrip():
    assert ks.ordered_values([64, 16, 32, 16]) == (16, 32, 64)
    config = {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    ranks = ks.encode(config, PARAMS)
    assert ranks == {"BLOCK_M": 3, "BLOCK_N": 0, "num_stages": 1}  # single-valued params are not searched
    assert set(ks.distributions(PARAMS)) == {"BLOCK_M", "BLOCK_N", "num_stages"}
    with pytest.raises(TuningError, match="BLOCK_M=48"):
        ks.encode({**config, "BLOCK_M": 48}, PARAMS)


def test_warm_start_first_then_search_without_repeats():
    warm = [{"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3},
            {"BLOCK_M": 48, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3}]   # outside the space: skipped
    study = ks.make_study(PARAMS, seed=1, warm_start=warm)
    seen = []
    for _ in range(24):  # the whole space: 4 * 2 * 3
        trial, config = ks.ask_config(study, PARAMS)
        seen.append(tuple(sorted(config.items())))
        ks.report_result(study, trial, cost(config))
    assert dict(seen[0]) == warm[0]
    assert len(set(seen)) == 24
    assert study.best_value == 1.0
    assert study.best_trial.user_attrs["config"] == warm[0]
    with pytest.raises(TuningError, match="exhausted"):
        ks.ask_config(study, PARAMS)


def test_infeasible_configs_are_never_proposed_by_the_default_sampler():
    def feasible(c):
        return "too big" if c["BLOCK_M"] * c["BLOCK_N"] > 64 * 64 else None

    study = ks.make_study(PARAMS, seed=3, feasible=feasible)
    for _ in range(12):
        trial, config = ks.ask_config(study, PARAMS, feasible)
        assert feasible(config) is None
        ks.report_result(study, trial, cost(config))
    assert not [t for t in study.trials if "invalid" in t.user_attrs]


def test_other_samplers_get_invalid_proposals_pruned_with_reason():
    def feasible(c):
        return "no stages" if c["num_stages"] == 1 else None

    study = ks.make_study(PARAMS, seed=0, sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        trial, config = ks.ask_config(study, PARAMS, feasible)
        assert config["num_stages"] != 1
        ks.report_result(study, trial, cost(config))
    invalid = [t for t in study.trials if "invalid" in t.user_attrs]
    assert invalid and all(t.state == TrialState.PRUNED and t.user_attrs["invalid"] == "no stages"
                           for t in invalid)


def test_failures_are_pruned_and_not_measured_again():
    study = ks.make_study(PARAMS, seed=5)
    trial, config = ks.ask_config(study, PARAMS)
    ks.report_failure(study, trial, "CompilationError: out of resources")
    failed = study.trials[0]
    assert failed.state == TrialState.PRUNED and "out of resources" in failed.user_attrs["failure"]
    for _ in range(23):
        trial, other = ks.ask_config(study, PARAMS)
        assert other != config
        ks.report_result(study, trial, cost(other))


def test_parallel_workers_do_not_get_the_same_running_point():
    study = ks.make_study(PARAMS, seed=7)
    # Simulate workers: ask several before telling any.
    asked = [ks.ask_config(study, PARAMS) for _ in range(8)]
    keys = [tuple(sorted(c.items())) for _, c in asked]
    assert len(set(keys)) == 8
    for trial, config in asked:
        ks.report_result(study, trial, cost(config))


def test_search_finds_the_optimum_of_a_smooth_space_quickly():
    params = {"x": list(range(16)), "y": list(range(16)), "z": [0, 1]}

    def f(c):
        return (c["x"] - 11) ** 2 + (c["y"] - 4) ** 2 + 3 * c["z"] + 1.0

    found = []
    for seed in range(3):
        study = ks.make_study(params, seed=seed)
        for _ in range(60):  # 60 of 512 points
            trial, config = ks.ask_config(study, params)
            ks.report_result(study, trial, f(config))
        found.append(study.best_value)
    assert sum(v <= 2.0 for v in found) >= 2


def test_same_seed_same_sequence():
    def run(seed):
        study = ks.make_study(PARAMS, seed=seed)
        out = []
        for _ in range(10):
            trial, config = ks.ask_config(study, PARAMS)
            ks.report_result(study, trial, cost(config))
            out.append(tuple(config.values()))
        return out

    assert run(11) == run(11)


def test_empty_space_is_an_error():
    with pytest.raises(TuningError):
        ks.make_study({}, seed=0)


def test_config_of_reads_params_when_user_attrs_are_missing():
    study = optuna.create_study()
    study.enqueue_trial({"BLOCK_M": 2, "BLOCK_N": 1, "num_stages": 0})
    trial = study.ask(ks.distributions(PARAMS))
    study.tell(trial, 1.0)
    config = ks.config_of(study.trials[0], PARAMS)
    assert config == {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
    assert list(itertools.islice(ks.ordered_values(PARAMS["num_stages"]), 3)) == [1, 2, 3]
