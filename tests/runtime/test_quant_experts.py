"""runtime.nn.MoE.quantize_experts: packed quantized experts equal the float layer with the
dequantized weights (torch path and the grouped quant_moe_gemm kernels under the interpreter), at
edge routings, and GPTQ calibrated per expert beats round-to-nearest; the experts' layers read views
of the stacked buffers."""

import copy

import pytest
import torch

from codegen.kernels.quant_moe import quant_moe_experts_reference
from dsl.errors import DSLError
from runtime.nn import MoE, QuantExperts
from dsl.quantize import sqnr_db


def _moe(dim=64, hidden=32, experts=4, top_k=2, backend="torch", seed=0):
    torch.manual_seed(seed)
    return MoE(dim, hidden, experts, top_k, backend=backend).eval()


def _dequantized_twin(q_moe, float_moe):
    """The float layer with every expert weight replaced by its dequantized value."""
    twin = copy.deepcopy(float_moe)
    qe = q_moe.quantized_experts
    with torch.no_grad():
        for e in range(twin.num_experts):
            twin.w13[e].copy_(qe.gate_up[e].dequantized_weight(torch.float32))
            twin.w2[e].copy_(qe.down[e].dequantized_weight(torch.float32))
    return twin


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bits, group_size, sym", [(4, 32, True), (4, 32, False), (8, -1, True), (3, 32, True)])
@pytest.mark.parametrize("tokens", [0, 1, 37])
def test_quantized_experts_equal_dequantize_then_moe(backend, bits, group_size, sym, tokens):
    float_moe = _moe(backend=backend)
    q_moe = copy.deepcopy(float_moe)
    q_moe.quantize_experts(bits=bits, group_size=group_size, sym=sym)
    assert q_moe.w13 is None and q_moe.w2 is None
    x = torch.randn(tokens, 64) / 4
    with torch.no_grad():
        got = q_moe(x)
        want = _dequantized_twin(q_moe, float_moe)(x)
    assert got.shape == (tokens, 64)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if tokens:
        assert torch.equal(q_moe.last_load, float_moe.last_load) or q_moe.last_load.sum() == tokens * 2


def test_one_expert_takes_every_token_and_others_stay_idle():
    float_moe = _moe(experts=8, top_k=1)
    with torch.no_grad():
        float_moe.router.weight.zero_()
        float_moe.router.weight[5] = 1.0           # every token's largest score is expert 5's
    q_moe = copy.deepcopy(float_moe)
    q_moe.quantize_experts(bits=4, group_size=32)
    x = torch.rand(23, 64) + 0.1
    with torch.no_grad():
        got = q_moe(x)
        want = _dequantized_twin(q_moe, float_moe)(x)
    assert q_moe.last_load.tolist() == [0, 0, 0, 0, 0, 23, 0, 0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _hidden_states(rows: int, seed: int, dim: int = 128) -> torch.Tensor:
    # Correlated features with a few outlier channels, like a transformer's hidden states: the
    # structure error compensation exploits (on white noise GPTQ has nothing to gain over RTN).
    g = torch.Generator().manual_seed(1234)
    mix = torch.randn(dim, dim, generator=g) / dim ** 0.5 + torch.eye(dim)
    scale = torch.ones(dim)
    scale[:6] = 8.0
    return (torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)) @ mix) * scale / 4


def test_gptq_calibrated_per_expert_beats_rtn():
    float_moe = _moe(dim=128, hidden=64, experts=4, top_k=2)
    calib, held_out = _hidden_states(1024, seed=1), _hidden_states(256, seed=2)
    with torch.no_grad():
        ref = float_moe(held_out)
    quality = {}
    for method in ("rtn", "gptq"):
        q_moe = copy.deepcopy(float_moe)
        q_moe.quantize_experts(bits=3, group_size=64, method=method, calib=calib)
        with torch.no_grad():
            quality[method] = sqnr_db(ref, q_moe(held_out))
    assert quality["gptq"] > quality["rtn"] + 0.5, quality


def test_packed_weights_are_smaller_and_survive_state_dict():
    float_moe = _moe()
    q_moe = copy.deepcopy(float_moe)
    q_moe.quantize_experts(bits=4, group_size=32)
    float_bytes = sum(p.numel() * p.element_size() for p in (float_moe.w13, float_moe.w2))
    packed = {k: v for k, v in q_moe.state_dict().items() if k.startswith("quantized_experts.")}
    assert sum(v.numel() * v.element_size() for v in packed.values()) < float_bytes / 4
    again = copy.deepcopy(float_moe)
    again.quantize_experts(bits=4, group_size=32)
    again.load_state_dict(q_moe.state_dict())
    x = torch.randn(9, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(x), q_moe(x))


def test_bad_use_is_a_clear_error():
    q_moe = _moe()
    with pytest.raises(DSLError, match="needs calib"):
        q_moe.quantize_experts(method="gptq")
    with pytest.raises(DSLError, match="group"):
        q_moe.quantize_experts(bits=4, group_size=48)
    q_moe.quantize_experts(bits=4, group_size=32)
    with pytest.raises(DSLError, match="already quantized"):
        q_moe.quantize_experts()
    q_moe.train()
    with pytest.raises(DSLError, match="for inference"):
        q_moe(torch.randn(3, 64))


def _routing(tokens, experts, top_k, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    return ids, torch.rand(tokens, top_k, generator=g)


@pytest.mark.parametrize("bits, group_size, sym", [(4, 32, False), (3, -1, True)])
def test_quant_experts_triton_backend_equals_the_reference_path(bits, group_size, sym):
    torch.manual_seed(0)
    w13, w2 = torch.randn(5, 64, 64) / 8, torch.randn(5, 64, 32) / 8
    experts = QuantExperts.from_weights(w13, w2, bits=bits, group_size=group_size, sym=sym, backend="triton")
    x = torch.randn(11, 64)
    ids, weights = _routing(11, 5, 2, seed=1)
    with torch.no_grad():
        got = experts(x, ids, weights)              # the grouped kernels (interpreter)
        experts.backend = "torch"
        want = experts(x, ids, weights)             # the per-expert QuantLinear loop
    scale = want.abs().max()
    assert (got - want).abs().max() <= 1e-4 * scale
    assert (got - quant_moe_experts_reference(x, ids, weights, *experts.stacked())).abs().max() <= 1e-4 * scale
    with pytest.raises(DSLError, match=r"must lie in \[0, 5\)"):
        experts(x, ids + 5, weights)


def test_experts_read_views_of_the_stacked_buffers():
    experts = QuantExperts.from_weights(torch.randn(3, 64, 64), torch.randn(3, 64, 32), bits=4, group_size=32,
                                        sym=False, backend="torch")
    assert sorted(experts.state_dict()) == ["w13_qweight", "w13_scales", "w13_zeros",
                                            "w2_qweight", "w2_scales", "w2_zeros"]

    def shares_storage(module):
        return all(layer.qweight.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()
                   for layers, stacked in ((module.gate_up, module.w13_qweight), (module.down, module.w2_qweight))
                   for layer in layers)

    assert shares_storage(experts)
    half = copy.deepcopy(experts).half()            # moving or casting re-points the views
    assert shares_storage(half) and half.gate_up[2].scales.dtype == torch.float16
    torch.testing.assert_close(half.down[1].dequantized_weight(torch.float32),
                               experts.down[1].dequantized_weight(torch.float32), rtol=1e-3, atol=1e-3)
    with pytest.raises(DSLError, match="different formats"):
        QuantExperts(experts.gate_up[:2] + half.gate_up[2:], experts.down)
