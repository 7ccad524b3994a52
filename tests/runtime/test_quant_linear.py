import math

import pytest
import torch
from torch import nn

from dsl.errors import DSLError
from dsl.qtensor import QTensor
from runtime.nn.quant_linear import QuantLinear, quantize_model
from dsl.quantize import sqnr_db


def _linear(k=256, n=96, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    return lin


def _correlated(rows, k, seed):
    g = torch.Generator().manual_seed(99)
    mix = torch.randn(k, k, generator=g) / math.sqrt(k) + torch.eye(k)
    scale = torch.ones(k)
    scale[:4] = 6.0
    return (torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)) @ mix) * scale


@pytest.mark.parametrize(
    "bits, group_size, sym", [(4, 128, True), (3, 64, False), (8, -1, True), (2, 32, False)]
)
def test_cpu_forward_is_dequantize_then_matmul(bits, group_size, sym):
    lin = _linear()
    q = QuantLinear.from_linear(lin, bits=bits, group_size=group_size, sym=sym)
    x = torch.randn(3, 7, 256)
    w = q.weight_q.dequantize()
    assert torch.allclose(q(x), x @ w.t() + lin.bias.detach(), atol=1e-5, rtol=1e-5)
    assert q(x).shape == (3, 7, 96)
    expect_db = {2: 3.0, 3: 8.0, 4: 15.0, 8: 35.0}[bits]
    assert sqnr_db(lin(x).detach(), q(x)) > expect_db


def test_gptq_layer_beats_rtn_on_calibrated_inputs():
    lin = _linear(bias=False)
    calib, held_out = _correlated(1024, 256, 1), _correlated(256, 256, 2)
    ref = lin(held_out).detach()
    rtn = QuantLinear.from_linear(lin, bits=4, group_size=128)
    gptq = QuantLinear.from_linear(lin, bits=4, group_size=128, method="gptq", calib=calib)
    assert sqnr_db(ref, gptq(held_out)) > sqnr_db(ref, rtn(held_out)) + 1.0
    assert gptq.bias is None


def test_state_dict_roundtrip_and_buffers():
    src = QuantLinear.from_linear(_linear(), bits=3, group_size=32, sym=False)
    sd = src.state_dict()
    assert set(sd) == {"qweight", "scales", "zeros", "bias"}
    assert sd["qweight"].dtype == torch.int32 and sd["zeros"].dtype == torch.uint8
    dst = QuantLinear(256, 96, bits=3, group_size=32, sym=False)
    dst.load_state_dict(sd)
    x = torch.randn(4, 256)
    assert torch.equal(dst(x), src(x))
    assert isinstance(dst.weight_q, QTensor)
    assert "bits=3" in repr(dst)


def test_cached_dequantized_weight_is_reused_and_invalidated():
    q = QuantLinear.from_linear(_linear(), bits=4, group_size=64, cache_dequantized=True)
    x = torch.randn(2, 256)
    first = q(x)
    cached = q.dequantized_weight(torch.float32)
    assert q.dequantized_weight(torch.float32) is cached
    assert torch.equal(q(x), first)
    q.half()  # casts scales and bias: the cache must not survive
    assert q.scales.dtype == torch.float16 and q._dequantized is None
    assert q(x.half()).dtype == torch.float16
    uncached = QuantLinear.from_linear(_linear(), bits=4, group_size=64)
    uncached(x)
    assert uncached._dequantized is None


def test_triton_backend_matches_the_torch_path():
    from codegen.kernels.quant_gemm import interpreter_active

    if not torch.cuda.is_available() and not interpreter_active():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set")
    lin = _linear(k=128, n=40)
    q = QuantLinear.from_linear(lin, bits=4, group_size=32, backend="triton")
    q.config = {
        "BLOCK_M": 16,
        "BLOCK_N": 64,
        "BLOCK_K": 32,
        "SPLIT_K": 1,
        "GROUP_M": 1,
        "num_warps": 2,
        "num_stages": 1,
    }
    x = torch.randn(5, 128)
    y = q(x)
    q.backend = "torch"
    torch.testing.assert_close(y, q(x), rtol=1e-4, atol=1e-4)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(128, 256)
        self.act = nn.GELU()
        self.down = nn.Linear(256, 128)
        self.lm_head = nn.Linear(128, 50)

    def forward(self, x):
        return self.lm_head(x + self.down(self.act(self.up(x))))


def test_quantize_model_replaces_linears_and_skips():
    torch.manual_seed(0)
    model = _MLP()
    x = _correlated(64, 128, 5)
    ref = model(x).detach()
    quantize_model(model, bits=4, group_size=128)
    assert isinstance(model.up, QuantLinear) and isinstance(model.down, QuantLinear)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QuantLinear)
    assert sqnr_db(ref, model(x).detach()) > 15.0


def test_quantize_model_gptq_with_calibration_data():
    torch.manual_seed(0)
    calib = [_correlated(256, 128, s) for s in (1, 2, 3)]
    held_out = _correlated(128, 128, 9)
    ref_model, rtn_model = _MLP(), _MLP()
    rtn_model.load_state_dict(ref_model.state_dict())
    ref = ref_model(held_out).detach()
    gptq_model = quantize_model(ref_model, bits=3, group_size=64, calib_data=calib, skip=())
    quantize_model(rtn_model, bits=3, group_size=64, skip=())
    assert isinstance(gptq_model.lm_head, QuantLinear)
    with torch.no_grad():
        assert sqnr_db(ref, gptq_model(held_out)) > sqnr_db(ref, rtn_model(held_out)) + 0.5


def test_quantize_model_errors():
    model = nn.Sequential(nn.Linear(100, 8), nn.Linear(8, 8))
    with pytest.raises(DSLError, match="layer '0'.*does not divide K=100"):
        quantize_model(model, bits=4, group_size=32)
    with pytest.raises(DSLError, match="needs calib_data"):
        quantize_model(model, method="gptq")
    with pytest.raises(DSLError, match="backend"):
        QuantLinear(64, 8, group_size=32, backend="cuda")
    with pytest.raises(DSLError, match="expected nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(4, 4, 1))
    q = QuantLinear(64, 8, group_size=32)
    with pytest.raises(DSLError, match="does not match"):
        q.set_qweight(QuantLinear.from_linear(nn.Linear(64, 8), group_size=64).weight_q)
    # per-channel scales and skip patterns make the odd-sized layer quantizable
    quantize_model(model, bits=4, group_size=-1, skip=("1",))
    assert isinstance(model[0], QuantLinear) and not isinstance(model[1], QuantLinear)


@pytest.mark.parametrize("group_size, sym", [(32, True), (128, False)])
def test_bf16_cpu_forward_uses_torch_int4_kernel_and_matches(group_size, sym):
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch has no int4 CPU kernel")
    q = QuantLinear.from_linear(_linear(k=256, n=48), bits=4, group_size=group_size, sym=sym)
    x = torch.randn(2, 3, 256).bfloat16()
    y = q(x)
    assert q._int4pack is not None and y.dtype == torch.bfloat16 and y.shape == (2, 3, 48)
    exact = x.float() @ q.weight_q.dequantize().t() + q.bias
    assert sqnr_db(exact, y.float()) > 35.0          # bf16 rounding only
    q.use_torch_int4 = False
    assert sqnr_db(exact, q(x).float()) > 35.0
    odd = QuantLinear.from_linear(_linear(k=256, n=40), bits=4, group_size=group_size, sym=sym)
    odd(x)                                           # N % 16 != 0: the dequantize path serves it
    assert odd._int4pack is None
