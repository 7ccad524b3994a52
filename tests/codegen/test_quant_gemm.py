"""Quantized GEMM kernels under Triton's interpreter (CPU) against the dequantize-then-matmul oracle."""

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import codegen  # noqa: F401  (switches Triton to its interpreter when there is no GPU)
from autotune.devices import get_device
from codegen.template import get_space
from codegen.kernels import quant_gemm as qg
from runtime.ops import quant as ops
from dsl.errors import CodegenError, DSLError, TuningError
from dsl.quantize import (
    quantize_fp8,
    quantize_int8_per_channel,
    quantize_int8_per_token,
    quantize_rtn,
    sqnr_db,
)

REPO = Path(__file__).resolve().parents[2]
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
needs_kernels = pytest.mark.skipif(
    not ON_GPU and not qg.interpreter_active(), reason="triton was imported before TRITON_INTERPRET=1 was set"
)


@pytest.fixture(autouse=True, scope="module")
def _kernel_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDSL_CACHE_DIR", str(tmp_path_factory.mktemp("kdsl_cache")))
        yield


def _cfg(**kw):
    cfg = {
        "BLOCK_M": 16,
        "BLOCK_N": 32,
        "BLOCK_K": 32,
        "SPLIT_K": 1,
        "GROUP_M": 1,
        "num_warps": 2,
        "num_stages": 1,
    }
    cfg.update(kw)
    return cfg


