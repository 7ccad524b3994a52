"""The MoE kernels under Triton's interpreter (few, small cases: the interpreter runs every program
in numpy) against per-expert loops written here, plus alignment, int64 offsets, spaces and buckets."""

import os

import pytest
import torch
import torch.nn.functional as F

import runtime  # noqa: F401, I001  (selects the interpreter on a CUDA-less machine before triton loads)
from runtime.compiler import compile as compile_op
import triton
import triton.language as tl
import codegen.kernels.moe as K
import dsl
from autotune.devices import get_device
from codegen.render import load_module
from dsl import moe
from runtime.ops import moe_ops

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs a GPU or Triton's interpreter")

# Large tiles: the interpreter's cost is per program, not per element.
CONFIGS = {
    "moe_gemm": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=1),
    "moe_wgrad": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=1),
    "moe_route": dict(BLOCK_R=64, num_warps=4),
    "moe_combine": dict(BLOCK_T=32, BLOCK_N=128, num_warps=4),
    "gemm": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=1),
    "reduction": dict(BLOCK_R=32, BLOCK_C=128, num_warps=4),
    "pointwise": dict(BLOCK=4096, num_warps=4),
}


def loop_moe(x, rw, w13, w2, k, router="softmax", bias=None):
    x64 = x.double()
    logits = x64 @ rw.double().T
    scores = torch.softmax(logits, -1) if router == "softmax" else torch.sigmoid(logits)
    ids = torch.topk(scores if bias is None else scores + bias.double(), k, -1).indices
    weights = scores.gather(-1, ids)
    weights = weights / weights.sum(-1, keepdim=True)
    hidden = w2.shape[-1]
    y = torch.zeros_like(x64)
    for e in range(w13.shape[0]):
        tok, slot = torch.where(ids == e)
        if len(tok):
            gu = x64[tok] @ w13[e].double().T
            y = y.index_add(0, tok, (F.silu(gu[:, :hidden]) * gu[:, hidden:]) @ w2[e].double().T
                            * weights[tok, slot, None])
    return y


def make(T, D, H, E, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) / 10).to(dtype)  # noqa: E731
    return r(T, D), r(E, D), r(E, 2 * H, D), r(E, D, H)


def rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


# K = D = 51 and N = H = 37: multiples of no block size.
@pytest.mark.parametrize("T,E,k", [(33, 8, 2), (1, 1, 1), (5, 64, 6)])
def test_moe_forward_and_all_grads_fp32(T, E, k):
    D, H = 51, 37
    x, rw, w13, w2 = (t.requires_grad_() for t in make(T, D, H, E))
    f = moe_ops.compiled(moe_ops.moe_op, "triton", CONFIGS)
    y, _logits, _ids = f(x, rw, w13, w2, top_k=k, router="softmax", renormalize=True, n_groups=1,
                       topk_groups=1, group_score="max")
    want = loop_moe(x, rw, w13, w2, k)
    assert rel_err(y, want) <= 1e-4
    ct = torch.randn(T, D, dtype=torch.float64)
    grads = torch.autograd.grad((y.double() * ct).sum(), (x, rw, w13, w2))
    wants = torch.autograd.grad((want * ct).sum(), (x, rw, w13, w2))
    for name, g, w in zip(("x", "router", "w13", "w2"), grads, wants):
        if w.abs().max() < 1e-12:      # top-1 renormalised: no router gradient at all
            assert g.abs().max() < 1e-9, name
        else:
            assert rel_err(g, w) <= 1e-4, name
    templates = [kk.template for kk in f.kernels_for(x, rw, w13, w2, top_k=k)]
    assert templates.count("moe_gemm") == 2 and "moe_route" in templates


