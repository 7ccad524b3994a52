"""dsl.moe: shape inference, errors, reference semantics and vector-Jacobian rules (through the
torch backend), and how the partitioner turns moe_ffn into two fused grouped GEMMs."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dsl
import runtime  # noqa: F401
from runtime.compiler import compile as compile_op
from codegen.partition import kernels, partition
from dsl import moe

Tn = dsl.Tensor


@dsl.op
def layer(x: Tn["T", "D"], rw: Tn["E", "D"], w13: Tn["E", "H2", "D"], w2: Tn["E", "D", "H"], *, k: int = 2):
    weights, ids = moe.route(x @ rw.T, k)
    return moe.moe_ffn(x, w13, w2, weights, ids)


def test_moe_ffn_traces_to_two_fused_grouped_gemms():
    import codegen.kernels.moe  # noqa: F401  (maps the MoE anchors to their templates)

    g = layer.graph
    ops = [n.op for n in g.topo()]
    assert "moe_gate_up" in ops and "grouped_matmul_combine" in ops
    node = next(n for n in g.topo() if n.op == "moe_gate_up")
    assert node.type.shape == ("T", 2, "H")
    groups = kernels(partition(g))
    assert [k.template for k in groups] == ["gemm", "moe_route", "moe_gemm", "moe_gemm"]
    f = compile_op(layer, backend="triton")
    sources = {k.name: k.source for k in f.kernels}
    gate_up = next(s for s in sources.values() if "(swiglu)" in s)
    down = next(s for s in sources.values() if "(combine)" in s)
    assert "val = acc * tl.sigmoid(acc) * acc_u" in gate_up          # SwiGLU in the first epilogue
    assert "acc = acc * weight.to(tl.float32)[:, None]" in down       # routing weight in the second
    assert "_combine" in down                                        # and the fixed-order combine


def test_backward_graph_uses_moe_backward_primitives():
    bwd = dsl.grad(layer.graph)
    ops = {n.op for n in bwd.topo()}
    assert {"moe_gate_up_bwd", "grouped_matmul_dw", "route_bwd", "grouped_matmul"} <= ops
    assert sum(n.op == "grouped_matmul_dw" for n in bwd.topo()) == 2   # dw13 and dw2


def test_shape_errors_name_the_problem():
    @dsl.op
    def k_too_big(logits: Tn["T", 4]):
        return moe.route(logits, 5)

    with pytest.raises(dsl.DSLError, match="top-k 5 is larger than the number of experts 4"):
        _ = k_too_big.graph

    @dsl.op
    def mixed(x: Tn["T", "K", dsl.f16], w: Tn["E", "N", "K", dsl.f32], ids: Tn["T", "S", dsl.i32]):
        return moe.grouped_matmul(x, w, ids)

    with pytest.raises(dsl.DSLError, match="one dtype"):
        _ = mixed.graph

    @dsl.op
    def float_ids(x: Tn["T", "K"], w: Tn["E", "N", "K"], ids: Tn["T", "S", dsl.f32]):
        return moe.grouped_matmul(x, w, ids)

    with pytest.raises(dsl.DSLError, match="int32 or int64"):
        _ = float_ids.graph

    @dsl.op
    def bad_groups(logits: Tn["T", 6]):
        return moe.route(logits, 2, n_groups=4)

    with pytest.raises(dsl.DSLError, match="do not split into 4 groups"):
        _ = bad_groups.graph

    x, rw = torch.randn(3, 8), torch.randn(4, 8)
    w13, w2 = torch.randn(4, 10, 8), torch.randn(5, 8, 5)
    with pytest.raises(dsl.DSLError, match="E=5, but E=4"):
        compile_op(layer, backend="torch")(x, rw, w13, w2)
    with pytest.raises(dsl.DSLError, match="H2=10 but 2\\*H=8"):
        compile_op(layer, backend="torch")(x, rw, w13, torch.randn(4, 8, 4))


def loop_grouped(x, w, ids, transpose_w=False):
    T, k = ids.shape
    out = torch.zeros(T, k, w.shape[2] if transpose_w else w.shape[1], dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            if 0 <= e < w.shape[0]:
                row = x[t, j] if x.dim() == 3 else x[t]
                out[t, j] = row.double() @ (w[e].double() if transpose_w else w[e].double().T)
    return out


@dsl.op
def gm_slot(x: Tn["T", "S", "K"], w: Tn["E", "N", "K"], ids: Tn["T", "S", dsl.i32]):
    return moe.grouped_matmul(x, w, ids)


@dsl.op
def gm_slot_t(x: Tn["T", "S", "K"], w: Tn["E", "K", "N"], ids: Tn["T", "S", dsl.i32]):
    return moe.grouped_matmul(x, w, ids, transpose_w=True)


@dsl.op
def gm_token(x: Tn["T", "K"], w: Tn["E", "N", "K"], ids: Tn["T", "S", dsl.i32]):
    return moe.grouped_matmul(x, w, ids)


@pytest.mark.parametrize("per_slot,transpose_w", [(False, False), (True, True), (True, False)])
def test_grouped_matmul_and_dw_reference_and_grads(per_slot, transpose_w):
    g = torch.Generator().manual_seed(0)
    T, S, K, N, E = 9, 3, 7, 5, 4
    x = torch.randn(T, S, K, generator=g) if per_slot else torch.randn(T, K, generator=g)
    w = torch.randn(E, K, N, generator=g) if transpose_w else torch.randn(E, N, K, generator=g)
    ids = torch.randint(-1, E + 1, (T, S), generator=g, dtype=torch.int32)   # includes no-expert ids
    x.requires_grad_()
    w.requires_grad_()
    op = gm_token if not per_slot else gm_slot_t if transpose_w else gm_slot
    y = compile_op(op, backend="torch")(x, w, ids)
    want = loop_grouped(x, w, ids, transpose_w)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-6)
    ct = torch.randn(T, S, N, dtype=torch.float64)
    got = torch.autograd.grad((y.double() * ct).sum(), (x, w))
    exp = torch.autograd.grad((want * ct).sum(), (x, w))
    for a, b in zip(got, exp):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)


def test_combine_and_weighted_combine_matmul_grads():
    @dsl.op
    def comb(y: Tn["T", "S", "N"], weights: Tn["T", "S"]):
        return moe.combine(y, weights)

    @dsl.op
    def gmc(h: Tn["T", "S", "K"], w: Tn["E", "N", "K"], weights: Tn["T", "S"], ids: Tn["T", "S", dsl.i32]):
        return moe.grouped_matmul_combine(h, w, ids, weights)

    g = torch.Generator().manual_seed(1)
    T, S, K, N, E = 8, 2, 6, 5, 3
    y = torch.randn(T, S, N, generator=g, requires_grad=True)
    wts = torch.rand(T, S, generator=g, requires_grad=True)
    out = compile_op(comb, backend="torch")(y, wts)
    want = (y * wts[..., None]).sum(1)
    torch.testing.assert_close(out, want)
    got = torch.autograd.grad(out.pow(2).sum(), (y, wts))
    exp = torch.autograd.grad(want.pow(2).sum(), (y, wts))
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b)

    h = torch.randn(T, S, K, generator=g, requires_grad=True)
    w = torch.randn(E, N, K, generator=g, requires_grad=True)
    ids = torch.randint(0, E, (T, S), generator=g, dtype=torch.int32)
    out = compile_op(gmc, backend="torch")(h, w, wts, ids)
    want = (loop_grouped(h, w, ids) * wts.double()[..., None]).sum(1)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(out.double().pow(2).sum(), (h, w, wts))
    exp = torch.autograd.grad(want.pow(2).sum(), (h, w, wts))
    for a, b in zip(got, exp):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 6), n=st.integers(1, 12), data=st.data())
def test_topk_matches_torch_and_breaks_ties_low(rows, n, data):
    k = data.draw(st.integers(1, n))
    values = data.draw(st.lists(st.integers(-3, 3), min_size=rows * n, max_size=rows * n))
    x = torch.tensor(values, dtype=torch.float32).reshape(rows, n)

    @dsl.op
    def tk(x: Tn["R", "C"], *, k: int = 1):
        return moe.topk(x, k)

    vals, idx = compile_op(tk, backend="torch")(x, k=k)
    want = torch.sort(x, dim=-1, descending=True, stable=True)
    assert torch.equal(vals, want.values[:, :k]) and torch.equal(idx.long(), want.indices[:, :k])


def test_route_bias_selects_only_and_grouped_topk():
    @dsl.op
    def r(logits: Tn["T", "E"], bias: Tn["E", dsl.f32], *, gate: str = "softmax", groups: int = 1):
        return moe.route(logits, 2, gate=gate, bias=bias, n_groups=groups, topk_groups=1)

    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0]], requires_grad=True)
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0, 5.0])
    f = compile_op(r, backend="torch")
    w, ids = f(logits, bias)
    assert ids.tolist() == [[4, 5]]                         # the bias picked experts 4 and 5 ...
    s = torch.softmax(logits.detach(), -1)[0, 4:]
    torch.testing.assert_close(w[0], s / s.sum())           # ... weighted by their unbiased scores
    w.sum().backward()
    assert logits.grad is not None
    w, ids = f(logits, torch.zeros(6), gate="sigmoid", groups=3)
    assert ids.tolist() == [[0, 1]]                          # best group first: experts {0, 1}
    w, ids = f(logits, torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 9.0]), groups=3)
    assert ids.tolist() == [[5, 4]]                          # group {4, 5} won through expert 5


def test_moe_ffn_reference_matches_loop():
    g = torch.Generator().manual_seed(2)
    T, D, H, E = 17, 12, 10, 4
    x, rw = torch.randn(T, D, generator=g), torch.randn(E, D, generator=g)
    w13, w2 = torch.randn(E, 2 * H, D, generator=g), torch.randn(E, D, H, generator=g)
    y = layer(x, rw, w13, w2, k=2)
    p = torch.softmax(x @ rw.T, -1)
    top, ids = p.topk(2, -1)
    top = top / top.sum(-1, keepdim=True)
    want = torch.zeros(T, D)
    for t in range(T):
        for j in range(2):
            e = ids[t, j]
            h = F.silu(w13[e, :H] @ x[t]) * (w13[e, H:] @ x[t])
            want[t] += top[t, j] * (w2[e] @ h)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
