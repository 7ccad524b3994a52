"""`kdsl tune TEMPLATE`: bad input is one clear line (exit 2, no traceback), run in-process."""

from __future__ import annotations

import pytest

from runtime.cli import main


@pytest.fixture(autouse=True)
def _db(tmp_path, monkeypatch):
    monkeypatch.setenv("KDSL_DB", f"sqlite:///{tmp_path / 't.sqlite'}")
    monkeypatch.setenv("KDSL_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def op_file(tmp_path):
    path = tmp_path / "ops.py"
    path.write_text("import dsl\n\n@dsl.op\ndef mm(x: dsl.Tensor['M', 'K'], w: dsl.Tensor['N', 'K']):\n"
                    "    return x @ w.T\n")
    return path


def error(capsys, *argv) -> str:
    assert main(["tune", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdsl: error: ") and "Traceback" not in err and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("argv, says", [
    (("quant_gem", "--shape", "M=16,N=64,K=128"), "neither FILE.py:OP"),
    (("quant_gemm", "--shape", "M=16,N=64"), "--shape lacks K: template 'quant_gemm' takes M, N, K"),
    (("quant_gemm", "--shape", "M=16,N=64,K=128,E=8"), "has E, which quant_gemm does not take"),
    (("quant_gemm", "--shape", "M=0,N=64,K=128"), "M=0: sizes must be >= 1"),
    (("quant_gemm", "--shape", "M=16,N=64,K=128", "--bits", "5"), "bits=5 is not supported"),
    (("quant_gemm", "--shape", "M=16,N=64,K=96", "--group-size", "64"), "does not divide K=96"),
    (("quant_gemm", "--shape", "M=16,N=64,K=128", "--dtype", "f64"), "not a supported activation dtype"),
    (("int8_gemm", "--shape", "M=16,N=64,K=128", "--bits", "4"), "has no option --bits (it takes --dtype)"),
    (("fp8_gemm", "--shape", "M=16,N=64,K=128", "--offline"), "--offline needs --target"),
])
def test_bad_template_input(capsys, argv, says):
    assert says in error(capsys, *argv)


def test_template_options_are_refused_for_an_op(capsys, op_file):
    err = error(capsys, f"{op_file}:mm", "--shape", "M=16,N=16,K=16", "--bits", "4", "--asym")
    assert "--bits, --asym: only for kernel templates" in err and "quant_gemm" in err
    assert "no 'nope'" in error(capsys, f"{op_file}:nope", "--shape", "M=16")