def test_moe_fp16_and_all_tokens_to_one_expert():
    T, D, H, E = 48, 51, 37, 8
    x, rw, w13, w2 = make(T, D, H, E, dtype=torch.float16)
    rw = torch.zeros(E, D, dtype=torch.float16)
    rw[3] = 1.0
    x = x.abs() + 0.01                     # expert 3 wins everywhere; the other 7 get no tokens
    y, _, ids = moe_ops.moe(x, rw, w13, w2, 1, backend="triton", return_routing=True, configs=CONFIGS)
    assert (ids == 3).all() and y.dtype == torch.float16
    assert (y.double() - loop_moe(x, rw, w13, w2, 1)).abs().max().item() <= 2e-2
    rw2 = make(T, D, H, E, dtype=torch.float16, seed=1)[1]
    for t in (x, rw2, w13, w2):
        t.requires_grad_()
    y2 = moe_ops.moe(x, rw2, w13, w2, 2, backend="triton", configs=CONFIGS)
    want = loop_moe(x, rw2, w13, w2, 2)
    assert (y2.double() - want).abs().max().item() <= 2e-2
    ct = torch.randn(T, D, dtype=torch.float64)
    grads = torch.autograd.grad((y2.double() * ct).sum(), (x, rw2, w13, w2))
    wants = torch.autograd.grad((want * ct).sum(), (x, rw2, w13, w2))
    for name, g, w in zip(("x", "router", "w13", "w2"), grads, wants):
        assert g.dtype == torch.float16, name
        assert (g.double() - w).abs().max().item() <= 2e-2 * max(1.0, w.abs().max().item()), name
        assert rel_err(g, w) <= 2e-2, name      # and relative to the gradient's own scale


@pytest.mark.gpu
@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (222, 64, 6), (4096, 8, 2)])
def test_moe_bf16_on_gpu(T, E, k):
    D, H = 511, 352
    x, rw, w13, w2 = (t.cuda().requires_grad_() for t in make(T, D, H, E, dtype=torch.bfloat16))
    y = moe_ops.moe(x, rw, w13, w2, k, backend="triton")
    want = loop_moe(x, rw, w13, w2, k)
    assert (y.double() - want).abs().max().item() <= 2e-2
    ct = torch.randn(T, D, dtype=torch.float64, device="cuda")
    grads = torch.autograd.grad((y.double() * ct).sum(), (x, rw, w13, w2))
    wants = torch.autograd.grad((want * ct).sum(), (x, rw, w13, w2))
    for name, g, w in zip(("x", "router", "w13", "w2"), grads, wants):
        assert rel_err(g, w) <= 3e-2, name


def test_zero_tokens():
    x, rw, w13, w2 = make(0, 51, 37, 8)
    y = moe_ops.moe(x, rw, w13, w2, 2, backend="triton", configs=CONFIGS)
    assert y.shape == (0, 51)


