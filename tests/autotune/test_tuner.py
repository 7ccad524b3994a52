"""The tuner on CPU (Triton interpreter): records, the lookup chain afterwards, failures, workers,
resume after SIGKILL, and offline prediction for a GPU checked statically."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

from autotune import tuner
from autotune.db import TuningDB, optuna_storage
from autotune.devices import get_device, local_device
from autotune.lookup import DefaultConfigWarning

OPS = textwrap.dedent('''
    import dsl

    @dsl.op
    def gemm_gelu(x: dsl.Tensor["M", "K"], w: dsl.Tensor["N", "K"], b: dsl.Tensor["N"]):
        return dsl.gelu(x @ w.T + b)
''')
SHAPE = {"M": 16, "N": 16, "K": 24}


@pytest.fixture
def op_file(tmp_path):
    path = tmp_path / "my_ops.py"
    path.write_text(OPS)
    return path


@pytest.fixture
def db_url(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'tune.sqlite'}"
    monkeypatch.setenv("KDSL_DB", url)
    return url


def _kdsl(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kw)


def _load(op_file):
    from runtime.cli.common import load_op

    return load_op(f"{op_file}:gemm_gelu")[0]


def test_tune_writes_records_and_a_new_process_uses_them(op_file, db_url):
    r = _kdsl("tune", f"{op_file}:gemm_gelu", "--shape", "M=16,N=16,K=24", "--trials", "3", "--repeats", "1")
    assert r.returncode == 0, r.stderr
    with TuningDB(db_url) as db:
        (record,) = db.query(template="gemm")
        assert record.source == "measured" and record.shape["M"] == 16 and record.time_ms > 0
    listing = _kdsl("db", "list")
    assert listing.returncode == 0 and "gemm_gelu" in listing.stdout
    probe = textwrap.dedent(f'''
        import sys, torch, runtime
        sys.path.insert(0, {str(op_file.parent)!r})
        from my_ops import gemm_gelu
        f = runtime.compile(gemm_gelu, backend="triton")
        print(f.explain(torch.randn(16, 24), torch.randn(16, 24), torch.randn(16))[0].source)
    ''')
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.stdout.strip() == "measured", out.stderr
    # Deleting the record falls back down the chain, with one warning.
    with TuningDB(db_url) as db:
        db.delete([record.id])
    import runtime

    f = runtime.compile(_load(op_file), backend="triton")
    args = (torch.randn(16, 24), torch.randn(16, 24), torch.randn(16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert f.explain(*args)[0].source == "default"
        f(*args)
        f(*args)
    defaults = [w for w in caught if issubclass(w.category, DefaultConfigWarning)]
    assert len(defaults) == 1 and "kdsl tune" in str(defaults[0].message)


def test_wrong_results_and_crashes_become_failed_trials(op_file, db_url):
    (task,) = tuner.build_tasks(_load(op_file), SHAPE)

    def flaky(task, config, repeats):
        if config["BLOCK_K"] == 16:
            raise tuner.CandidateFailure("wrong result: injected")
        return tuner.in_process_runner(task, config, repeats)

    db = TuningDB(db_url)
    result = tuner.tune_task(task, trials=6, device=local_device(), db=db, storage=optuna_storage(db_url),
                             repeats=1, runner=flaky, seed=3)
    assert result.measured + result.failed == 6
    assert result.best_config is not None and result.best_config["BLOCK_K"] != 16
    assert all("injected" in f for f in result.failures)
    db.close()


def test_mismatch_detects_wrong_kernels():
    good = [torch.ones(4)]
    assert tuner.mismatch([torch.ones(4)], good) is None
    assert "differs" in tuner.mismatch([torch.ones(4) * 1.01], good)
    assert "shape" in tuner.mismatch([torch.ones(5)], good)


def test_workers_share_one_study_and_lose_nothing(op_file, db_url):
    r = _kdsl("tune", f"{op_file}:gemm_gelu", "--shape", "M=16,N=16,K=24", "--trials", "8",
              "--workers", "4", "--repeats", "1", timeout=600)
    assert r.returncode == 0, r.stderr
    (task,) = tuner.build_tasks(_load(op_file), SHAPE)
    study = tuner.open_study(task, local_device(), None, optuna_storage(db_url))
    assert tuner.measured_trials(study) == 8


def test_sigkill_mid_study_resumes_without_losing_trials(op_file, db_url):
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "tune", f"{op_file}:gemm_gelu",
                             "--shape", "M=16,N=16,K=24", "--trials", "40", "--repeats", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (task,) = tuner.build_tasks(_load(op_file), SHAPE)
    storage = optuna_storage(db_url)
    deadline = time.time() + 300
    done_before = 0
    while time.time() < deadline:
        time.sleep(1.0)
        try:
            study = tuner.open_study(task, local_device(), None, storage)
            done_before = tuner.measured_trials(study)
        except Exception:
            continue
        if done_before >= 3:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert done_before >= 3
    study = tuner.open_study(task, local_device(), None, storage)
    completed = {t.number for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"}
    target = tuner.measured_trials(study) + 2
    r = _kdsl("tune", f"{op_file}:gemm_gelu", "--shape", "M=16,N=16,K=24", "--trials", str(target),
              "--repeats", "1")
    assert r.returncode == 0, r.stderr
    study = tuner.open_study(task, local_device(), None, storage)
    after = {t.number for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"}
    assert completed <= after
    assert tuner.measured_trials(study) == target


def test_offline_prediction_for_h100_compiles_for_sm90(op_file, db_url):
    shape = "M=4096,N=4096,K=4096"
    r = _kdsl("tune", f"{op_file}:gemm_gelu", "--shape", shape, "--target", "h100", "--offline")
    assert r.returncode == 0, r.stderr
    with TuningDB(db_url) as db:
        (record,) = db.query(source="predicted") if "source" in TuningDB.query.__code__.co_varnames \
            else [x for x in db.query() if x.source == "predicted"]
    assert record.device_name == "h100"
    (task,) = tuner.build_tasks(_load(op_file), {"M": 4096, "N": 4096, "K": 4096}, device="meta")
    (verdict,) = tuner.static_verdicts(task, [record.config], get_device("h100"))
    assert verdict.ok and verdict.spill_bytes == 0 and verdict.shared_bytes <= get_device("h100").smem_per_block


def test_bad_input_is_one_line(op_file, db_url):
    r = _kdsl("tune", f"{op_file}:gemm_gelu", "--shape", "M=16,N=16")
    assert r.returncode == 2 and "K" in r.stderr and "Traceback" not in r.stderr
    r = _kdsl("tune", f"{op_file}:nope", "--shape", "M=1")
    assert r.returncode == 2 and "no 'nope'" in r.stderr
    r = _kdsl("tune", f"{op_file}:gemm_gelu", "--shape", "M=16,N=16,K=24", "--offline")
    assert r.returncode == 2 and "--target" in r.stderr