def _rel_err(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


# K per format: grouped formats need group | K (not a multiple of 128 where possible); per-channel
# takes a K that is a multiple of no block size and of no word width.
_K = {32: 160, 64: 192, 128: 256, -1: 203}


@needs_kernels
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_quant_gemm_equals_dequantize_then_matmul_fp32(bits, group_size, sym):
    k, n, m = _K[group_size], 40, 17
    torch.manual_seed(bits * 100 + group_size)
    q = quantize_rtn(torch.randn(n, k), bits, group_size, sym).to(DEVICE)
    x = torch.randn(m, k, device=DEVICE)
    # Vary the remaining features over the grid instead of multiplying it: split-K and bias.
    bias = torch.randn(n, device=DEVICE) if sym else None
    # One 32 x 64 output tile (M = 17 and N = 40 are masked); other tests cover many tiles.
    cfg = _cfg(
        BLOCK_M=32,
        BLOCK_N=64,
        BLOCK_K=32 if group_size != -1 else 64,
        SPLIT_K=2 if (bits + (group_size > 0)) % 2 else 1,
    )
    out = ops.quant_matmul(x, q, bias, config=cfg)
    ref = x @ q.dequantize().t() + (0 if bias is None else bias)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert _rel_err(out, ref) <= 1e-4


@needs_kernels
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [128, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_quant_gemm_fp16_activations(bits, group_size, sym):
    k = _K[group_size]
    torch.manual_seed(7)
    q = quantize_rtn(torch.randn(48, k), bits, group_size, sym).to(DEVICE)
    x = torch.randn(5, k, device=DEVICE).half()
    bias = torch.randn(48, device=DEVICE).half()
    out = ops.quant_matmul(x, q, bias, config=_cfg(BLOCK_N=16, BLOCK_K=64))
    assert out.dtype == torch.float16
    # fp16 output rounding (and, per channel, scaling after the dot instead of before) ~ 2**-11.
    assert _rel_err(out, ops.quant_matmul_reference(x, q, bias)) <= 2e-3
    assert _rel_err(out, x.float() @ q.dequantize().t() + bias.float()) <= 2e-3


@needs_kernels
def test_quant_gemm_many_tiles_grouped_order_and_batch_dims():
    torch.manual_seed(3)
    q = quantize_rtn(torch.randn(48, 128), 4, 64, False).to(DEVICE)
    x = torch.randn(2, 20, 128, device=DEVICE)  # M = 40: three row tiles, three column tiles
    out = ops.quant_matmul(x, q, config=_cfg(BLOCK_N=16, GROUP_M=4, SPLIT_K=2, num_warps=2))
    ref = x @ q.dequantize().t()
    assert out.shape == (2, 20, 48)
    assert _rel_err(out, ref) <= 1e-4
    strided = x.transpose(0, 1).reshape(20, 2, 128)[:, 0]  # a non-contiguous view (row stride 256)
    assert _rel_err(ops.quant_matmul(strided, q, config=_cfg()), strided @ q.dequantize().t()) <= 1e-4


@needs_kernels
def test_quant_gemm_invalid_uses_raise_clear_errors():
    q = quantize_rtn(torch.randn(32, 128), 4, 32).to(DEVICE)
    x = torch.randn(3, 128, device=DEVICE)
    with pytest.raises(TuningError, match="block_k_within_group"):
        ops.quant_matmul(x, q, config=_cfg(BLOCK_K=64))
    with pytest.raises(TuningError, match="split_k_has_work"):
        ops.quant_matmul(x, q, config=_cfg(SPLIT_K=8))
    with pytest.raises(TuningError, match="BLOCK_M=24"):
        ops.quant_matmul(x, q, config=_cfg(BLOCK_M=24))
    with pytest.raises(DSLError, match="K=128"):
        ops.quant_matmul(torch.randn(3, 96, device=DEVICE), q)
    with pytest.raises(DSLError, match="QTensor"):
        ops.quant_matmul(x, q.dequantize())
    with pytest.raises(DSLError, match="bias must be"):
        ops.quant_matmul(x, q, torch.randn(5, device=DEVICE))
    if not ON_GPU:
        with pytest.raises(DSLError, match="bfloat16"):
            ops.quant_matmul(x.bfloat16(), q)


@needs_kernels
@pytest.mark.parametrize(
    "row_vec, col_vec, split_k, out_dtype, with_bias",
    [
        (True, True, 1, torch.float32, True),
        (True, True, 2, torch.float16, False),
        (False, False, 1, torch.float16, True),
    ],
)
def test_int8_gemm(row_vec, col_vec, split_k, out_dtype, with_bias):
    m, n, k = 17, 40, 200
    torch.manual_seed(11)
    x, w = torch.randn(m, k, device=DEVICE), torch.randn(n, k, device=DEVICE)
    bias = torch.randn(n, device=DEVICE) if with_bias else None
    if row_vec:
        xq, xs = quantize_int8_per_token(x)
        wq, ws = quantize_int8_per_channel(w)
    else:  # per-tensor scales
        xs, ws = x.abs().max() / 127, w.abs().max() / 127
        xq = torch.round(x / xs).clamp(-127, 127).to(torch.int8)
        wq = torch.round(w / ws).clamp(-127, 127).to(torch.int8)
    out = ops.int8_matmul(xq, xs, wq, ws, bias, out_dtype=out_dtype, config=_cfg(BLOCK_K=64, SPLIT_K=split_k))
    assert out.dtype == out_dtype and out.shape == (m, n)
    # Peers' check: fp32 matmul of the quantized operands with the scales applied, rtol = atol = 0.1.
    scaled = (xq.float() * xs.reshape(-1, 1)) @ (wq.float() * ws.reshape(-1, 1)).t()
    scaled = scaled + (0 if bias is None else bias)
    torch.testing.assert_close(out.float(), scaled, rtol=0.1, atol=0.1)
    # int32 accumulation is exact: the kernel matches the exact reference to output rounding.
    exact = ops.int8_matmul_reference(xq, xs, wq, ws, bias, out_dtype=torch.float32)
    assert _rel_err(out, exact) <= (1e-6 if out_dtype == torch.float32 else 1e-3)
    assert sqnr_db(x @ w.t() + (0 if bias is None else bias), out.float()) > 30.0


@needs_kernels
def test_int8_linear_quantizes_activations_per_token():
    torch.manual_seed(12)
    x, w = torch.randn(3, 5, 64, device=DEVICE), torch.randn(24, 64, device=DEVICE)
    wq, ws = quantize_int8_per_channel(w)
    out = ops.int8_linear(x, wq, ws, backend="triton", config=_cfg(BLOCK_K=32, BLOCK_N=16))
    assert out.shape == (3, 5, 24)
    assert sqnr_db(x @ w.t(), out) > 30.0


@needs_kernels
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_fp8_gemm(granularity):
    m, n, k = 9, 40, 96
    torch.manual_seed(13)
    x, w = torch.randn(m, k, device=DEVICE), torch.randn(n, k, device=DEVICE)
    a, sa = quantize_fp8(x, granularity)
    b, sb = quantize_fp8(w, granularity)
    bias = torch.randn(n, device=DEVICE)
    out = ops.fp8_matmul(a, sa, b, sb, bias, out_dtype=torch.float32, config=_cfg(BLOCK_K=64))
    ref = ops.fp8_matmul_reference(a, sa, b, sb, bias)
    scaled = (a.float() * sa.reshape(-1, 1)) @ (b.float() * sb.reshape(-1, 1)).t() + bias
    torch.testing.assert_close(out, scaled, rtol=0.1, atol=0.1)
    torch.testing.assert_close(ref, scaled, rtol=0.1, atol=0.1)
    assert _rel_err(out, ref) <= 1e-5
    assert sqnr_db(x @ w.t() + bias, out) > 20.0


@needs_kernels
def test_scaled_gemm_errors():
    a = torch.zeros(4, 64, dtype=torch.int8, device=DEVICE)
    s = torch.ones(4, device=DEVICE)
    with pytest.raises(DSLError, match="b must be a 2-D torch.int8"):
        ops.int8_matmul(a, s, a.float(), s)
    with pytest.raises(DSLError, match="K must agree"):
        ops.int8_matmul(a, s, torch.zeros(4, 32, dtype=torch.int8, device=DEVICE), s)
    with pytest.raises(DSLError, match="b_scale must hold 1 or 8 values"):
        ops.int8_matmul(a, s, torch.zeros(8, 64, dtype=torch.int8, device=DEVICE), s)
    with pytest.raises(TuningError, match="mma_k_for_8bit|not in"):
        ops.int8_matmul(a, s, a, s, config=_cfg(BLOCK_K=16))


def test_spaces_are_registered_with_constraints_as_code():
    h100, a100, cpu = get_device("h100"), get_device("a100"), get_device("cpu")
    space = get_space("quant_gemm")
    assert space is qg.QUANT_GEMM_SPACE
    assert set(space.params) == {
        "BLOCK_M",
        "BLOCK_N",
        "BLOCK_K",
        "SPLIT_K",
        "GROUP_M",
        "num_warps",
        "num_stages",
    }
    shape = {"M": 1, "N": 4096, "K": 4096, "group_size": 128, "bits": 4}
    good = _cfg(BLOCK_N=64, BLOCK_K=128, SPLIT_K=8, num_stages=4)
    assert space.feasible(good, shape, h100)
    assert "block_k_within_group" in space.violations(good, {**shape, "group_size": 64}, h100)
    assert "split_k_only_for_small_batch" in space.violations(good, {**shape, "M": 256}, h100)
    big = _cfg(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, num_stages=5, num_warps=8)
    assert "fits_shared_memory" in space.violations(big, {**shape, "M": 128}, get_device("rtx4090"))
    fp8 = get_space("fp8_gemm")
    cfg = _cfg(BLOCK_K=64)
    assert "device_has_fp8" in fp8.violations(cfg, {"M": 16, "N": 64, "K": 64}, a100)
    assert fp8.feasible(cfg, {"M": 16, "N": 64, "K": 64}, h100)
    assert get_space("int8_gemm").feasible(cfg, {"M": 16, "N": 64, "K": 64}, cpu)
    with pytest.raises(TuningError, match="BLOCK_K=16 not in"):
        get_space("int8_gemm").validate(_cfg(BLOCK_K=16))


@settings(max_examples=60, deadline=None)
@given(
    template=st.sampled_from(["quant_gemm", "int8_gemm", "fp8_gemm"]),
    device=st.sampled_from(["h100", "a100", "rtx4090", "cpu"]),
    m=st.integers(1, 4096),
    n=st.integers(1, 16384),
    k_groups=st.integers(1, 64),
    group_size=st.sampled_from([32, 64, 128, 256, -1]),
)
def test_default_config_is_always_feasible(template, device, m, n, k_groups, group_size):
    dev = get_device(device)
    if template == "fp8_gemm" and dev.name == "a100":
        return
    k = k_groups * (group_size if group_size > 0 else 96)
    shape = {"M": m, "N": n, "K": k, "group_size": group_size, "bits": 4}
    cfg = qg.default_config(template, shape, dev)
    assert qg.SPACES[template].feasible(cfg, shape, dev)
    tiles = -(-m // cfg["BLOCK_M"]) * -(-n // cfg["BLOCK_N"])
    if dev.vendor == "cpu":
        assert cfg["SPLIT_K"] == 1
    elif m <= 64 and tiles * 2 <= dev.sm_count and -(-k // cfg["BLOCK_K"]) >= 2:
        assert cfg["SPLIT_K"] >= 2  # a small grid gets split along K


def test_rendered_sources_are_readable_and_format_specific():
    src = qg.quant_gemm_source(3, 64, False, True, True)
    assert "@triton.jit" in src and "def launch(" in src
    assert "VALUES_PER_WORD: tl.constexpr = 10" in src and "// 64" in src and "input_precision" in src
    pc = qg.quant_gemm_source(4, -1, True, False, False)
    assert "acc = acc * scale[None, :]" in pc and "8.0" in pc
    assert "out_dtype=tl.int32" in qg.scaled_gemm_source("int8", True, True, False)
    assert "out_dtype=tl.int32" not in qg.scaled_gemm_source("fp8e4m3", False, True, True)
    with pytest.raises(CodegenError):
        qg.scaled_gemm_source("int4", True, True, False)


@pytest.mark.gpu
def test_quant_gemm_int64_offsets_past_2_31_elements():
    # 70000 tokens x 32768 features = 2.3e9 elements: int32 offsets would wrap.
    q = quantize_rtn(torch.randn(64, 32768, device="cuda"), 4, 128)
    x = torch.randn(70000, 32768, device="cuda", dtype=torch.float16)
    out = ops.quant_matmul(x, q)
    tail = x[-16:].float() @ q.dequantize().t()
    assert _rel_err(out[-16:], tail) < 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quant_gemm_on_gpu_half_types(dtype):
    q = quantize_rtn(torch.randn(4096, 4096, device="cuda"), 4, 128)
    x = torch.randn(16, 4096, device="cuda", dtype=dtype)
    out = ops.quant_matmul(x, q)
    assert _rel_err(out, ops.quant_matmul_reference(x, q)) < 1e-2