def test_primitives_with_fused_epilogues_and_transposed_weights():
    @dsl.op
    def prims(x: dsl.Tensor["T", "K"], w: dsl.Tensor["E", "N", "K"], wt: dsl.Tensor["E", "K", "N"],
              b: dsl.Tensor["N"], weights: dsl.Tensor["T", "S"], ids: dsl.Tensor["T", "S", dsl.i32]):
        y = moe.grouped_matmul(x, w, ids) * 0.5 + b          # plain mode, epilogue fused
        z = moe.grouped_matmul(x, wt, ids, transpose_w=True)
        return moe.combine(y + z, weights), moe.topk(moe.combine(z, weights), 3)[0]

    T, Kd, N, E, S = 21, 19, 23, 5, 2
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(T, Kd, generator=g) / 10).requires_grad_()
    w = (torch.randn(E, N, Kd, generator=g) / 10).requires_grad_()
    wt = (torch.randn(E, Kd, N, generator=g) / 10).requires_grad_()
    b = (torch.randn(N, generator=g) / 10).requires_grad_()
    weights = torch.rand(T, S, generator=g).requires_grad_()
    ids = torch.randint(0, E, (T, S), generator=g, dtype=torch.int32)
    ids[0, 0] = -1                                           # no expert: zero row
    f = dsl_compile(prims)
    out, top = f(x, w, wt, b, weights, ids)

    ym = torch.zeros(T, S, N, dtype=torch.float64)
    zm = torch.zeros(T, S, N, dtype=torch.float64)
    for t in range(T):
        for j in range(S):
            e = int(ids[t, j])
            if 0 <= e < E:
                ym[t, j] = x[t].double() @ w[e].double().T
                zm[t, j] = x[t].double() @ wt[e].double()
    ym = ym * 0.5 + b.double()
    want = ((ym + zm) * weights.double()[..., None]).sum(1)
    want_top = torch.topk((zm * weights.double()[..., None]).sum(1), 3, -1).values
    assert rel_err(out, want) <= 1e-4 and rel_err(top, want_top) <= 1e-4
    ct = torch.randn(T, N, dtype=torch.float64)
    got = torch.autograd.grad((out.double() * ct).sum() + top.sum(), (x, w, wt, b, weights))
    exp = torch.autograd.grad((want * ct).sum() + want_top.sum(), (x, w, wt, b, weights))
    for name, a, e in zip(("x", "w", "wt", "b", "weights"), got, exp):
        assert rel_err(a, e) <= 1e-4, name
    assert any(k.template == "moe_combine" for k in f.kernels_for(x, w, wt, b, weights, ids))


def dsl_compile(op):
    return compile_op(op, backend="triton", configs=CONFIGS)


