"""runtime.ops.moe and runtime.nn.MoE on the torch backend (the big grid; the kernels are checked
under Triton's interpreter in tests/codegen/test_moe_kernels.py), against a per-expert loop
written here independently of dsl.moe."""

import pytest
import torch
import torch.nn.functional as F

import dsl
from runtime.nn.moe import MoE
from runtime.ops import moe_ops


def loop_moe(x, router_weight, w13, w2, top_k, router="softmax", bias=None, renormalize=True):
    """Mixtral-style per-expert loop in fp64: the oracle."""
    x64 = x.double()
    logits = x64 @ router_weight.double().T
    scores = torch.softmax(logits, -1) if router == "softmax" else torch.sigmoid(logits)
    select = scores if bias is None else scores + bias.double()
    ids = torch.topk(select, top_k, dim=-1).indices
    weights = scores.gather(-1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    hidden = w2.shape[-1]
    y = torch.zeros_like(x64)
    for e in range(w13.shape[0]):
        tok, slot = torch.where(ids == e)
        if len(tok) == 0:
            continue
        gate_up = x64[tok] @ w13[e].double().T
        h = F.silu(gate_up[:, :hidden]) * gate_up[:, hidden:]
        y = y.index_add(0, tok, (h @ w2[e].double().T) * weights[tok, slot, None])
    return y, ids


def make(T, D, H, E, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) / 10).to(dtype)  # noqa: E731
    return r(T, D), r(E, D), r(E, 2 * H, D), r(E, D, H)


GRID = [  # (T, E, k): token counts 0..1000, experts 1..64, top-k 1..6
    (0, 8, 2), (1, 1, 1), (1, 64, 6), (33, 8, 2), (33, 64, 6), (222, 8, 1), (222, 64, 2),
    (1000, 8, 2), (1000, 64, 6),
]


@pytest.mark.parametrize("T,E,k", GRID)
def test_forward_and_grads_match_loop(T, E, k):
    D, H = 51, 37
    x, rw, w13, w2 = (t.requires_grad_() for t in make(T, D, H, E))
    y = moe_ops.moe(x, rw, w13, w2, k, backend="torch")
    want, _ = loop_moe(x, rw, w13, w2, k)
    assert y.shape == (T, D)
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-7)
    if T == 0:
        return
    ct = torch.randn(T, D, dtype=torch.float64)
    grads = torch.autograd.grad((y.double() * ct).sum(), (x, rw, w13, w2))
    wants = torch.autograd.grad((want * ct).sum(), (x, rw, w13, w2))
    for name, g, w in zip(("x", "router", "w13", "w2"), grads, wants):
        # top-1 with renormalised weights: the router gradient is exactly 0 (fp noise in the oracle)
        assert (g.double() - w).abs().max().item() <= 1e-4 * w.abs().max().item() + 1e-12, name


def test_all_tokens_to_one_expert_and_idle_experts():
    T, D, H, E = 64, 24, 20, 8
    x, rw, w13, w2 = make(T, D, H, E)
    rw = torch.zeros(E, D)
    rw[5] = 1.0                                  # expert 5 wins for every token with x.sum() > 0
    x = x.abs() + 0.01
    for t in (x, rw, w13, w2):
        t.requires_grad_()
    y, _, ids = moe_ops.moe(x, rw, w13, w2, 1, backend="torch", return_routing=True)
    assert (ids == 5).all()
    want, _ = loop_moe(x, rw, w13, w2, 1)
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-7)
    gw13, gw2 = torch.autograd.grad(y.sum(), (w13, w2))
    idle = [e for e in range(E) if e != 5]
    assert gw13[idle].abs().max() == 0 and gw2[idle].abs().max() == 0
    assert gw13[5].abs().max() > 0


def test_fp16_matches_within_peer_tolerance():
    x, rw, w13, w2 = make(222, 64, 48, 8, dtype=torch.float16)
    y = moe_ops.moe(x, rw, w13, w2, 2, backend="torch")
    want, _ = loop_moe(x, rw, w13, w2, 2)
    assert y.dtype == torch.float16
    assert (y.double() - want).abs().max().item() <= 2e-2


