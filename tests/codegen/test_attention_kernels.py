"""Attention templates on Triton's interpreter (fp32 and fp16, small shapes): flash forward and
backward by flash-attention's accuracy rule, varlen, paged decode with split-K, rotary; generated
source and search spaces."""

import pytest
import torch

import dsl
# runtime.compile, imported from its module: independent of the package's lazy attributes.
from runtime.compiler import compile as kdsl_compile
from autotune.devices import get_device
from codegen.template import get_space
from codegen.kernels.attention import seq_bucket
from dsl.attention_prims import attention, attention_varlen, paged_attention, rotary, rotary_ref

from tests.attention_oracle import (assert_flash_rule, exact, gathered_decode, plain_same_dtype,
                                    random_paged, varlen_reference)

T = dsl.Tensor


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@dsl.op
def attn(q: T["B", "H", "S", "D"], k: T["B", "HK", "SK", "D"], v: T["B", "HK", "SK", "D"], *,
         causal: bool = False):
    return attention(q, k, v, causal=causal)


@dsl.op
def attn_varlen(q: T["TQ", "H", "D"], k: T["TK", "HK", "D"], v: T["TK", "HK", "D"], cu_q: T["N", dsl.i32],
                cu_k: T["N", dsl.i32], *, causal: bool = False):
    return attention_varlen(q, k, v, cu_q, cu_k, causal=causal)


@dsl.op
def paged_scaled(q: T["B", "H", "D"], kc: T["NB", "P", "HK", "D"], vc: T["NB", "P", "HK", "D"],
                 table: T["B", "M", dsl.i32], lens: T["B", dsl.i32], bias: T["D"]):
    # the elementwise tail fuses into the split-K reduction's epilogue
    return paged_attention(q, kc, vc, table, lens) * 2.0 + bias


@dsl.op
def rot_residual(x: T["B", "S", "H", "D"], cos: T["B", "S", 1, "D"], sin: T["B", "S", 1, "D"]):
    return rotary(x, cos, sin) + x


def _inputs(b, h, h_kv, s_q, s_k, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    return mk(b, h, s_q, d), mk(b, h_kv, s_k, d), mk(b, h_kv, s_k, d), mk(b, h, s_q, d)


def _run_with_grads(f, args, dout, **kw):
    leaves = [a.clone().requires_grad_() for a in args[:3]]
    out = f(*leaves, *args[3:], **kw)
    grads = torch.autograd.grad(out, leaves, dout)
    return (out.detach(), *grads)


# A representative subset for the interpreter (the full grid runs on the torch backend in
# tests/runtime/test_attention.py): every head dim, seq_q != seq_k and lengths off the block
# sizes, causal and not, MHA/GQA/MQA, fp32 and fp16.
INTERPRETER_CASES = [
    # b, h, h_kv, s_q, s_k, d, causal, dtype
    (2, 4, 2, 37, 53, 40, True, torch.float32),
    (1, 2, 1, 70, 33, 80, False, torch.float32),
    (1, 3, 3, 45, 45, 64, True, torch.float16),
    (1, 4, 1, 17, 61, 32, True, torch.float16),
    (2, 2, 2, 5, 66, 80, False, torch.float16),
]


@pytest.mark.parametrize("b,h,h_kv,s_q,s_k,d,causal,dtype", INTERPRETER_CASES)
def test_flash_forward_and_backward_rule(b, h, h_kv, s_q, s_k, d, causal, dtype):
    q, k, v, dout = _inputs(b, h, h_kv, s_q, s_k, d, dtype, seed=s_q * 7 + d)
    f = kdsl_compile(attn, backend="triton")
    got = _run_with_grads(f, (q, k, v), dout, causal=causal)
    assert_flash_rule(got, plain_same_dtype(q, k, v, dout, causal), exact(q, k, v, dout, causal))
    assert [i.template for i in f.kernels_for(q, k, v, causal=causal)] == ["attention_fwd"]


def test_flash_config_override_small_blocks():
    # Other tile shapes, including BLOCK_N > BLOCK_M in the backward's swapped dQ tiles.
    q, k, v, dout = _inputs(1, 2, 1, 23, 41, 40, torch.float32, seed=11)
    f = kdsl_compile(attn, backend="triton", configs={
        "attention_fwd": {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 2, "num_stages": 1},
        "attention_bwd": {"BLOCK_M": 64, "BLOCK_N": 16, "num_warps": 2, "num_stages": 1}})
    got = _run_with_grads(f, (q, k, v), dout, causal=True)
    assert_flash_rule(got, plain_same_dtype(q, k, v, dout, True), exact(q, k, v, dout, True))


@pytest.mark.parametrize("dtype,causal,h,h_kv,d", [(torch.float32, True, 4, 2, 40),
                                                    (torch.float16, False, 2, 1, 64)])
def test_varlen_forward_and_backward_rule(dtype, causal, h, h_kv, d):
    lens_q, lens_k = [5, 0, 19, 33], [9, 4, 19, 47]
    g = torch.Generator().manual_seed(d)
    mk = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    q, k, v = mk(sum(lens_q), h, d), mk(sum(lens_k), h_kv, d), mk(sum(lens_k), h_kv, d)
    dout = mk(sum(lens_q), h, d)
    cu_q = torch.tensor([0, 5, 5, 24, 57], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 13, 32, 79], dtype=torch.int32)
    f = kdsl_compile(attn_varlen, backend="triton")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = f(*leaves, cu_q, cu_k, causal=causal)
    got = (out.detach(), *torch.autograd.grad(out, leaves, dout))
    ref = varlen_reference(q, k, v, dout, cu_q, cu_k, causal, exact)
    plain = varlen_reference(q, k, v, dout, cu_q, cu_k, causal, plain_same_dtype)
    assert_flash_rule(got, plain, ref)
    # the second sequence has keys but no query: its keys get exactly zero gradient
    assert torch.all(got[2][9:13] == 0) and torch.all(got[3][9:13] == 0)


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("dtype,h,h_kv,d,block", [(torch.float32, 4, 2, 40, 8),
                                                   (torch.float16, 4, 1, 64, 16)])
