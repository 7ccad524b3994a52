"""Mixture-of-experts primitives: top-k, routing, grouped (per-expert) matmuls, the weighted
combine, and the fused SwiGLU expert FFN.

Shapes: T tokens, E experts, k slots per token (top-k), a *slot* is one (token, j) pair and has
the flat index ``t * k + j``. ``ids`` [T, k] names the expert of each slot; an id outside
[0, E) selects no expert: that slot's output is zero and it adds nothing to any gradient (expert
parallelism uses this to drop slots owned by other ranks).

Reference semantics (the torch backend) sort the slots by expert once (stable argsort), gather
the rows, run one matmul per expert over its contiguous slice in fp32 and scatter back: no loop
over tokens. The kernels (codegen/kernels/moe.py) do the same without copying rows: they read
them through the expert-sorted index list.

Primitives and their templates:
  topk, route, route_bwd                        -> moe_route (row-wise selection kernels)
  grouped_matmul, grouped_matmul_combine,
  moe_gate_up (SwiGLU in the epilogue),
  moe_gate_up_bwd (SwiGLU backward in the epilogue) -> moe_gemm (expert-sorted grouped GEMM)
  grouped_matmul_dw                             -> moe_wgrad (per-expert weight gradient)
  combine                                       -> moe_combine (fixed-order sum over the k slots)
``moe_ffn`` is the composite the runtime uses: route weights and ids in, SwiGLU experts, out y.
"""

from __future__ import annotations

import collections
import weakref

import torch
import torch.nn.functional as F

from . import dtypes as dt
from . import primitives as P
from . import registry
from . import shapes as sh
from .errors import DSLError
from .graph import TensorType
from .registry import ANCHOR, Primitive, ShapeError, emit, register, same_dtype, unify_dim
from .value import Value

GATES = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2")

# ---------------------------------------------------------------------------------------------
# shape helpers


def _constrain(a, b, what: str):
    """a == b, where either side may be a product of symbols ("2*H"): unify_dim rejects two distinct
    symbolic spellings outright, so products are recorded as call-time constraints instead."""
    if isinstance(a, int) and isinstance(b, int):
        if a != b:
            raise ShapeError(f"shape mismatch: {what}: {a} vs {b}")
        return
    if a == b:
        return
    if "*" in str(a) or "*" in str(b):
        registry._pending_constraints.append((a, b))
        return
    unify_dim(a, b, what)


def _check_ids(t: TensorType, what: str = "ids"):
    if t.rank != 2:
        raise ShapeError(f"{what} must be [T, k] (rank 2), got rank {t.rank}")
    if t.dtype not in (dt.i32, dt.i64):
        raise ShapeError(f"{what} must be int32 or int64 expert indices, got {t.dtype.name}")


def _check_per_slot(t, T, k, what: str) -> None:
    """A float [T, k] tensor with one value per (token, slot) of the routing ids."""
    _check_float(t, what)
    if t.rank != 2:
        raise ShapeError(f"{what} must be [T, k], got rank {t.rank}")
    unify_dim(t.shape[0], T, f"tokens of {what} vs ids")
    unify_dim(t.shape[1], k, f"slots of {what} vs ids")


def _check_float(t: TensorType, what: str):
    if not t.dtype.is_float:
        raise ShapeError(f"{what} must be a floating-point tensor, got {t.dtype.name}")


def _num_experts(E, env=None) -> int:
    return E if isinstance(E, int) else sh.evaluate(E, env)


# ---------------------------------------------------------------------------------------------
# the expert-sorted slot order shared by the reference implementations

_ORDER_CACHE: "collections.OrderedDict[int, tuple]" = collections.OrderedDict()
_ORDER_CACHE_SIZE = 8


def identity_cache_get(cache, tensor: torch.Tensor, key):
    """A small cache keyed by a tensor's identity and version (tensors hash by id but compare
    elementwise, so weak dictionaries do not work): the hit only counts if it is the same live
    tensor, unmodified since."""
    hit = cache.get(id(tensor))
    if hit is not None and hit[0]() is tensor and hit[1] == (tensor._version, key):
        cache.move_to_end(id(tensor))
        return hit[2]
    return None


def identity_cache_put(cache, tensor: torch.Tensor, key, value, size: int = _ORDER_CACHE_SIZE):
    cache[id(tensor)] = (weakref.ref(tensor), (tensor._version, key), value)
    cache.move_to_end(id(tensor))
    while len(cache) > size:
        cache.popitem(last=False)


