"""The grouped quantized MoE kernels (quant_moe_gemm) under Triton's interpreter against "dequantize
every expert, then matmul" in fp32; edge routings; format errors; the search space; a static compile
for sm_90."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import codegen  # noqa: F401  (switches Triton to its interpreter when there is no GPU)
from autotune.devices import get_device
from codegen.template import get_space
from codegen.kernels import quant_moe as qm
from codegen.kernels.quant_gemm import interpreter_active
from runtime.ops.quant import quant_moe_experts
from dsl.errors import CodegenError, DSLError, TuningError
from dsl.quantize import quantize_rtn

REPO = Path(__file__).resolve().parents[2]
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
needs_kernels = pytest.mark.skipif(
    not ON_GPU and not interpreter_active(), reason="triton was imported before TRITON_INTERPRET=1 was set"
)


def _cfg(**kw):
    return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1, "GROUP_M": 1, "num_warps": 2,
            "num_stages": 1, **kw}


def _experts(num, n, k, bits, group_size, sym, seed):
    g = torch.Generator().manual_seed(seed)
    qs = [quantize_rtn(torch.randn(n, k, generator=g), bits, group_size, sym).to(DEVICE) for _ in range(num)]
    return qs, qm.StackedQTensor.stack(qs)


def _oracle(x, ids, weights, gate_up, down):
    """Dequantize then matmul in fp32: every expert on every token, then each token's k picks gathered
    and weighted (independent of the kernels' sorting and of the reference's loop)."""
    outs = []
    for g, d in zip(gate_up, down):
        gu = x.float() @ g.dequantize().t()
        hidden = gu.shape[1] // 2
        outs.append((F.silu(gu[:, :hidden]) * gu[:, hidden:]) @ d.dequantize().t())
    tokens = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(ids)
    return (torch.stack(outs)[ids.long(), tokens] * weights.float()[..., None]).sum(dim=1)


def _routing(tokens, num_experts, top_k, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens)]) if tokens else \
        torch.zeros(0, top_k, dtype=torch.int64)
    return ids.to(device), torch.rand(tokens, top_k, generator=g).to(device)


def _rel_err(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


# (D, H) per group size: each GEMM's K divisible by the group size, D not a multiple of the down
# GEMM's BLOCK_N; per channel takes K and N that are multiples of no block size (and, for 3 bits,
# of no word width).
_DIMS = {32: (96, 64), 64: (128, 64), 128: (128, 128), -1: (72, 40)}


# Every bit width and every group size, each format sym and asym somewhere; split-K and the
# activation dtype vary over them (the interpreter is too slow for the full product).
@needs_kernels
@pytest.mark.parametrize("bits, group_size, sym, split_k, dtype", [
    (2, 32, False, 1, torch.float32),
    (2, -1, True, 2, torch.float32),
    (3, 64, True, 1, torch.float32),
    (3, -1, False, 2, torch.float16),
    (4, 128, False, 2, torch.float32),
    (8, 32, True, 1, torch.float16),
])
def test_quant_moe_equals_dequantize_then_matmul(bits, group_size, sym, split_k, dtype):
    dim, hidden = _DIMS[group_size]
    experts, tokens, top_k = 3, 9, 2
    gu_qs, w13 = _experts(experts, 2 * hidden, dim, bits, group_size, sym, seed=bits)
    dn_qs, w2 = _experts(experts, dim, hidden, bits, group_size, sym, seed=bits + 100)
    x = (torch.randn(tokens, dim, generator=torch.Generator().manual_seed(1)) / 4).to(DEVICE, dtype)
    ids, weights = _routing(tokens, experts, top_k, seed=2)
    block_k = 32 if split_k > 1 or group_size == -1 else min(group_size, 64)
    # Wide N tiles keep the interpreter's program count low; D = 72 / 96 still leaves columns masked.
    cfg = {"gate_up": _cfg(BLOCK_N=64, BLOCK_K=block_k, SPLIT_K=split_k),
           "down": _cfg(BLOCK_N=128, BLOCK_K=block_k, SPLIT_K=split_k)}
    out = quant_moe_experts(x, ids, weights, w13, w2, config=cfg)
    assert out.shape == (tokens, dim) and out.dtype == dtype
    oracle = _oracle(x, ids, weights, gu_qs, dn_qs)
    if dtype == torch.float32:
        assert _rel_err(out, oracle) <= 1e-4
    else:
        # fp16 rounds the weights, h and the output (~2**-11 each); the reference rounds alike.
        assert _rel_err(out, qm.quant_moe_experts_reference(x, ids, weights, w13, w2)) <= 2e-3
        assert _rel_err(out, oracle) <= 1e-2


@needs_kernels
@pytest.mark.parametrize("case", ["one_expert_all_tokens", "idle_experts_top2", "decode_split_k",
                                  "top1_split_k", "strided_x_per_gemm_configs"])
def test_quant_moe_edge_routings(case):
    experts, dim, hidden = 6, 64, 32
    gu_qs, w13 = _experts(experts, 2 * hidden, dim, 4, 32, False, seed=5)
    dn_qs, w2 = _experts(experts, dim, hidden, 4, 32, False, seed=6)
    g = torch.Generator().manual_seed(7)
    tokens, top_k, cfg = 17, 2, {"gate_up": _cfg(), "down": _cfg(BLOCK_N=64)}
    if case == "one_expert_all_tokens":      # top-1 stores directly; two row blocks for expert 2
        top_k = 1
        ids = torch.full((tokens, 1), 2, dtype=torch.int64)
    elif case == "idle_experts_top2":        # experts 1, 2, 4, 5 get nothing
        ids = torch.tensor([[0, 3], [3, 0]] * 8 + [[3, 0]])
    elif case == "decode_split_k":           # one token: each expert one row, K in 4 splits
        tokens = 1
        ids = torch.tensor([[4, 1]])
        cfg = {"gate_up": _cfg(BLOCK_K=16, SPLIT_K=4), "down": _cfg(BLOCK_N=64, BLOCK_K=16, SPLIT_K=2)}
    elif case == "top1_split_k":             # top-1 through the combine buffer (splits to sum)
        top_k = 1
        ids = torch.randint(0, experts, (tokens, 1), generator=g)
        cfg = {"gate_up": _cfg(SPLIT_K=2), "down": _cfg(BLOCK_N=64, BLOCK_K=16, SPLIT_K=2)}
    else:                                    # a non-contiguous x; each GEMM with its own config
        ids = torch.randint(0, experts, (tokens, 2), generator=g)
        cfg = {"gate_up": _cfg(GROUP_M=4), "down": _cfg(BLOCK_N=16, BLOCK_K=16)}
    x = torch.randn(tokens, dim, generator=g).to(DEVICE)
    if case == "strided_x_per_gemm_configs":
        x = torch.randn(dim, tokens, generator=g).to(DEVICE).t()
    ids = ids.to(DEVICE)
    weights = torch.rand(tokens, top_k, generator=g).to(DEVICE)
    out = quant_moe_experts(x, ids, weights, w13, w2, config=cfg)
    assert _rel_err(out, _oracle(x, ids, weights, gu_qs, dn_qs)) <= 1e-4
    if case == "idle_experts_top2":  # a fixed-order combine: the same inputs give the same bits
        assert torch.equal(out, quant_moe_experts(x, ids, weights, w13, w2, config=cfg))


@needs_kernels
def test_quant_moe_zero_tokens_and_the_reference():
    _, w13 = _experts(3, 64, 64, 4, 64, True, seed=1)
    _, w2 = _experts(3, 64, 32, 8, -1, False, seed=2)   # each GEMM has its own format
    empty = torch.zeros(0, 64, device=DEVICE)
    ids, weights = _routing(0, 3, 2, seed=0)
    for fn in (quant_moe_experts, qm.quant_moe_experts_reference):
        out = fn(empty, ids, weights, w13, w2)
        assert out.shape == (0, 64)
    x = torch.randn(5, 64, device=DEVICE)
    ids, weights = _routing(5, 3, 2, seed=3)
    out = quant_moe_experts(x, ids, weights, w13, w2)  # the default configs
    assert _rel_err(out, qm.quant_moe_experts_reference(x, ids, weights, w13, w2)) <= 1e-4


@needs_kernels
def test_quant_moe_bad_inputs_raise_clear_errors():
    qs, w13 = _experts(2, 64, 64, 4, 32, True, seed=1)
    _, w2 = _experts(2, 64, 32, 4, 32, True, seed=2)
    x = torch.randn(3, 64, device=DEVICE)
    ids, weights = _routing(3, 2, 2, seed=0)
    run = quant_moe_experts
    with pytest.raises(DSLError, match="D=64"):
        run(torch.randn(3, 32, device=DEVICE), ids, weights, w13, w2)
    with pytest.raises(DSLError, match=r"must lie in \[0, 2\)"):
        run(x, ids + 1, weights, w13, w2)
    with pytest.raises(DSLError, match=r"must lie in \[0, 2\)"):
        run(x, ids - 1, weights, w13, w2)
    with pytest.raises(DSLError, match="weights"):
        run(x, ids, weights[:, :1], w13, w2)
    with pytest.raises(DSLError, match="integer"):
        run(x, ids.float(), weights, w13, w2)
    with pytest.raises(DSLError, match="StackedQTensor"):
        run(x, ids, weights, qs[0], w2)
    with pytest.raises(DSLError, match="must be \\[2H, D\\]"):
        run(x, ids, weights, w13, _experts(2, 64, 16, 4, -1, True, seed=3)[1])
    with pytest.raises(DSLError, match="down holds 3"):
        run(x, ids, weights, w13, _experts(3, 64, 32, 4, 32, True, seed=3)[1])
    with pytest.raises(DSLError, match="different formats"):
        qm.StackedQTensor.stack([qs[0], quantize_rtn(torch.randn(64, 64), 3, 32).to(DEVICE)])
    with pytest.raises(DSLError, match="different formats"):
        qm.StackedQTensor.stack([qs[0], quantize_rtn(torch.randn(64, 64), 4, 32, sym=False).to(DEVICE)])
    with pytest.raises(DSLError, match="does not divide"):
        qm.StackedQTensor(w13.data, w13.scales, None, 4, 128, (64, 96), True)
    with pytest.raises(DSLError, match="scales must have shape"):
        qm.StackedQTensor(w13.data, w13.scales[:, :1], None, 4, 32, (64, 64), True)
    with pytest.raises(TuningError, match="block_k_within_group"):
        run(x, ids, weights, w13, w2, config=_cfg(BLOCK_K=64))
    if not ON_GPU:
        with pytest.raises(DSLError, match="bfloat16"):
            run(x.bfloat16(), ids, weights, w13, w2)


def test_space_constraints_and_default_config():
    h100, rtx, cpu = get_device("h100"), get_device("rtx4090"), get_device("cpu")
    space = get_space("quant_moe_gemm")
    assert space is qm.QUANT_MOE_SPACE
    _, w13 = _experts(8, 256, 128, 4, 128, True, seed=0)
    decode = qm.problem_shape("gate_up", 1, 2, w13, 2)
    assert (decode["N"], decode["K"], decode["E"], decode["w_tiles"]) == (128, 128, 8, 2)
    good = _cfg(BLOCK_N=32, BLOCK_K=64, SPLIT_K=2, num_warps=4, num_stages=3)
    assert space.feasible(good, decode, h100)
    assert "block_k_within_group" in space.violations(good, {**decode, "group_size": 32}, h100)
    assert "rows_per_expert" in space.violations({**good, "BLOCK_M": 128}, decode, h100)
    assert "split_k_only_for_small_batch" in space.violations(good, {**decode, "M": 512}, h100)
    assert "registers" in space.violations({**good, "BLOCK_N": 128, "BLOCK_K": 128}, decode, h100)
    big = {**good, "BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "num_stages": 5, "num_warps": 8}
    assert "fits_shared_memory" in space.violations(big, {**decode, "M": 4096, "K": 4096}, rtx)
    assert "fits_shared_memory" not in space.violations(big, {**decode, "M": 4096, "K": 4096}, cpu)
    cfg = qm.default_config({**decode, "N": 256, "K": 2048}, h100)
    assert cfg["SPLIT_K"] >= 2  # one token's two experts: a tiny grid gets split along K
    assert qm.default_config({**decode, "N": 256, "K": 2048}, cpu)["SPLIT_K"] == 1


@settings(max_examples=60)
@given(
    device=st.sampled_from(["h100", "a100", "rtx4090", "cpu"]),
    tokens=st.integers(1, 8192),
    n=st.integers(1, 16384),
    k_groups=st.integers(1, 64),
    group_size=st.sampled_from([32, 64, 128, 256, -1]),
    experts=st.sampled_from([1, 4, 8, 64, 256]),
    top_k=st.sampled_from([1, 2, 8]),
    w_tiles=st.sampled_from([1, 2]),
)
def test_default_config_is_always_feasible(device, tokens, n, k_groups, group_size, experts, top_k, w_tiles):
    dev = get_device(device)
    shape = {"M": tokens, "N": n, "K": k_groups * (group_size if group_size > 0 else 96), "E": experts,
             "topk": min(top_k, experts), "group_size": group_size, "bits": 4, "elem_bytes": 2, "w_tiles": w_tiles}
    assert qm.QUANT_MOE_SPACE.feasible(qm.default_config(shape, dev), shape, dev)


def test_rendered_sources_are_readable_and_format_specific():
    gate_up = qm.quant_moe_source("gate_up", 3, 64, False, True)
    assert "VALUES_PER_WORD: tl.constexpr = 10" in gate_up and "// 64" in gate_up
    assert "tl.sigmoid(acc) * acc_u" in gate_up and "_swiglu[" in gate_up and "_combine" not in gate_up
    assert 'input_precision="ieee"' in gate_up
    down = qm.quant_moe_source("down", 4, -1, True, False)
    assert "acc = acc * scale[None, :]" in down and "8.0" in down and "_combine[" in down
    assert "acc_u" not in down and "input_precision" not in down
    with pytest.raises(CodegenError, match="mode"):
        qm.quant_moe_source("up", 4, 32, True, False)
    with pytest.raises(DSLError, match="bits"):
        qm.quant_moe_source("down", 5, 32, True, False)