def test_paged_decode_equals_gathered_attention(splits, dtype, h, h_kv, d, block):
    lens = [1, 37, 0, 64]
    q, kc, vc, table, lens_t = random_paged(4, h, h_kv, d, block, 64 // block, lens, dtype=dtype,
                                            seed=splits + d)
    bias = torch.randn(d).to(dtype)
    f = kdsl_compile(paged_scaled, backend="triton", configs={
        "attention_paged": {"BLOCK_N": 16, "NUM_SPLITS": splits, "num_warps": 2, "num_stages": 1}})
    got = f(q, kc, vc, table, lens_t, bias)
    want = gathered_decode(q, kc, vc, table, lens_t) * 2.0 + bias.double()
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    assert (got.double() - want).abs().max() < tol
    (info,) = f.kernels_for(q, kc, vc, table, lens_t, bias)
    assert info.template == "attention_paged" and "mul" in info.source and "add" in info.source


def test_rotary_kernel_with_fused_residual_and_its_backward():
    g = torch.Generator().manual_seed(2)
    x, cos, sin = torch.randn(2, 5, 3, 12, generator=g), torch.randn(2, 5, 1, 12, generator=g), \
        torch.randn(2, 5, 1, 12, generator=g)
    f = kdsl_compile(rot_residual, backend="triton")
    leaves = [t.clone().requires_grad_() for t in (x, cos, sin)]
    out = f(*leaves)
    ct = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, leaves, ct)
    refs = [t.clone().requires_grad_() for t in (x, cos, sin)]
    want = rotary_ref(*refs) + refs[0]
    torch.testing.assert_close(out, want.detach(), rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, torch.autograd.grad(want, refs, ct)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert [i.template for i in f.kernels_for(x, cos, sin)] == ["attention_rotary"]


def test_generated_source_names_its_variant():
    q, k, v, _ = _inputs(1, 2, 2, 8, 8, 16, torch.float32, 0)
    f = kdsl_compile(attn, backend="triton")
    causal_src = f.kernels_for(q, k, v, causal=True)[0].source
    plain_src = f.kernels_for(q, k, v, causal=False)[0].source
    assert "causal=True" in causal_src and "offs_m[:, None] + diag" in causal_src
    assert "causal=False" in plain_src and "diag" not in plain_src
    assert 'input_precision="ieee"' in plain_src   # fp32 stays fp32 (no tf32)
    rows = f.explain(q, k, v, causal=True)
    assert rows[0].problem == {"B": 1, "H": 2, "G": 1, "D": 16, "Sq": 16, "Sk": 16}


def test_search_spaces_and_constraints():
    h100 = get_device("h100")
    fwd, bwd, paged = get_space("attention_fwd"), get_space("attention_bwd"), get_space("attention_paged")
    shape = {"B": 4, "H": 32, "G": 4, "D": 128, "Sq": 4096, "Sk": 4096}
    configs = list(fwd.enumerate(shape, h100))
    assert configs and all(fwd.feasible(c, shape, h100) for c in configs)
    big = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 4}
    assert "shared_memory" in fwd.violations(big, dict(shape, D=256), h100)
    assert "registers" in bwd.violations({"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 2, "num_stages": 1},
                                         shape, h100)
    assert "tile_fits_problem" in fwd.violations(big, dict(shape, Sq=16), h100)
    # decode: more splits than the context can feed are ruled out
    ctx = {"B": 8, "H": 32, "G": 8, "D": 128, "L": 64, "P": 16}
    assert "splits_need_context" in paged.violations(
        {"BLOCK_N": 64, "NUM_SPLITS": 4, "num_warps": 4, "num_stages": 2}, ctx, h100)
    assert paged.feasible({"BLOCK_N": 64, "NUM_SPLITS": 16, "num_warps": 4, "num_stages": 2},
                          dict(ctx, L=65536), h100)
    assert [seq_bucket(n) for n in (1, 16, 17, 1000)] == [16, 16, 32, 1024]
