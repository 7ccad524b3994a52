"""`kdsl demo` is the main job: every example must match PyTorch on both backends."""

import subprocess
import sys

from runtime.demo import collect_cases, run_demo


def test_demo_cases_cover_the_families():
    names = " ".join(c[0] for c in collect_cases())
    for family in ("gemm", "rmsnorm", "softmax", "w4a16"):
        assert family in names


def test_demo_dense_and_quant_match():
    results, n = run_demo(("triton", "torch"), only="g")  # gemm, rmsnorm, quantized gemms
    assert n == len(results) and results
    bad = [(r.name, r.backend, r.max_error) for r in results if not r.ok]
    assert not bad


def test_demo_cli_runs_and_reports():
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "demo", "--only", "softmax"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "softmax" in r.stdout and "match PyTorch" in r.stdout