def sort_slots(ids: torch.Tensor, num_experts: int):
    """(order, counts): ``order`` lists the valid slots grouped by expert (stable: slot order within
    an expert), ``counts[e]`` how many slots expert e has. Cached per ids tensor (and version), so
    the ops of one MoE layer sort once."""
    hit = identity_cache_get(_ORDER_CACHE, ids, num_experts)
    if hit is not None:
        return hit
    flat = ids.reshape(-1).long()
    group = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=num_experts + 1)[:num_experts].tolist()
    order = order[:sum(counts)]
    identity_cache_put(_ORDER_CACHE, ids, num_experts, (order, counts))
    return order, counts


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # Accumulate in fp32 like the kernels; 64-bit stays 64-bit.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rows(x: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of x [T, K] (one per token: slot // k) or [T, k, K] (one per slot) in sorted order."""
    if x.dim() == 2:
        return x.index_select(0, torch.div(order, k, rounding_mode="floor"))
    return x.reshape(-1, x.shape[-1]).index_select(0, order)


def _per_expert_mm(rows: torch.Tensor, w: torch.Tensor, counts, transpose_w: bool, out: torch.Tensor):
    """out[slice_e] = rows[slice_e] @ w[e]^T (or @ w[e]) for every expert with rows."""
    start = 0
    for e, c in enumerate(counts):
        if c:
            we = w[e].to(out.dtype)
            torch.mm(rows[start:start + c], we if transpose_w else we.t(), out=out[start:start + c])
            start += c
    return out


def _sorted_matmul(x, w, ids, transpose_w):
    """x @ w[e]^T over the valid slots in expert-sorted order: (result [S_valid, N], order)."""
    E = w.shape[0]
    k = ids.shape[1]
    order, counts = sort_slots(ids, E)
    cd = _compute_dtype(x)
    rows = _rows(x, order, k).to(cd)
    n = w.shape[2] if transpose_w else w.shape[1]
    out = rows.new_empty((rows.shape[0], n))
    return _per_expert_mm(rows, w, counts, transpose_w, out), order


# ---------------------------------------------------------------------------------------------
# routing: top-k, softmax/sigmoid gates, selection bias, grouped top-k


def _gate_scores(logits: torch.Tensor, gate: str) -> torch.Tensor:
    lf = logits.to(_compute_dtype(logits))
    if gate == "softmax":
        return torch.softmax(lf, dim=-1)
    if gate == "sigmoid":
        return torch.sigmoid(lf)
    return lf


def select_on_logits(gate: str, has_bias: bool, n_groups: int, group_score: str) -> bool:
    """Whether expert selection may rank raw logits instead of gate scores. Softmax and sigmoid are
    monotone, so without a bias (and without top-2 group sums, which are not) the ranking is the
    same; ranking logits avoids near-ties that differ between exp implementations."""
    return not has_bias and (n_groups == 1 or group_score == "max")


def _descending(x: torch.Tensor, k: int) -> torch.Tensor:
    # Stable sort: among equal values the lowest index comes first, as in the kernel.
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def select_experts(sel: torch.Tensor, k: int, n_groups: int, topk_groups: int, group_score: str):
    """Indices of the top-k of ``sel`` over the last axis; with n_groups > 1 only experts of the
    ``topk_groups`` best groups compete (a group's score is its best member, or the sum of its
    best two with group_score="top2")."""
    if n_groups > 1:
        E = sel.shape[-1]
        size = E // n_groups
        grouped = sel.reshape(*sel.shape[:-1], n_groups, size)
        if group_score == "max":
            gscore = grouped.amax(-1)
        else:
            gscore = grouped.topk(2, dim=-1).values.sum(-1)
        best = _descending(gscore, topk_groups)
        keep = torch.zeros_like(gscore, dtype=torch.bool).scatter_(-1, best, True)
        sel = sel.masked_fill(~keep.repeat_interleave(size, dim=-1), float("-inf"))
    return _descending(sel, k)


