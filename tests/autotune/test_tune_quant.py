"""The quantized GEMM templates tuned like any other kernel: `kdsl tune quant_gemm|int8_gemm|fp8_gemm`
builds tasks without an op, the records key what changes the best config, and quant_matmul /
int8_matmul / fp8_matmul with ``config=None`` take their configs through the lookup chain."""

import warnings

import pytest
import torch

from autotune import tuner
from autotune.cost_model import predict
from autotune.db import TuningDB, optuna_storage
from autotune.devices import get_device, local_device
from autotune.lookup import ConfigResolver, DefaultConfigWarning
from codegen.kernels import quant_gemm as qg
from runtime.ops import quant as ops
from runtime.cli import main
from dsl.quantize import quantize_fp8, quantize_int8_per_channel, quantize_int8_per_token, quantize_rtn

needs_kernels = pytest.mark.skipif(not torch.cuda.is_available() and not qg.interpreter_active(),
                                   reason="triton was imported before TRITON_INTERPRET=1 was set")


@pytest.fixture
def fresh_configs(db_url):
    """Configs chosen in earlier tests came from another database: start and end with none."""
    ops.invalidate_configs()
    yield db_url
    ops.invalidate_configs()


def _records(db_url, **kw):
    with TuningDB(db_url) as db:
        return db.query(**kw)


def test_problem_keys_hold_what_changes_the_best_config():
    def key(m=16, bits=4, gs=128, sym=True, act="f16"):
        return qg.quant_kernel(bits, gs, sym, False, act).problem(m, 4096, 4096)

    assert key() == {"M": 16, "N": 4096, "K": 4096, "bits": 4, "group_size": 128, "act_bits": 16,
                     "act_exp_bits": 5}
    assert key(m=20)["M"] == 24 and key(m=24)["M"] == 24           # token buckets, <= 1.5x apart
    assert key(gs=-1)["group_size"] == 4096                        # per channel: one group spanning K
    assert key(sym=False)["zero_bits"] == 8 and "zero_bits" not in key()
    assert len({str(key(act=a)) for a in ("f16", "bf16", "f32")}) == 3
    assert key(bits=3) != key()
    # The bias is epilogue-only: both variants of a format share its records; exact and TF32 fp32 do not.
    assert qg.quant_kernel(4, 128, True, True, "f16").key_hash == qg.quant_kernel(4, 128, True, False, "f16").key_hash
    assert qg.quant_kernel(4, 128, True, False, "f32").key_hash != qg.quant_kernel(4, 128, True, False, "tf32").key_hash
    int8 = qg.scaled_kernel("int8_gemm", False, True, True, "f16")
    assert int8.key_hash == qg.scaled_kernel("int8_gemm", True, True, False, "f32").key_hash
    assert int8.problem(5, 64, 128) == {"M": 6, "N": 64, "K": 128, "out_bits": 16}


