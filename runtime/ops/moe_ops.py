"""The routed-experts ops exported as ``runtime.ops.moe``, ``moe_experts`` and ``route`` (the module
is named moe_ops so it never shadows the ``moe`` function): the whole MoE FFN (the first grouped GEMM
with SwiGLU in its epilogue, the second with the routing weight and the combine in its epilogue),
the experts alone (for expert parallelism) and routing alone.

The triton backend runs kdsl's kernels (codegen/kernels/moe.py) on CUDA tensors, or on CPU tensors
under Triton's interpreter when forced; the torch backend runs the reference semantics (sorted by
expert, one matmul per expert). Both are differentiable in every floating-point input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import codegen.kernels.moe  # noqa: F401  (registers the MoE kernel templates)
import dsl
from dsl import moe as M
from dsl.errors import DSLError

from ..compiler import compile

T = dsl.Tensor


@dsl.op
def moe_op(x: T["T", "D"], router_weight: T["E", "D"], w13: T["E", "H2", "D"], w2: T["E", "D", "H"], *,
           top_k: int = 2, router: str = "softmax", renormalize: bool = True, n_groups: int = 1,
           topk_groups: int = 1, group_score: str = "max"):
    """(y [T, D], router logits [T, E], expert ids [T, k])."""
    logits = x @ router_weight.T
    weights, ids = M.route(logits, top_k, gate=router, n_groups=n_groups, topk_groups=topk_groups,
                           group_score=group_score, renormalize=renormalize)
    return M.moe_ffn(x, w13, w2, weights, ids), logits, ids


@dsl.op
def moe_bias_op(x: T["T", "D"], router_weight: T["E", "D"], w13: T["E", "H2", "D"], w2: T["E", "D", "H"],
                bias: T["E", dsl.f32], *, top_k: int = 2, router: str = "softmax", renormalize: bool = True,
                n_groups: int = 1, topk_groups: int = 1, group_score: str = "max"):
    """As moe_op, with a per-expert selection bias (selection only: auxiliary-loss-free balancing)."""
    logits = x @ router_weight.T
    weights, ids = M.route(logits, top_k, gate=router, bias=bias, n_groups=n_groups, topk_groups=topk_groups,
                           group_score=group_score, renormalize=renormalize)
    return M.moe_ffn(x, w13, w2, weights, ids), logits, ids


@dsl.op
def moe_experts_op(x: T["T", "D"], w13: T["E", "H2", "D"], w2: T["E", "D", "H"], weights: T["T", "K"],
                   ids: T["T", "K"]):
    """The SwiGLU experts given routing: y [T, D] = sum_j weights[t, j] * FFN_{ids[t, j]}(x[t])."""
    return M.moe_ffn(x, w13, w2, weights, ids)


@dsl.op
def route_op(logits: T["T", "E"], *, top_k: int = 2, router: str = "softmax", renormalize: bool = True,
             n_groups: int = 1, topk_groups: int = 1, group_score: str = "max"):
    return M.route(logits, top_k, gate=router, n_groups=n_groups, topk_groups=topk_groups,
                   group_score=group_score, renormalize=renormalize)


@dsl.op
def route_bias_op(logits: T["T", "E"], bias: T["E", dsl.f32], *, top_k: int = 2, router: str = "softmax",
                  renormalize: bool = True, n_groups: int = 1, topk_groups: int = 1, group_score: str = "max"):
    return M.route(logits, top_k, gate=router, bias=bias, n_groups=n_groups, topk_groups=topk_groups,
                   group_score=group_score, renormalize=renormalize)


_compiled: dict[tuple, object] = {}


def compiled(op, backend: str = "auto", configs: dict | None = None):
    """The CompiledOp of one of this module's ops for a backend (cached)."""
    key = (op.name, backend, repr(sorted((configs or {}).items())))
    if key not in _compiled:
        _compiled[key] = compile(op, backend=backend, configs=configs)
    return _compiled[key]


def _statics(top_k, router, renormalize, n_groups, topk_groups, group_score, num_experts):
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise DSLError(f"top_k must be a positive int, got {top_k!r}", op="moe")
    if top_k > num_experts:
        raise DSLError(f"top_k {top_k} is larger than the number of experts {num_experts}", op="moe")
    if router not in M.GATES:
        raise DSLError(f"router must be one of {', '.join(M.GATES)}, got {router!r}", op="moe")
    return dict(top_k=top_k, router=router, renormalize=bool(renormalize), n_groups=n_groups,
                topk_groups=topk_groups, group_score=group_score)


def moe(x: torch.Tensor, router_weight: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int, *,
        router: str = "softmax", bias: torch.Tensor | None = None, renormalize: bool = True, n_groups: int = 1,
        topk_groups: int = 1, group_score: str = "max", backend: str = "auto", return_routing: bool = False,
        configs: dict | None = None):
    """A routed SwiGLU MoE layer: y of x's shape.

    x [..., D]; router_weight [E, D]; w13 [E, 2H, D] (gate rows first, then up); w2 [E, D, H].
    router: "softmax" or "sigmoid" scores; bias [E] (fp32) steers selection only; renormalize
    divides the selected weights by their sum; n_groups/topk_groups/group_score: grouped top-k
    (see dsl.moe.route). With return_routing, returns (y, logits [..., E], ids [..., k] int32).
    """
    if x.dim() < 1:
        raise DSLError("moe: x must have a feature dim", op="moe")
    statics = _statics(top_k, router, renormalize, n_groups, topk_groups, group_score, router_weight.shape[0])
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if bias is None:
        y, logits, ids = compiled(moe_op, backend, configs)(x2, router_weight, w13, w2, **statics)
    else:
        y, logits, ids = compiled(moe_bias_op, backend, configs)(x2, router_weight, w13, w2, bias, **statics)
    y = y.reshape(*lead, y.shape[-1])
    if return_routing:
        return y, logits.reshape(*lead, logits.shape[-1]), ids.reshape(*lead, ids.shape[-1])
    return y