@pytest.mark.parametrize("router,renormalize", [("sigmoid", True), ("sigmoid", False), ("softmax", False)])
def test_router_variants_and_selection_bias(router, renormalize):
    T, D, H, E, k = 40, 16, 12, 8, 3
    x, rw, w13, w2 = make(T, D, H, E)
    bias = torch.linspace(-0.5, 0.5, E)          # large enough to change the selection
    y, _, ids = moe_ops.moe(x, rw, w13, w2, k, router=router, bias=bias, renormalize=renormalize,
                            backend="torch", return_routing=True)
    want, want_ids = loop_moe(x, rw, w13, w2, k, router=router, bias=bias, renormalize=renormalize)
    assert torch.equal(ids.long().sort(-1).values, want_ids.sort(-1).values)
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-7)
    unbiased = moe_ops.moe(x, rw, w13, w2, k, router=router, renormalize=renormalize, backend="torch",
                           return_routing=True)[2]
    assert not torch.equal(unbiased, ids)        # the bias did steer the selection


def test_leading_dims_and_experts_op():
    x, rw, w13, w2 = make(30, 16, 12, 4)
    y = moe_ops.moe(x.reshape(2, 3, 5, 16), rw, w13, w2, 2, backend="torch")
    assert y.shape == (2, 3, 5, 16)
    torch.testing.assert_close(y.reshape(30, 16), moe_ops.moe(x, rw, w13, w2, 2, backend="torch"))
    weights, ids = moe_ops.route(x @ rw.T, 2, backend="torch")
    ids = ids.clone()
    ids[0, 1] = -1                                # a slot with no expert contributes nothing
    out = moe_ops.moe_experts(x, w13, w2, weights, ids, backend="torch")
    ids[0, 1] = ids[0, 0]
    w0 = weights.clone()
    w0[0, 1] = 0.0
    torch.testing.assert_close(out, moe_ops.moe_experts(x, w13, w2, w0, ids, backend="torch"))


def test_int64_offsets_on_the_torch_backend():
    # Expert weights whose element offsets pass 2**31 (a zero-stride view: 2048 experts sharing one
    # expert's storage), tokens routed to the last experts.
    E, D, H, T = 2048, 1024, 544, 8
    g = torch.Generator().manual_seed(1)
    base13 = torch.randn(1, 2 * H, D, generator=g) / 30
    base2 = torch.randn(1, D, H, generator=g) / 30
    w13, w2 = base13.expand(E, -1, -1), base2.expand(E, -1, -1)
    assert w13.numel() > 2 ** 31
    x = torch.randn(T, D, generator=g) / 10
    ids = torch.tensor([[E - 1, E - 2]] * T, dtype=torch.int32)
    weights = torch.full((T, 2), 0.5)
    y = moe_ops.moe_experts(x, w13, w2, weights, ids, backend="torch")
    gu = x.double() @ base13[0].double().T
    want = (F.silu(gu[:, :H]) * gu[:, H:]) @ base2[0].double().T
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-6)


def test_bad_inputs_raise_dsl_errors():
    x, rw, w13, w2 = make(8, 16, 12, 4)
    with pytest.raises(dsl.DSLError, match="E"):
        moe_ops.moe(x, rw, w13[:3], w2, 2, backend="torch")          # E differs between weights
    with pytest.raises(dsl.DSLError, match="top_k 5 is larger than the number of experts 4"):
        moe_ops.moe(x, rw, w13, w2, 5, backend="torch")
    with pytest.raises(dsl.DSLError, match="one dtype"):
        moe_ops.moe(x.half(), rw, w13, w2, 2, backend="torch")
    with pytest.raises(dsl.DSLError, match="2 \\* the expert hidden size|H2"):
        moe_ops.moe(x, rw, w13[:, :-1], w2, 2, backend="torch")      # w13 rows != 2 * hidden
    with pytest.raises(dsl.DSLError):
        moe_ops.moe(x, rw, w13, w2, 2, bias=torch.zeros(4, dtype=torch.float16), backend="torch")
    with pytest.raises(dsl.DSLError, match="router"):
        moe_ops.moe(x, rw, w13, w2, 2, router="relu", backend="torch")
    weights, ids = moe_ops.route(x @ rw.T, 2, backend="torch")
    with pytest.raises(dsl.DSLError, match="int32 or int64"):
        moe_ops.moe_experts(x, w13, w2, weights, ids.float(), backend="torch")