@pytest.mark.parametrize("gate,groups,score", [("softmax", 1, "max"), ("sigmoid", 4, "top2")])
def test_route_kernel_and_backward(gate, groups, score):
    T, E, k = 37, 16, 4
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(T, E, generator=g).requires_grad_()
    bias = torch.linspace(-0.3, 0.3, E)
    kw = dict(router=gate, n_groups=groups, topk_groups=min(2, groups), group_score=score, renormalize=True)
    w, ids = dsl_compile(moe_ops.route_bias_op)(logits, bias, top_k=k, **kw)
    # independent oracle
    s = torch.softmax(logits.double(), -1) if gate == "softmax" else torch.sigmoid(logits.double())
    sel = s + bias.double()
    if groups > 1:
        grp = sel.reshape(T, groups, E // groups)
        gscore = grp.topk(2, -1).values.sum(-1) if score == "top2" else grp.amax(-1)
        keep = torch.zeros_like(gscore, dtype=torch.bool).scatter(1, gscore.topk(2, -1).indices, True)
        sel = sel.masked_fill(~keep.repeat_interleave(E // groups, 1), float("-inf"))
    want_ids = sel.topk(k, -1).indices
    want_w = s.gather(1, want_ids)
    want_w = want_w / want_w.sum(-1, keepdim=True)
    assert torch.equal(ids.long(), want_ids)
    assert rel_err(w, want_w) <= 1e-5
    ct = torch.randn(T, k, dtype=torch.float64)
    (gl,) = torch.autograd.grad((w.double() * ct).sum(), logits)
    (want_gl,) = torch.autograd.grad((want_w * ct).sum(), logits)
    assert rel_err(gl, want_gl) <= 1e-4


def test_align_kernel_layout():
    mod = K.align_module()
    g = torch.Generator().manual_seed(0)
    for T, k, E, bm in [(0, 2, 4, 16), (33, 2, 8, 16), (222, 6, 64, 32), (40, 2, 8, 16)]:
        ids = torch.randint(0, E, (T, k), generator=g, dtype=torch.int32)
        if T == 40:
            ids[:] = 3
            ids[0, 0], ids[1, 1] = -1, E             # slots with no expert go to group E
        a = mod.align(ids, E, bm)
        flat = ids.reshape(-1).long()
        grp = torch.where((flat >= 0) & (flat < E), flat, E)
        counts = torch.bincount(grp, minlength=E + 1)
        padded = (counts + bm - 1) // bm * bm
        starts = torch.cumsum(padded, 0) - padded
        assert a.starts[:E + 1].tolist() == starts.tolist() and a.starts[E + 1] == padded.sum()
        for e in range(E + 1):
            seg = a.sorted_slots[starts[e]:starts[e] + padded[e]]
            assert seg[:counts[e]].tolist() == [s for s in range(T * k) if grp[s] == e]   # stable
            assert (seg[counts[e]:] == T * k).all()                                       # padding
            assert (a.block_expert[starts[e] // bm:(starts[e] + padded[e]) // bm] == e).all()


_slot_offset = None   # the generated module's moe_slot_offset, set by the test below


@triton.jit
def _offset_probe(slots_ptr, out_ptr, TOPK, s_t, s_j, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    slots = tl.load(slots_ptr + i)                  # int32, as in the aligned index list
    tl.store(out_ptr + i, _slot_offset(slots, TOPK, s_t, s_j))


def test_int64_offsets_in_rendered_source_and_helper():
    global _slot_offset
    f = moe_ops.compiled(moe_ops.moe_op, "triton", CONFIGS)
    sources = [k.source for k in f.kernels if k.template == "moe_gemm"]
    for src in sources:
        assert "slots = tl.load(sorted_ptr + offs).to(tl.int64)" in src
        assert "slots = slots.to(tl.int64)" in src           # inside moe_slot_offset
        assert "tl.minimum(expert, E - 1) * w_se" in src and "expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)" in src
    _slot_offset = load_module(sources[0], "moe_offset_probe").moe_slot_offset

    slots = torch.tensor([0, 1, 70001, 2 ** 31 - 2], dtype=torch.int32)
    out = torch.zeros(4, dtype=torch.int64)
    _offset_probe[(1,)](slots, out, 2, 40000, 7, BLOCK=4)
    want = [(s // 2) * 40000 + (s % 2) * 7 for s in slots.tolist()]
    assert out.tolist() == want and max(want) > 2 ** 31


def test_token_buckets_and_spaces():
    ladder = [K.token_bucket(n) for n in range(1, 5000)]
    assert all(b >= n for n, b in zip(range(1, 5000), ladder))
    values = sorted(set(ladder))
    assert values[:8] == [1, 2, 3, 4, 6, 8, 12, 16]
    # never snaps across a large gap (1 -> 2 is the only step above 1.5x among integers)
    assert all(b / a <= 1.5 for a, b in zip(values[1:], values[2:]))
    h100 = get_device("h100")
    shape = {"M": 4096, "E": 64, "N": 1408, "K": 2048, "topk": 6, "dtype_bits": 16, "w_tiles": 2}
    feasible = list(K.GEMM_SPACE.enumerate(shape, h100))
    assert feasible and K.GEMM_SPACE.default in [dict(c) for c in feasible]
    small = dict(shape, M=8)                                           # 8 * 6 / 64 rows per expert
    assert all(c["BLOCK_M"] <= 16 for c in K.GEMM_SPACE.enumerate(small, h100))
    big = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 5}
    assert "shared_memory" in K.GEMM_SPACE.violations(big, shape, h100)
    f = moe_ops.compiled(moe_ops.moe_op, "triton", CONFIGS)
    x, rw, w13, w2 = make(300, 51, 37, 8)
    rows = f.explain(x, rw, w13, w2, top_k=2)
    gemm_rows = [r for r in rows if r.template == "moe_gemm"]
    assert [r.problem["M"] for r in gemm_rows] == [384, 384]
    assert {r.problem["w_tiles"] for r in gemm_rows} == {1, 2}
    assert all(v >= 1 for r in rows for v in r.problem.values())     # valid tuning-record keys
    assert gemm_rows[0].problem["topk"] == 2 and gemm_rows[0].problem["E"] == 8