def moe_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, *,
                backend: str = "auto", configs: dict | None = None) -> torch.Tensor:
    """The experts of an MoE layer given its routing: x [T, D], weights [T, k], ids [T, k] (ids outside
    [0, E) select no expert) -> y [T, D]."""
    return compiled(moe_experts_op, backend, configs)(x, w13, w2, weights, ids)


def route(logits: torch.Tensor, top_k: int, *, router: str = "softmax", bias: torch.Tensor | None = None,
          renormalize: bool = True, n_groups: int = 1, topk_groups: int = 1, group_score: str = "max",
          backend: str = "auto"):
    """(weights [T, k] fp32, ids [T, k] int32) for logits [T, E]; see dsl.moe.route."""
    statics = _statics(top_k, router, renormalize, n_groups, topk_groups, group_score, logits.shape[-1])
    if bias is None:
        return compiled(route_op, backend)(logits, **statics)
    return compiled(route_bias_op, backend)(logits, bias, **statics)


def grouped_swiglu_expert_fn(backend: str = "auto"):
    """An ``expert_fn`` for runtime.parallel.expert_parallel (rows sorted by expert, ``counts`` rows
    per expert) that runs kdsl's grouped GEMMs instead of a Python loop over experts."""

    def expert_fn(x_sorted: torch.Tensor, counts: list[int], w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        ids = torch.repeat_interleave(torch.arange(len(counts), device=x_sorted.device, dtype=torch.int32),
                                      torch.tensor(counts, device=x_sorted.device))
        ones = torch.ones((x_sorted.shape[0], 1), dtype=x_sorted.dtype, device=x_sorted.device)
        return compiled(moe_experts_op, backend)(x_sorted, w13, w2, ones, ids[:, None])

    return expert_fn


# ---------------------------------------------------------------------------------------------
# kdsl demo


def _loop_reference(x, router_weight, w13, w2, top_k, router="softmax", renormalize=True):
    """Per-expert loop as popular model code writes it (independent of dsl.moe)."""
    logits = x @ router_weight.T
    scores = torch.softmax(logits.float(), -1) if router == "softmax" else torch.sigmoid(logits.float())
    weights, ids = torch.topk(scores, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    hidden = w2.shape[-1]
    y = torch.zeros_like(x, dtype=torch.float32)
    for e in range(w13.shape[0]):
        tok, slot = torch.where(ids == e)
        if len(tok):
            gu = x[tok].float() @ w13[e].float().T
            h = F.silu(gu[:, :hidden]) * gu[:, hidden:]
            y.index_add_(0, tok, (h @ w2[e].float().T) * weights[tok, slot, None])
    return y.to(x.dtype), logits, ids.to(torch.int32)


def demo_cases():
    """(name, op, args, kwargs, independent reference) at small shapes, for `kdsl demo`."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) / 10  # noqa: E731
    x, rw, w13, w2 = r(33, 48), r(8, 48), r(8, 2 * 40, 48), r(8, 48, 40)
    bias = torch.zeros(8)
    weights = torch.softmax(r(33, 2), -1)
    ids = torch.randint(0, 8, (33, 2), generator=g, dtype=torch.int32)

    def experts_ref(x, w13, w2, weights, ids):
        hidden = w2.shape[-1]
        y = torch.zeros_like(x)
        for e in range(w13.shape[0]):
            tok, slot = torch.where(ids == e)
            gu = x[tok] @ w13[e].T
            y.index_add_(0, tok, (F.silu(gu[:, :hidden]) * gu[:, hidden:]) @ w2[e].T * weights[tok, slot, None])
        return y

    def route_ref(logits, top_k, router, renormalize, n_groups, topk_groups, group_score):
        s = torch.softmax(logits, -1) if router == "softmax" else torch.sigmoid(logits)
        top, idx = s.topk(top_k, -1)
        return (top / top.sum(-1, keepdim=True) if renormalize else top), idx.to(torch.int32)

    statics = dict(top_k=2, router="softmax", renormalize=True, n_groups=1, topk_groups=1, group_score="max")
    sig = dict(statics, router="sigmoid", top_k=3)
    return [
        ("moe layer (route + SwiGLU experts + combine)", moe_op, (x, rw, w13, w2), statics,
         lambda x, rw, w13, w2, **s: _loop_reference(x, rw, w13, w2, s["top_k"], s["router"], s["renormalize"])),
        ("moe layer, sigmoid router, zero bias", moe_bias_op, (x, rw, w13, w2, bias), sig,
         lambda x, rw, w13, w2, b, **s: _loop_reference(x, rw, w13, w2, s["top_k"], s["router"], s["renormalize"])),
        ("moe experts (grouped GEMMs)", moe_experts_op, (x, w13, w2, weights, ids), {}, experts_ref),
        ("moe routing (top-k)", route_op, (r(33, 8) * 10,), statics, route_ref),
    ]


__all__ = ["moe", "moe_experts", "route", "moe_op", "moe_bias_op", "moe_experts_op", "route_op", "route_bias_op",
           "compiled", "grouped_swiglu_expert_fn", "demo_cases"]
