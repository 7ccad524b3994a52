"""Attention primitives in the IR: inference, errors, reference semantics and VJP rules."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dsl
from dsl import DSLError
from dsl.attention_prims import (attention, attention_backward_ref, attention_forward_ref, attention_varlen,
                           paged_attention, paged_attention_ref, rotary, rotary_ref)
from dsl.autodiff import grad
from dsl.reference import run
from dsl.trace import bind_shapes

from tests.attention_oracle import exact, gathered_decode, random_paged

T = dsl.Tensor


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@dsl.op
def sym_attention(q: T["B", "H", "S", "D"], k: T["B", "HK", "SK", "D"], v: T["B", "HK", "SK", "D"], *,
                  causal: bool = False):
    return attention(q, k, v, causal=causal)


def _graph_ops(graph):
    return [n.op for n in graph.topo()]


def test_attention_node_has_out_and_fp32_lse():
    g = sym_attention.trace((dsl.f16, dsl.f16, dsl.f16), causal=True)
    (node,) = [n for n in g.topo() if n.op == "attention"]
    out_t, lse_t = node.types
    assert out_t.shape == ("B", "H", "S", "D") and out_t.dtype is dsl.f16
    assert lse_t.shape == ("B", "H", "S") and lse_t.dtype is dsl.f32
    assert node.attr["causal"] is True and node.attr["scale"] is None   # D symbolic: resolved at run time
    assert g.output_types() == [out_t]


def test_static_head_dim_resolves_scale():
    @dsl.op
    def f(q: T["B", "H", "S", 40], k: T["B", "H", "S", 40], v: T["B", "H", "S", 40]):
        return attention(q, k, v)

    (node,) = [n for n in f.graph.topo() if n.op == "attention"]
    assert node.attr["scale"] == pytest.approx(1 / math.sqrt(40))


def test_backward_is_one_attention_bwd_primitive():
    g = grad(sym_attention.trace((dsl.f32,) * 3, causal=True))
    ops = _graph_ops(g)
    assert ops.count("attention_bwd") == 1
    # no chain of small kernels: no softmax, no matmul, no reductions in the backward graph
    assert not {"softmax", "matmul", "sum", "exp"} & set(ops)
    (node,) = [n for n in g.topo() if n.op == "attention_bwd"]
    assert len(node.types) == 3 and node.attr["causal"] is True


@pytest.mark.parametrize("shapes,causal,match", [
    (((1, 6, 8, 16), (1, 4, 8, 16), (1, 4, 8, 16)), False, "H % H_kv"),
    (((1, 4, 8, 16), (4, 8, 16), (4, 8, 16)), False, "k has shape \\[4, 8, 16\\] of rank 3"),
    (((1, 4, 9, 16), (1, 4, 8, 16), (1, 4, 8, 16)), True, "seq_q=9 > seq_k=8"),
    (((1, 4, 8, 16), (1, 4, 8, 32), (1, 4, 8, 32)), False, "head dim"),
    (((2, 4, 8, 16), (1, 4, 8, 16), (1, 4, 8, 16)), False, "batch"),
    (((1, 4, 8, 16), (1, 4, 0, 16), (1, 4, 0, 16)), False, "0 keys"),
])
def test_static_shape_errors_name_op_and_line(shapes, causal, match):
    q_s, k_s, v_s = (T[s] for s in shapes)

    def body(q, k, v):
        return attention(q, k, v, causal=causal)

    body.__annotations__ = {"q": q_s, "k": k_s, "v": v_s}
    with pytest.raises(DSLError, match=match) as info:
        dsl.op(body, name="bad_attention").graph
    assert "bad_attention" in str(info.value) and "attention" in str(info.value)


def test_wrong_layout_rank_and_dtypes_are_dsl_errors():
    @dsl.op
    def packed(q: T["T", "H", "D"], k: T["T", "H", "D"], v: T["T", "H", "D"]):
        return attention(q, k, v)

    with pytest.raises(DSLError, match=r"\[B, H, S, D\]"):
        packed.graph

    @dsl.op
    def ints(q: T["B", "H", "S", "D", dsl.i32], k: T["B", "H", "S", "D", dsl.i32],
             v: T["B", "H", "S", "D", dsl.i32]):
        return attention(q, k, v)

    with pytest.raises(DSLError, match="f32, f16 or bf16"):
        ints.graph


def test_symbolic_heads_checked_at_call_time():
    q, k = torch.randn(1, 6, 5, 8), torch.randn(1, 4, 5, 8)
    with pytest.raises(DSLError, match="6 query heads cannot be grouped over 4"):
        sym_attention(q, k, k)
    with pytest.raises(DSLError, match="seq_q=7 > seq_k=5"):
        sym_attention(torch.randn(1, 2, 7, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), causal=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("h,h_kv", [(4, 4), (4, 2), (4, 1)])
def test_reference_forward_and_backward_match_exact(causal, h, h_kv):
    g = torch.Generator().manual_seed(h + h_kv + causal)
    q, k, v = torch.randn(2, h, 13, 24, generator=g), torch.randn(2, h_kv, 29, 24, generator=g), \
        torch.randn(2, h_kv, 29, 24, generator=g)
    dout = torch.randn(2, h, 13, 24, generator=g)
    out, lse = attention_forward_ref(q, k, v, causal)
    ref = exact(q, k, v, dout, causal)
    assert (out.double() - ref[0]).abs().max() < 1e-5
    scores = (q.double() @ k.double().repeat_interleave(h // h_kv, 1).transpose(-1, -2)) / math.sqrt(24)
    if causal:
        scores = scores.masked_fill(~torch.ones(13, 29, dtype=torch.bool).tril(16), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-5)
    grads = attention_backward_ref(q, k, v, out, lse, dout, causal)
    for got, want in zip(grads, ref[1:]):
        assert (got.double() - want).abs().max() < 1e-4


def test_grad_graph_evaluates_to_exact_gradients():
    fwd = sym_attention.trace((dsl.f32,) * 3, causal=True)
    bwd = grad(fwd)
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 4, 9, 16, generator=g), torch.randn(1, 2, 11, 16, generator=g), \
        torch.randn(1, 2, 11, 16, generator=g)
    dout = torch.randn(1, 4, 9, 16, generator=g)
    tensors = [q, k, v, dout]
    got = run(bwd, tensors, bind_shapes(bwd, tensors, "bwd"))
    for a, b in zip(got, exact(q, k, v, dout, True)[1:]):
        assert (a.double() - b).abs().max() < 1e-4


# -- varlen ---------------------------------------------------------------------------------------


@dsl.op
def sym_varlen(q: T["TQ", "H", "D"], k: T["TK", "HK", "D"], v: T["TK", "HK", "D"], cu_q: T["N", dsl.i32],
               cu_k: T["N", dsl.i32], *, causal: bool = True):
    return attention_varlen(q, k, v, cu_q, cu_k, causal=causal)


def test_varlen_inference_and_offset_checks():
    g = sym_varlen.trace((dsl.f32, dsl.f32, dsl.f32, dsl.i32, dsl.i32))
    (node,) = [n for n in g.topo() if n.op == "attention_varlen"]
    assert node.types[1].shape == ("H", "TQ") and node.types[1].dtype is dsl.f32
    q, k = torch.randn(10, 2, 8), torch.randn(12, 2, 8)
    with pytest.raises(DSLError, match="sequence 1: causal with seq_q=6 > seq_k=4"):
        sym_varlen(q, k, k, torch.tensor([0, 4, 10], dtype=torch.int32),
                   torch.tensor([0, 8, 12], dtype=torch.int32))
    with pytest.raises(DSLError, match="cu_seqlens end at"):
        sym_varlen(q, k, k, torch.tensor([0, 4, 9], dtype=torch.int32),
                   torch.tensor([0, 8, 12], dtype=torch.int32))

    @dsl.op
    def wrong_offsets(q: T["TQ", "H", "D"], k: T["TK", "H", "D"], v: T["TK", "H", "D"],
                      cu_q: T["N", dsl.i64], cu_k: T["N", dsl.i64]):
        return attention_varlen(q, k, v, cu_q, cu_k)

    with pytest.raises(DSLError, match="cu_seqlens_q must be i32"):
        wrong_offsets.graph


def test_varlen_backward_is_varlen_bwd_primitive():
    g = grad(sym_varlen.trace((dsl.f32, dsl.f32, dsl.f32, dsl.i32, dsl.i32)))
    assert _graph_ops(g).count("attention_varlen_bwd") == 1
    assert len(g.outputs) == 3   # the offsets are integers: no gradient


# -- paged ------------------------------------------------------------------------------------------


@dsl.op
def sym_paged(q: T["B", "H", "D"], kc: T["N", "P", "HK", "D"], vc: T["N", "P", "HK", "D"],
              table: T["B", "M", dsl.i32], lens: T["B", dsl.i32]):
    return paged_attention(q, kc, vc, table, lens)


def test_paged_reference_matches_gathered_attention_and_zero_length():
    q, kc, vc, table, lens = random_paged(4, 4, 2, 16, 4, 5, [1, 0, 20, 13], seed=5)
    got = sym_paged(q, kc, vc, table, lens)
    want = gathered_decode(q, kc, vc, table, lens)
    assert (got.double() - want).abs().max() < 1e-5
    assert torch.all(got[1] == 0)


def test_paged_errors():
    q, kc, vc, table, lens = random_paged(2, 4, 2, 16, 4, 3, [3, 12])
    with pytest.raises(DSLError, match=r"seq_lens must lie in \[0, 12\]"):
        paged_attention_ref(q, kc, vc, table, torch.tensor([3, 13], dtype=torch.int32))
    bad = table.clone()
    bad[1, 0] = kc.shape[0] + 4
    with pytest.raises(DSLError, match="block ids outside"):
        paged_attention_ref(q, kc, vc, bad, lens)

    @dsl.op
    def paged_4d_q(q: T["B", "H", "S", "D"], kc: T["N", "P", "HK", "D"], vc: T["N", "P", "HK", "D"],
                   table: T["B", "M", dsl.i32], lens: T["B", dsl.i32]):
        return paged_attention(q, kc, vc, table, lens)

    with pytest.raises(DSLError, match="one new token per sequence"):
        paged_4d_q.graph


# -- rotary -----------------------------------------------------------------------------------------


def test_rotary_reference_is_half_split_rotation():
    x = torch.randn(3, 8)
    angle = torch.randn(3, 4)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    y = rotary_ref(x, cos, sin)
    # Each pair (x_i, x_{i+4}) is rotated by its angle: norms are preserved, pairs are complex products.
    z = torch.complex(x[:, :4], x[:, 4:]) * torch.exp(1j * angle)
    torch.testing.assert_close(y, torch.cat([z.real, z.imag], -1))
    assert torch.allclose(rotary_ref(y, cos, sin, adjoint=True), x, atol=1e-6)   # adjoint = inverse here


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.sampled_from([2, 4, 6, 10]), st.booleans())
def test_rotary_vjp_matches_torch_autograd(rows, heads, d, broadcast_cos):
    @dsl.op
    def rot(x: T["R", "H", "D"], c: T["R", 1, "D"], s: T["R", 1, "D"]):
        return rotary(x, c, s) * 1.5

    g = torch.Generator().manual_seed(rows * 100 + heads * 10 + d)
    x = torch.randn(rows, heads, d, generator=g, dtype=torch.float64).float()
    c = torch.randn(rows, 1, d, generator=g)
    s = torch.randn(rows, 1, d, generator=g)
    if broadcast_cos:   # the usual tables: equal halves
        c = torch.cat([c[..., : d // 2]] * 2, -1)
    ct = torch.randn(rows, heads, d, generator=g)
    bwd = grad(rot.graph)
    got = run(bwd, [x, c, s, ct], bind_shapes(bwd, [x, c, s, ct], "rot"))
    xs, cs, ss = (t.clone().requires_grad_() for t in (x, c, s))
    want = torch.autograd.grad(rotary_ref(xs, cs, ss) * 1.5, (xs, cs, ss), ct)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rotary_errors():
    @dsl.op
    def odd(x: T["R", 5], c: T["R", 5], s: T["R", 5]):
        return rotary(x, c, s)

    with pytest.raises(DSLError, match="must be even"):
        odd.graph

    @dsl.op
    def grows(x: T["R", 1, 4], c: T["R", 3, 4], s: T["R", 3, 4]):
        return rotary(x, c, s)

    with pytest.raises(DSLError, match="broadcast to x"):
        grows.graph