def route_reference(logits, bias, k, gate, n_groups, topk_groups, group_score, renormalize):
    scores = _gate_scores(logits, gate)
    if select_on_logits(gate, bias is not None, n_groups, group_score):
        sel = logits.to(scores.dtype)
    else:
        sel = scores + bias.to(scores.dtype) if bias is not None else scores
    ids = select_experts(sel, k, n_groups, topk_groups, group_score)
    weights = scores.gather(-1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def _infer_route(types, attrs):
    logits = types[0]
    _check_float(logits, "route logits")
    if logits.rank < 1:
        raise ShapeError("route/topk needs a tensor of rank >= 1")
    E = logits.shape[-1]
    k = attrs["k"]
    if isinstance(E, int) and k > E:
        raise ShapeError(f"top-k {k} is larger than the number of experts {E}")
    gate = attrs["gate"]
    n_groups, topk_groups = attrs["n_groups"], attrs["topk_groups"]
    if n_groups > 1 and isinstance(E, int):
        if E % n_groups:
            raise ShapeError(f"{E} experts do not split into {n_groups} groups")
        size = E // n_groups
        if k > topk_groups * size:
            raise ShapeError(f"top-k {k} exceeds the {topk_groups} selected groups of {size} experts")
        if attrs["group_score"] == "top2" and size < 2:
            raise ShapeError("group_score='top2' needs groups of at least 2 experts")
    if len(types) == 2:
        bias = types[1]
        _check_float(bias, "route bias")
        if bias.rank != 1:
            raise ShapeError(f"route bias must be [E] (rank 1), got rank {bias.rank}")
        unify_dim(bias.shape[0], E, "route bias length vs the number of experts")
    out_shape = logits.shape[:-1] + (k,)
    if gate == "none":  # topk: values keep the input dtype
        return TensorType(out_shape, logits.dtype), TensorType(out_shape, dt.i32)
    return TensorType(out_shape, dt.f32), TensorType(out_shape, dt.i32)


def _check_k(k, E):
    if k > E:
        raise DSLError(f"top-k {k} is larger than the number of experts {E}", op="route")


def _route_ref(logits, *maybe_bias, k, gate, n_groups, topk_groups, group_score, renormalize):
    _check_k(k, logits.shape[-1])
    bias = maybe_bias[0] if maybe_bias else None
    weights, ids = route_reference(logits, bias, k, gate, n_groups, topk_groups, group_score, renormalize)
    dtype = logits.dtype if gate == "none" else torch.float32
    return weights.to(dtype), ids.to(torch.int32)


def _vjp_route(inputs, outputs, cts, k, gate, n_groups, topk_groups, group_score, renormalize):
    logits = inputs[0]
    ids = outputs[1]
    g = emit(logits.graph, "route_bwd", [logits.ref, ids.ref, cts[0].ref],
             {"gate": gate, "renormalize": renormalize})
    return [g] + [None] * (len(inputs) - 1)   # the bias selects only: no gradient


register(Primitive("route", ANCHOR, _infer_route, ref=_route_ref, vjp=_vjp_route))
register(Primitive("topk", ANCHOR, _infer_route, ref=_route_ref, vjp=_vjp_route))


def route_bwd_reference(logits, ids, ct, gate, renormalize):
    s = _gate_scores(logits, gate)
    ids = ids.long()
    ct = ct.to(s.dtype)
    if renormalize:
        picked = s.gather(-1, ids)
        total = picked.sum(-1, keepdim=True)
        w = picked / total
        ct = (ct - (ct * w).sum(-1, keepdim=True)) / total
    ds = torch.zeros_like(s).scatter_add_(-1, ids, ct)
    if gate == "softmax":
        dl = s * (ds - (ds * s).sum(-1, keepdim=True))
    elif gate == "sigmoid":
        dl = ds * s * (1.0 - s)
    else:
        dl = ds
    return dl.to(logits.dtype)


def _infer_route_bwd(types, attrs):
    logits, ids, ct = types
    if ids.dtype not in (dt.i32, dt.i64):
        raise ShapeError(f"route_bwd ids must be integer, got {ids.dtype.name}")
    if ids.shape != ct.shape:
        raise ShapeError("route_bwd: ids and cotangent shapes differ")
    return logits


register(Primitive("route_bwd", ANCHOR, _infer_route_bwd,
                   ref=lambda logits, ids, ct, gate, renormalize: route_bwd_reference(
                       logits, ids, ct, gate, renormalize),
                   vjp=None))


# ---------------------------------------------------------------------------------------------
# grouped matmul: x [T, K] (one row per token) or [T, k, K] (one row per slot), w [E, N, K]
# (out = x @ w[e]^T) or, with transpose_w, [E, K, N] (out = x @ w[e]) -> [T, k, N]


def _infer_grouped(types, attrs, combine: bool):
    x, w, ids = types[:3]
    _check_ids(ids)
    _check_float(x, "grouped_matmul input")
    dtype = same_dtype([x, w], "grouped_matmul")
    if w.rank != 3:
        raise ShapeError(f"grouped_matmul weights must be [E, N, K] (rank 3), got rank {w.rank}")
    T, k = ids.shape
    if x.rank == 2:
        if combine:
            raise ShapeError("grouped_matmul_combine needs one input row per slot: [T, k, K]")
        unify_dim(x.shape[0], T, "tokens of x vs tokens of ids")
    elif x.rank == 3:
        unify_dim(x.shape[0], T, "tokens of x vs tokens of ids")
        unify_dim(x.shape[1], k, "slots of x vs top-k of ids")
    else:
        raise ShapeError(f"grouped_matmul input must be [T, K] or [T, k, K], got rank {x.rank}")
    if attrs["transpose_w"]:
        K, N = w.shape[1], w.shape[2]
    else:
        N, K = w.shape[1], w.shape[2]
    unify_dim(x.shape[-1], K, "the contraction dim: x's last vs the weights'")
    if combine:
        if attrs["weighted"]:
            _check_per_slot(types[3], T, k, "routing weights")
        return TensorType((T, N), dtype)
    return TensorType((T, k, N), dtype)


def _grouped_ref(x, w, ids, transpose_w):
    T, k = ids.shape
    res, order = _sorted_matmul(x, w, ids, transpose_w)
    out = res.new_zeros((T * k, res.shape[1]))
    out.index_copy_(0, order, res)
    return out.reshape(T, k, -1).to(x.dtype)


def _combine_ref(x, w, ids, *weights, transpose_w, weighted):
    T, k = ids.shape
    res, order = _sorted_matmul(x, w, ids, transpose_w)
    if weighted:
        res = res * weights[0].reshape(-1).to(res.dtype).index_select(0, order)[:, None]
    out = res.new_zeros((T, res.shape[1]))
    out.index_add_(0, torch.div(order, k, rounding_mode="floor"), res)
    return out.to(x.dtype)


def _vjp_grouped(inputs, outputs, cts, transpose_w):
    x, w, ids = inputs
    ct = cts[0]
    E = w.shape[0]
    if x.ndim == 3:
        dx = grouped_matmul(ct, w, ids, transpose_w=not transpose_w)
    else:
        dx = grouped_matmul_combine(ct, w, ids, transpose_w=not transpose_w)
    dw = grouped_matmul_dw(ct, x, ids, E) if transpose_w else grouped_matmul_dw(x, ct, ids, E)
    return [dx, dw, None]


def _vjp_combine_mm(inputs, outputs, cts, transpose_w, weighted):
    x, w, ids = inputs[:3]
    ct = cts[0]
    E = w.shape[0]
    g = grouped_matmul(ct, w, ids, transpose_w=not transpose_w)   # [T, k, K]: unweighted dx
    if not weighted:
        dw = grouped_matmul_dw(ct, x, ids, E) if transpose_w else grouped_matmul_dw(x, ct, ids, E)
        return [g, dw, None]
    wt = inputs[3]
    T, k = ids.shape
    w3 = P.reshape(wt, (T, k, 1))
    dx = P.cast(P.cast(g, dt.f32) * P.cast(w3, dt.f32), x.dtype)
    # d weight[t, j] = <ct[t], x[t, j] @ w[e]^T> = <x[t, j], g[t, j]>: no GEMM recompute needed.
    dwt = P.cast(P.sum(P.cast(x, dt.f32) * P.cast(g, dt.f32), axis=-1), wt.dtype)
    if transpose_w:
        dw = grouped_matmul_dw(ct, x, ids, E, scale=wt)
    else:
        dw = grouped_matmul_dw(x, ct, ids, E, scale=wt)
    return [dx, dw, None, dwt]


register(Primitive("grouped_matmul", ANCHOR, lambda t, a: _infer_grouped(t, a, False),
                   ref=_grouped_ref, vjp=_vjp_grouped))
register(Primitive("grouped_matmul_combine", ANCHOR, lambda t, a: _infer_grouped(t, a, True),
                   ref=_combine_ref, vjp=_vjp_combine_mm))


# grouped_matmul_dw(x, dy, ids, E): dw[e] = sum over slots r of expert e of scale_r * dy_r^T x_r,
# x rows and dy rows each per token ([T, *]) or per slot ([T, k, *]) -> [E, N(dy), K(x)].

def _infer_dw(types, attrs):
    x, dy, ids = types[:3]
    _check_ids(ids)
    dtype = same_dtype([x, dy], "grouped_matmul_dw")
    T, k = ids.shape
    for t, what in ((x, "x"), (dy, "dy")):
        if t.rank not in (2, 3):
            raise ShapeError(f"grouped_matmul_dw {what} must be [T, *] or [T, k, *]")
        unify_dim(t.shape[0], T, f"tokens of {what} vs ids")
        if t.rank == 3:
            unify_dim(t.shape[1], k, f"slots of {what} vs ids")
    if attrs["scaled"]:
        _check_per_slot(types[3], T, k, "grouped_matmul_dw scale")
    return TensorType((attrs["E"], dy.shape[-1], x.shape[-1]), dtype)


def _dw_ref(x, dy, ids, *scale, E, scaled, _env=None):
    n_exp = _num_experts(E, _env)
    k = ids.shape[1]
    order, counts = sort_slots(ids, n_exp)
    cd = _compute_dtype(x)
    xs = _rows(x, order, k).to(cd)
    ds = _rows(dy, order, k).to(cd)
    if scaled:
        ds = ds * scale[0].reshape(-1).to(cd).index_select(0, order)[:, None]
    out = xs.new_zeros((n_exp, dy.shape[-1], x.shape[-1]))
    start = 0
    for e, c in enumerate(counts):
        if c:
            torch.mm(ds[start:start + c].t(), xs[start:start + c], out=out[e])
            start += c
    return out.to(x.dtype)


register(Primitive("grouped_matmul_dw", ANCHOR, _infer_dw, ref=_dw_ref, vjp=None))


# ---------------------------------------------------------------------------------------------
# combine: y [T, k, N], weights [T, k] -> [T, N] = sum_j weights[t, j] * y[t, j]


def _infer_combine(types, attrs):
    y, w = types
    _check_float(y, "combine input")
    _check_float(w, "combine weights")
    if y.rank != 3 or w.rank != 2:
        raise ShapeError(f"combine needs y [T, k, N] and weights [T, k], got ranks {y.rank} and {w.rank}")
    unify_dim(y.shape[0], w.shape[0], "tokens of y vs weights")
    unify_dim(y.shape[1], w.shape[1], "slots of y vs weights")
    return TensorType((y.shape[0], y.shape[2]), y.dtype)


def combine_reference(y, w):
    cd = _compute_dtype(y)
    return torch.einsum("tkn,tk->tn", y.to(cd), w.to(cd)).to(y.dtype)


def _vjp_combine(inputs, outputs, cts):
    y, w = inputs
    ct = cts[0]
    T, k, N = y.shape
    ct3 = P.cast(P.reshape(ct, (T, 1, N)), dt.f32)
    dy = P.cast(ct3 * P.cast(P.reshape(w, (T, k, 1)), dt.f32), y.dtype)
    dw = P.cast(P.sum(P.cast(y, dt.f32) * ct3, axis=-1), w.dtype)
    return [dy, dw]


register(Primitive("combine", ANCHOR, _infer_combine, ref=combine_reference, vjp=_vjp_combine))


# ---------------------------------------------------------------------------------------------
# SwiGLU experts: h = silu(x w_gate^T) * (x w_up^T), w13 [E, 2H, K] with the gate rows first


def _infer_gate_up(types, attrs):
    x, w13, ids = types[:3]
    _check_ids(ids)
    _check_float(x, "moe_gate_up input")
    dtype = same_dtype([x, w13], "moe_gate_up")
    if x.rank != 2 or w13.rank != 3:
        raise ShapeError(f"moe_gate_up needs x [T, K] and w13 [E, 2*H, K], got ranks {x.rank} and {w13.rank}")
    T, k = ids.shape
    unify_dim(x.shape[0], T, "tokens of x vs ids")
    unify_dim(x.shape[1], w13.shape[2], "hidden size of x vs w13's last dim")
    H = attrs["hidden"]
    _constrain(w13.shape[1], sh.mul(2, H), "w13's rows vs 2 * the expert hidden size")
    if len(types) == 4:  # the backward: dh [T, k, H] -> d(gate|up) [T, k, 2H]
        dh = types[3]
        if dh.rank != 3:
            raise ShapeError("moe_gate_up_bwd cotangent must be [T, k, H]")
        return TensorType((T, k, w13.shape[1]), dtype)
    return TensorType((T, k, H), dtype)


def gate_up_reference(x, w13, ids, hidden):
    T, k = ids.shape
    H = w13.shape[1] // 2
    gu, order = _sorted_matmul(x, w13, ids, False)
    h = F.silu(gu[:, :H]) * gu[:, H:]
    out = h.new_zeros((T * k, H))
    out.index_copy_(0, order, h)
    return out.reshape(T, k, H).to(x.dtype)


def gate_up_bwd_reference(x, w13, ids, dh, hidden):
    T, k = ids.shape
    H = w13.shape[1] // 2
    gu, order = _sorted_matmul(x, w13, ids, False)
    g, u = gu[:, :H], gu[:, H:]
    d = dh.reshape(T * k, H).index_select(0, order).to(gu.dtype)
    s = torch.sigmoid(g)
    res = torch.cat([d * u * s * (1.0 + g * (1.0 - s)), d * g * s], dim=1)
    out = res.new_zeros((T * k, 2 * H))
    out.index_copy_(0, order, res)
    return out.reshape(T, k, 2 * H).to(x.dtype)


def _vjp_gate_up(inputs, outputs, cts, hidden):
    x, w13, ids = inputs
    # Recompute gate/up in the backward GEMM and apply SwiGLU's derivative in its epilogue, so the
    # forward keeps no [T, k, 2H] activation.
    dgu = emit(x.graph, "moe_gate_up_bwd", [x.ref, w13.ref, ids.ref, cts[0].ref], {"hidden": hidden})
    dx = grouped_matmul_combine(dgu, w13, ids, transpose_w=True)
    dw13 = grouped_matmul_dw(x, dgu, ids, w13.shape[0])
    return [dx, dw13, None]


register(Primitive("moe_gate_up", ANCHOR, _infer_gate_up, ref=gate_up_reference, vjp=_vjp_gate_up))
register(Primitive("moe_gate_up_bwd", ANCHOR, _infer_gate_up, ref=gate_up_bwd_reference, vjp=None))


# ---------------------------------------------------------------------------------------------
# user-facing functions


def _graph(*vals):
    for v in vals:
        if isinstance(v, Value):
            return v.graph
    raise DSLError("MoE primitives need traced tensors; call them inside an @dsl.op function")


def _need_value(v, what, graph):
    if not isinstance(v, Value) or v.graph is not graph:
        raise DSLError(f"{what} must be a traced tensor of this op", op=graph.name)


def topk(x, k: int):
    """(values, indices) of the k largest entries over the last axis, largest first; ties go to the
    lowest index. Indices are int32."""
    graph = _graph(x)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise DSLError(f"topk: k must be a positive int, got {k!r}", op=graph.name)
    return emit(graph, "topk", [x.ref], {"k": k, "gate": "none", "n_groups": 1, "topk_groups": 1,
                                        "group_score": "max", "renormalize": False})


def route(logits, k: int, *, gate: str = "softmax", bias=None, n_groups: int = 1, topk_groups: int = 1,
          group_score: str = "max", renormalize: bool = True):
    """Routing: (weights [T, k] f32, ids [T, k] i32).

    scores = softmax(logits) or sigmoid(logits) (fp32). Experts are selected by scores + bias (the
    bias steers selection only, auxiliary-loss-free balancing; it gets no gradient) and the weight
    of a selected expert is its unbiased score, divided by the sum over the selected ones when
    ``renormalize``. With ``n_groups`` > 1 the experts form n_groups equal groups and only the
    ``topk_groups`` best groups compete; a group's score is its best (selection) score
    (group_score="max") or the sum of its best two ("top2", as DeepSeek-V3 does)."""
    graph = _graph(logits)
    if gate not in GATES:
        raise DSLError(f"route: gate must be one of {GATES}, got {gate!r}", op=graph.name)
    if group_score not in GROUP_SCORES:
        raise DSLError(f"route: group_score must be one of {GROUP_SCORES}, got {group_score!r}", op=graph.name)
    for name, v in (("k", k), ("n_groups", n_groups), ("topk_groups", topk_groups)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise DSLError(f"route: {name} must be a positive int, got {v!r}", op=graph.name)
    if topk_groups > n_groups:
        raise DSLError(f"route: topk_groups {topk_groups} > n_groups {n_groups}", op=graph.name)
    inputs = [logits.ref]
    if bias is not None:
        _need_value(bias, "route bias", graph)
        inputs.append(bias.ref)
    return emit(graph, "route", inputs, {"k": k, "gate": gate, "n_groups": n_groups,
                                         "topk_groups": topk_groups, "group_score": group_score,
                                         "renormalize": bool(renormalize)})


def grouped_matmul(x, w, ids, *, transpose_w: bool = False):
    """[T, k, N]: row (t, j) is x[t] (or x[t, j] for a [T, k, K] input) times w[ids[t, j]]^T
    (w [E, N, K]); with transpose_w, w is [E, K, N] and used as is."""
    graph = _graph(x, w, ids)
    for v, n in ((x, "x"), (w, "w"), (ids, "ids")):
        _need_value(v, n, graph)
    return emit(graph, "grouped_matmul", [x.ref, w.ref, ids.ref], {"transpose_w": bool(transpose_w)})


def grouped_matmul_combine(x, w, ids, weights=None, *, transpose_w: bool = False):
    """[T, N] = sum_j weights[t, j] * (x[t, j] @ w[ids[t, j]]^T) (weights 1 when None): a grouped
    matmul whose epilogue applies the routing weight and sums a token's k slots."""
    graph = _graph(x, w, ids)
    inputs = [x.ref, w.ref, ids.ref]
    if weights is not None:
        _need_value(weights, "weights", graph)
        inputs.append(weights.ref)
    return emit(graph, "grouped_matmul_combine", inputs,
                {"transpose_w": bool(transpose_w), "weighted": weights is not None})


def grouped_matmul_dw(x, dy, ids, num_experts, *, scale=None):
    """[E, N, K]: dw[e] = sum over the slots r routed to e of scale_r * dy_r^T x_r."""
    graph = _graph(x, dy, ids)
    inputs = [x.ref, dy.ref, ids.ref]
    if scale is not None:
        inputs.append(scale.ref)
    return emit(graph, "grouped_matmul_dw", inputs, {"E": num_experts, "scaled": scale is not None})


def combine(y, weights):
    """[T, N] = sum_j weights[t, j] * y[t, j] (fp32 accumulation, fixed slot order)."""
    graph = _graph(y, weights)
    _need_value(y, "y", graph)
    _need_value(weights, "weights", graph)
    return emit(graph, "combine", [y.ref, weights.ref])


def swiglu_experts(x, w13, ids, hidden=None):
    """h [T, k, H] = silu(x w_gate[e]^T) * (x w_up[e]^T) with w13 [E, 2H, K] (gate rows first),
    computed by one grouped GEMM with SwiGLU in its epilogue."""
    graph = _graph(x, w13, ids)
    if hidden is None:
        rows = w13.shape[1]
        hidden = rows // 2 if isinstance(rows, int) else sh.div(rows, 2)
        if hidden is None:
            raise DSLError(f"swiglu_experts: cannot halve the symbolic dim {rows}; pass hidden=",
                           op=graph.name)
        if isinstance(rows, int) and rows % 2:
            raise DSLError(f"swiglu_experts: w13 has an odd number of rows ({rows})", op=graph.name)
    return emit(graph, "moe_gate_up", [x.ref, w13.ref, ids.ref], {"hidden": hidden})


def moe_ffn(x, w13, w2, weights, ids):
    """The SwiGLU expert FFN of an MoE layer: y [T, D] = sum_j weights[t, j] * (h[t, j] @ w2[e]^T),
    h = swiglu_experts(x, w13, ids); w13 [E, 2H, D], w2 [E, D, H]. Two kernels: the first grouped
    GEMM computes gate and up tiles together and applies SwiGLU in its epilogue; the second applies
    the routing weight in its epilogue and sums each token's k slots in a fixed order."""
    graph = _graph(x, w13, w2, weights, ids)
    if w2.ndim != 3:
        raise DSLError(f"moe_ffn: w2 must be [E, D, H], got rank {w2.ndim}", op=graph.name)
    h = swiglu_experts(x, w13, ids, hidden=w2.shape[2])
    return grouped_matmul_combine(h, w2, ids, weights)


__all__ = ["topk", "route", "grouped_matmul", "grouped_matmul_combine", "grouped_matmul_dw", "combine",
           "swiglu_experts", "moe_ffn", "sort_slots", "route_reference", "route_bwd_reference",
           "select_experts", "select_on_logits", "GATES", "GROUP_SCORES"]