# -- runtime.nn.MoE ---------------------------------------------------------------------------


@pytest.mark.parametrize("balance", ["none", "micro", "global", "aux_free", "bip", "seq"])
def test_module_balance_methods(balance):
    torch.manual_seed(0)
    moe = MoE(24, 16, 8, 2, balance=balance, router="sigmoid" if balance == "aux_free" else "softmax")
    x = torch.randn(2, 9, 24)
    y = moe(x)
    assert y.shape == x.shape
    assert moe.last_load.sum().item() == 2 * 9 * 2 and moe.last_load.shape == (8,)
    loss = moe.balance_loss
    assert loss.dim() == 0
    if balance in ("micro", "global", "seq"):
        assert loss.item() > 0
        (y.sum() + loss).backward()
        assert moe.router.weight.grad.abs().sum() > 0
    else:
        assert loss.item() == 0
        y.sum().backward()
    moe.step()
    if balance == "aux_free":
        assert moe.balancer.bias.abs().sum() > 0   # the bias moved after the step


def test_module_matches_loop_and_shared_expert():
    torch.manual_seed(0)
    moe = MoE(24, 16, 8, 2, shared_expert=12, shared_gate=True, backend="torch")
    x = torch.randn(5, 24)
    y = moe(x)
    want, _ = loop_moe(x, moe.router.weight, moe.w13, moe.w2, 2)
    s = moe.shared_expert
    shared = (F.silu(x @ s.gate_proj.weight.T) * (x @ s.up_proj.weight.T)) @ s.down_proj.weight.T
    shared = torch.sigmoid(x @ s.gate.weight.T) * shared
    torch.testing.assert_close(y, (want + shared.double()).float(), rtol=1e-4, atol=1e-6)
    assert moe.router.weight.shape == (8, 24) and moe.w13.shape == (8, 32, 24) and moe.w2.shape == (8, 24, 16)


def test_module_grouped_topk_and_bad_config():
    moe = MoE(16, 8, 8, 2, n_groups=4, topk_groups=2, group_score="top2", router="sigmoid")
    y = moe(torch.randn(6, 16))
    assert y.shape == (6, 16)
    with pytest.raises(dsl.DSLError):
        MoE(16, 8, 4, 5)
    with pytest.raises(dsl.DSLError):
        MoE(16, 8, 4, 2, balance="magic")


def test_expert_parallel_hook_receives_routing():
    torch.manual_seed(0)
    moe = MoE(16, 8, 4, 2, backend="torch")
    x = torch.randn(7, 16)
    want = moe(x)
    seen = {}

    def hook(x2, ids, weights, w13, w2):
        seen["ids"] = ids
        return moe_ops.moe_experts(x2, w13, w2, weights, ids, backend="torch")

    moe.set_expert_parallel(hook, range(4))
    torch.testing.assert_close(moe(x), want)
    assert seen["ids"].shape == (7, 2) and seen["ids"].dtype == torch.int64
    with pytest.raises(dsl.DSLError, match="local_experts"):
        moe.set_expert_parallel(hook, range(2))


def _ep_worker(rank, world):
    torch.manual_seed(0)                       # the same full weights on every rank
    moe = MoE(16, 8, 4, 2, backend="torch")
    x = torch.randn(6 + rank, 16, generator=torch.Generator().manual_seed(10 + rank))
    want = moe(x).detach()
    moe.use_expert_parallel()                  # experts sharded 2 per rank, all-to-all dispatch
    y = moe(x)
    y.sum().backward()
    return {"err": (y - want).abs().max().item(), "local": list(moe.local_experts),
            "w13": tuple(moe.w13.shape), "grad": moe.w13.grad is not None, "load": moe.last_load.tolist()}


def test_use_expert_parallel_all_to_all_matches_local():
    from runtime.parallel.local import run_local_group

    results = run_local_group(_ep_worker, 2)
    assert [r["local"] for r in results] == [[0, 1], [2, 3]]
    for r in results:
        assert r["err"] < 1e-5 and r["w13"] == (2, 16, 16) and r["grad"]