@needs_kernels
def test_tune_quant_gemm_then_quant_matmul_uses_the_record(fresh_configs, capsys, monkeypatch):
    code = main(["tune", "quant_gemm", "--shape", "M=16,N=64,K=128", "--group-size", "32", "--trials", "3",
                 "--repeats", "1"])
    assert code == 0, capsys.readouterr().err
    (record,) = _records(fresh_configs, template="quant_gemm")
    assert record.source == "measured" and record.op_name == "quant_gemm"
    assert record.shape == {"M": 16, "N": 64, "K": 128, "bits": 4, "group_size": 32, "act_bits": 16,
                            "act_exp_bits": 5}

    q = quantize_rtn(torch.randn(64, 128), 4, 32)
    x = torch.randn(16, 128).half()
    calls = []
    original = ConfigResolver.resolve
    monkeypatch.setattr(ConfigResolver, "resolve", lambda self, *a, **kw: calls.append(a) or original(self, *a, **kw))
    choice = ops.explain_quant_matmul(x, q)
    assert (choice.source, choice.config) == ("measured", record.config)
    out = ops.quant_matmul(x, q)
    torch.testing.assert_close(out, ops.quant_matmul_reference(x, q), rtol=2e-2, atol=2e-2)
    assert len(calls) == 1  # later calls at this shape are answered from memory
    # The bias variant shares the format's record; 12 tokens borrow the 16-token record (within 2x).
    assert ops.explain_quant_matmul(x, q, torch.randn(64).half()).source == "measured"
    assert ops.explain_quant_matmul(x[:12], q).source == "nearest"
    # Another format was never tuned: the shape-aware default, one warning naming the command to run.
    q_asym = quantize_rtn(torch.randn(64, 128), 4, 32, sym=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        choice = ops.explain_quant_matmul(x, q_asym)
        ops.quant_matmul(x, q_asym)
    assert choice.source == "default"
    assert choice.config == qg.default_config("quant_gemm", choice.problem, local_device())
    (warning,) = [w for w in caught if issubclass(w.category, DefaultConfigWarning)]
    assert "kdsl tune quant_gemm --shape M=16,N=64,K=128 --bits 4 --group-size 32 --asym --dtype f16" \
        in str(warning.message)


@needs_kernels
@pytest.mark.parametrize("template", ["int8_gemm", "fp8_gemm"])
def test_scaled_templates_tune_and_their_matmuls_use_the_record(fresh_configs, template):
    (task,) = tuner.build_template_tasks(template, {"M": 8, "N": 32, "K": 64})
    with TuningDB(fresh_configs) as db:
        result = tuner.tune_task(task, trials=2, device=local_device(), db=db,
                                 storage=optuna_storage(fresh_configs), repeats=1)
    assert result.best_config is not None and not result.failures
    x, w = torch.randn(8, 64), torch.randn(32, 64)
    if template == "int8_gemm":
        (a, sa), (b, sb) = quantize_int8_per_token(x), quantize_int8_per_channel(w)
        explain = ops.explain_int8_matmul
    else:  # per-tensor weight scales: the same format, the same record
        (a, sa), (b, sb) = quantize_fp8(x, "row"), quantize_fp8(w, "tensor")
        explain = ops.explain_fp8_matmul
    choice = explain(a, sa, b, sb)
    assert (choice.source, choice.config) == ("measured", result.best_config)
    with pytest.warns(DefaultConfigWarning, match=f"kdsl tune {template} --shape M=8,N=32,K=64 --dtype f16"):
        assert explain(a, sa, b, sb, out_dtype=torch.float16).source == "default"  # output width is keyed


def test_offline_h100_prediction_compiles_for_sm90_without_spills(db_url, capsys):
    h100 = get_device("h100")
    code = main(["tune", "quant_gemm", "--shape", "M=16,N=1024,K=1024", "--bits", "4", "--group-size", "128",
                 "--target", "h100", "--offline"])
    assert code == 0, capsys.readouterr().err
    (record,) = _records(db_url, template="quant_gemm")
    assert record.source == "predicted" and record.device_name == "h100"
    (task,) = tuner.build_template_tasks("quant_gemm", {"M": 16, "N": 1024, "K": 1024})
    found = ConfigResolver(db_url, device=h100).resolve("quant_gemm", task.source_hash, task.problem)
    assert (found.source, found.config) == ("predicted", record.config)
    # The static check of the very launch the runtime makes (answered from the compile cache).
    spec = tuner.launch_spec(task, record.config)
    assert spec.constexprs["EVEN_K"] is True
    (verdict,) = tuner.static_verdicts(task, [record.config], h100)
    assert verdict.ok and verdict.spill_bytes == 0 and verdict.shared_bytes <= h100.smem_per_block


def test_cost_model_charges_dequantization_and_credits_narrow_weights():
    h100 = get_device("h100")
    base = {"SPLIT_K": 1, "GROUP_M": 8, "num_stages": 4}

    def times(m, **tile):
        problem = {**qg.quant_kernel(4, 128, True, False, "f16").problem(m, 8192, 8192), "dtype": "f16"}
        cfg = {**base, **tile}
        return predict("quant_gemm", problem, cfg, h100), predict("gemm", problem, cfg, h100)

    quant, dense = times(16, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4)
    assert quant < 0.7 * dense  # decode is memory-bound: 4-bit weights are read far faster than fp16 ones
    quant, dense = times(8192, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8)
    assert quant > dense  # compute-bound: the dequantizing prologue costs ALU time
