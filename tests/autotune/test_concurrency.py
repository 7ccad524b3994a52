"""Several processes on one database: nothing lost, no "database is locked", resume after SIGKILL.

Workers are forked (the parent has already paid for the imports) and hold no connection of the parent:
each opens its own TuningDB / Optuna storage, as separate `kdsl tune` processes would.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import time
import warnings

import optuna

from autotune.db import TuningDB, optuna_storage
from autotune.devices import get_device

from .conftest import TOY

H100 = get_device("h100")
WORKERS = 4
RECORDS_PER_WORKER = 10
TRIALS_PER_WORKER = 4
BLOCKS = [16, 32, 64, 128]

fork = multiprocessing.get_context("fork")
# Optuna imports alembic lazily when it opens a storage: import it once here, not in every forked worker.
importlib.import_module("alembic.migration")


def _run_workers(target, *args, timeout=120.0):
    procs = [fork.Process(target=target, args=(i, *args)) for i in range(WORKERS)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "workers hung"
    assert [p.exitcode for p in procs] == [0] * WORKERS


def _write_records(worker: int, url: str) -> None:
    with TuningDB(url) as db:
        for i in range(RECORDS_PER_WORKER):
            # A key of its own, and a key every worker writes (the fastest time must win).
            db.add_record(template=TOY, source_hash="c0ffee000001", op_name="op", device=H100,
                          shape={"M": 1000 * worker + i + 1, "N": 64}, time_ms=1.0 + i,
                          config={"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1}, samples=[1.0 + i] * 3)
            db.add_record(template=TOY, source_hash="c0ffee000001", op_name="op", device=H100,
                          shape={"M": 1, "N": 1}, time_ms=10.0 + worker + i / 100,
                          config={"BLOCK_M": BLOCKS[worker], "BLOCK_N": 16, "num_warps": 1})


def _objective(trial: optuna.Trial) -> float:
    block_m = trial.suggest_categorical("BLOCK_M", BLOCKS)
    warps = trial.suggest_categorical("num_warps", [1, 2, 4])
    return abs(block_m - 48) + warps + trial.number / 1000


def _optuna_worker(worker: int, url: str, study_name: str) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Heartbeats every second, but a grace period no loaded CI machine delays a live worker's beat past.
    storage = optuna_storage(url, heartbeat_interval=1, grace_period=60)
    study = optuna.create_study(storage=storage, study_name=study_name, load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=worker))
    # Each tuned config is also written to the tuning tables, as the tuner does, through the same file.
    with TuningDB(url) as db:
        def objective(trial):
            value = _objective(trial)
            db.add_record(template=TOY, source_hash="beef00000002", op_name="op", device=H100,
                          shape={"M": 1 + trial.number, "N": 8}, time_ms=value,
                          config={"BLOCK_M": trial.params["BLOCK_M"], "BLOCK_N": 16,
                                  "num_warps": trial.params["num_warps"]})
            return value

        study.optimize(objective, n_trials=TRIALS_PER_WORKER)


def _check_records(url: str) -> None:
    with TuningDB(url) as db:
        records = db.query(source_hash="c0ffee000001")
        assert len(records) == WORKERS * RECORDS_PER_WORKER + 1
        (shared,) = [r for r in records if r.shape == {"M": 1, "N": 1}]
        assert shared.time_ms == 10.0 and shared.config["BLOCK_M"] == BLOCKS[0]


def _check_study(url: str, study_name: str) -> None:
    storage = optuna_storage(url, heartbeat_interval=1)
    trials = optuna.load_study(study_name=study_name, storage=storage).trials
    assert len(trials) == WORKERS * TRIALS_PER_WORKER
    assert {t.state for t in trials} == {optuna.trial.TrialState.COMPLETE}
    assert sorted(t.number for t in trials) == list(range(WORKERS * TRIALS_PER_WORKER))
    with TuningDB(url) as db:
        assert len(db.query(source_hash="beef00000002")) == WORKERS * TRIALS_PER_WORKER
    storage.engine.dispose()


def test_concurrent_record_writers_sqlite(toy, db_url):
    _run_workers(_write_records, db_url)
    _check_records(db_url)


def test_concurrent_optuna_workers_sqlite(toy, db_url):
    # No one creates the study or the tables first: the workers race for that too.
    _run_workers(_optuna_worker, db_url, "study-sqlite")
    _check_study(db_url, "study-sqlite")


def test_concurrent_record_writers_postgresql(toy, pg_url):
    _run_workers(_write_records, pg_url)
    _check_records(pg_url)


def test_concurrent_optuna_workers_postgresql(toy, pg_url):
    _run_workers(_optuna_worker, pg_url, "study-pg")
    _check_study(pg_url, "study-pg")


# -- a worker killed mid-study


def _doomed_worker(url: str, study_name: str, marker: str, kill_at: int) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=optuna_storage(url, heartbeat_interval=1,
                                                                            grace_period=2))

    def objective(trial):
        value = _objective(trial)  # parameters are suggested (and stored) first
        if trial.number == kill_at:
            # Optuna's heartbeat thread writes its first beat asynchronously; a kill before that
            # commit would leave a RUNNING trial with no heartbeat, which is never judged stale.
            # Beat once ourselves so the trial the parent kills is certain to have one.
            study._storage.record_heartbeat(trial._trial_id)
            with open(marker, "w") as fh:
                fh.write(str(trial.number))
            time.sleep(600)  # the parent kills us here, with this trial RUNNING
        return value

    study.optimize(objective, n_trials=100)


def _fail_stale(study: optuna.Study, number: int, timeout: float) -> None:
    """Run Optuna's stale-trial sweep until trial ``number`` is failed (and re-enqueued).

    Polled, not slept: SQLite's CURRENT_TIMESTAMP has one-second resolution, so the moment a
    heartbeat counts as older than the grace period varies by up to a second from run to run.
    """
    deadline = time.monotonic() + timeout
    while study.trials[number].state == optuna.trial.TrialState.RUNNING:
        assert time.monotonic() < deadline, "the killed trial never became stale"
        time.sleep(0.2)
        with warnings.catch_warnings():  # Optuna marks this public helper experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)


def _wait_for(path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, "worker never reached the trial to be killed"
        time.sleep(0.05)


def test_sigkilled_worker_resumes_without_losing_trials(toy, db_url, tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    target, kill_at = 8, 3
    storage = optuna_storage(db_url, heartbeat_interval=1, grace_period=2)
    optuna.create_study(storage=storage, study_name="killed")
    storage.engine.dispose()

    marker = str(tmp_path / "running")
    proc = fork.Process(target=_doomed_worker, args=(db_url, "killed", marker, kill_at))
    proc.start()
    _wait_for(marker, 60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL

    storage = optuna_storage(db_url, heartbeat_interval=1, grace_period=2)
    study = optuna.load_study(study_name="killed", storage=storage)
    before = {t.number: (t.params, t.value) for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert sorted(before) == list(range(kill_at))
    assert study.trials[kill_at].state == optuna.trial.TrialState.RUNNING

    _fail_stale(study, kill_at, timeout=30)
    # Resume: run what is missing to reach the target; the failed trial's retry runs first.
    remaining = target - len(before)
    study.optimize(_objective, n_trials=remaining)

    trials = optuna.load_study(study_name="killed", storage=storage).trials
    complete = {t.number: (t.params, t.value) for t in trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(complete) == target
    assert all(complete[n] == before[n] for n in before)  # nothing completed was lost or changed
    assert trials[kill_at].state == optuna.trial.TrialState.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == kill_at]
    assert len(retried) == 1 and retried[0].state == optuna.trial.TrialState.COMPLETE
    assert retried[0].params == trials[kill_at].params
    storage.engine.dispose()

