"""Attention primitives: dense and variable-length flash attention (forward and backward), paged
decode attention, and rotary position embedding.

Conventions (checked at trace time where dims are static, at call time where they are symbols):

* ``attention(q, k, v)`` takes the SDPA layout ``[B, H, S, D]``. ``k``/``v`` may have fewer heads
  ``H_kv`` (grouped-query / multi-query attention) when ``H % H_kv == 0``; query head ``h`` reads
  key/value head ``h // (H // H_kv)``.
* Causal masking is aligned to the bottom-right corner: query ``i`` sees keys ``j <= i + S_k - S_q``.
  With ``S_q == S_k`` this is the usual lower triangle; with ``S_q < S_k`` the queries are the last
  ``S_q`` positions of the sequence (prefill over a cache, chunked prefill). With ``S_q > S_k`` the
  first ``S_q - S_k`` queries would see no key at all, and a softmax over nothing is undefined, so
  that is a DSLError (as is attending to zero keys without a causal mask), never a silent NaN or 0.
* The forward primitive has two outputs: the attention output (the input dtype) and the
  log-sum-exp of the scaled scores per query row (fp32, natural log), which the backward primitive
  ``attention_bwd`` reads instead of storing the probabilities. The user-facing functions return
  only the output.
* ``scale`` defaults to ``1/sqrt(D)`` (resolved when the node runs if D is a symbol).
* Rotary embedding uses the half-split (GPT-NeoX / Llama "rotate_half") convention:
  ``rotary(x, cos, sin) = x * cos + rotate_half(x) * sin`` with ``rotate_half([x1, x2]) = [-x2, x1]``
  splitting the last dim in two halves; ``cos``/``sin`` broadcast to ``x`` (the usual tables hold
  the same angle in both halves: ``cos = cat(cos(p*f), cos(p*f))``). Interleaved (GPT-J) pairs are
  not this convention: permute the head dim first.
"""

from __future__ import annotations

import math

import torch

from . import dtypes as dt
from .errors import DSLError
from .graph import TensorType
from .primitives import _graph_of, const
from .registry import (ANCHOR, Primitive, ShapeError, broadcast_shapes, emit, register, same_dtype,
                       unify_dim)
from .value import Value

KERNEL_DTYPES = (dt.f32, dt.f16, dt.bf16)


# ---------------------------------------------------------------------------------------------
# checks shared by inference (static dims), the reference and the kernels (bound sizes)


def _dims(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def check_heads(h, h_kv, what: str = "attention"):
    """GQA needs the query heads to split evenly over the key/value heads."""
    if isinstance(h, int) and isinstance(h_kv, int):
        if h_kv < 1 or h % h_kv:
            raise ShapeError(f"{what}: {h} query heads cannot be grouped over {h_kv} key/value heads "
                             f"(grouped-query attention needs H % H_kv == 0)")


def check_causal(s_q, s_k, causal: bool, what: str = "attention"):
    if not (isinstance(s_q, int) and isinstance(s_k, int)):
        return
    if causal and s_q > s_k:
        raise ShapeError(f"{what}: causal with seq_q={s_q} > seq_k={s_k}: masks align to the bottom-right "
                         f"(query i sees keys j <= i + seq_k - seq_q), so the first {s_q - s_k} queries "
                         "would see no key and their softmax is undefined")
    if s_k == 0 and s_q > 0:
        raise ShapeError(f"{what}: {s_q} queries attend to 0 keys; the softmax over no key is undefined")


def runtime_check(fn, *args):
    """Run a shape check on bound sizes; a ShapeError becomes a DSLError naming the primitive."""
    try:
        fn(*args)
    except ShapeError as exc:
        raise DSLError(str(exc)) from None


def resolve_scale(scale, head_dim: int) -> float:
    return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)


def _kernel_dtype(types, what: str) -> dt.DType:
    dtype = same_dtype(types, what)
    if dtype not in KERNEL_DTYPES:
        raise ShapeError(f"{what} needs f32, f16 or bf16 tensors, got {dtype.name}")
    return dtype


def _index_dtype(t: TensorType, name: str, what: str, rank: int):
    if t.dtype is not dt.i32:
        raise ShapeError(f"{what}: {name} must be i32, got {t.dtype.name}")
    if t.rank != rank:
        raise ShapeError(f"{what}: {name} must have rank {rank}, got {_dims(t.shape)}")


# ---------------------------------------------------------------------------------------------
# dense attention: [B, H, S, D]


def _infer_attention(types, attrs):
    q, k, v = types
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.rank != 4:
            raise ShapeError(f"attention expects [B, H, S, D] tensors (SDPA layout); {name} has shape "
                             f"{_dims(t.shape)} of rank {t.rank}")
    dtype = _kernel_dtype([q, k, v], "attention")
    b = unify_dim(q.shape[0], k.shape[0], "batch of q vs k")
    unify_dim(b, v.shape[0], "batch of q vs v")
    unify_dim(k.shape[1], v.shape[1], "heads of k vs v")
    unify_dim(k.shape[2], v.shape[2], "sequence length of k vs v")
    d = unify_dim(q.shape[3], k.shape[3], "head dim of q vs k")
    unify_dim(d, v.shape[3], "head dim of q vs v (a different value head dim is not supported)")
    check_heads(q.shape[1], k.shape[1])
    check_causal(q.shape[2], k.shape[2], attrs["causal"])
    return TensorType(q.shape, dtype), TensorType(q.shape[:3], dt.f32)


def check_attention_sizes(q_shape, k_shape, causal: bool):
    check_heads(int(q_shape[1]), int(k_shape[1]))
    check_causal(int(q_shape[2]), int(k_shape[2]), causal)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    # The reference computes 16-bit inputs in fp32 (as the kernels accumulate) and rounds once.
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _expand_heads(t: torch.Tensor, group: int) -> torch.Tensor:
    if group == 1:
        return t
    b, h_kv, s, d = t.shape
    return t[:, :, None].expand(b, h_kv, group, s, d).reshape(b, h_kv * group, s, d)


def _bottom_right_mask(s_q: int, s_k: int, device, dtype) -> torch.Tensor:
    """Additive mask: 0 where query i may see key j (j <= i + s_k - s_q), -inf elsewhere."""
    i = torch.arange(s_q, device=device)[:, None]
    j = torch.arange(s_k, device=device)[None, :]
    mask = torch.zeros(s_q, s_k, device=device, dtype=dtype)
    return mask.masked_fill_(j > i + (s_k - s_q), float("-inf"))


def _flash_cpu_ok(*tensors) -> bool:
    return all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors) \
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def attention_forward_ref(q, k, v, causal: bool, scale=None):
    """(out, lse) of attention in PyTorch: the torch backend and the tests' oracle."""
    runtime_check(check_attention_sizes, q.shape, k.shape, causal)
    s_q, s_k, d = q.shape[2], k.shape[2], q.shape[3]
    group = q.shape[1] // k.shape[1]
    scale = resolve_scale(scale, d)
    if q.numel() == 0:
        return q.clone(), q.new_zeros(q.shape[:3], dtype=torch.float32)
    qf, kf, vf = _upcast(q), _expand_heads(_upcast(k), group), _expand_heads(_upcast(v), group)
    mask = _bottom_right_mask(s_q, s_k, q.device, qf.dtype) if causal and s_q != s_k else None
    if _flash_cpu_ok(qf, kf, vf):
        # The fused CPU flash kernel returns the log-sum-exp with the output: no S x S tensor.
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qf, kf, vf, 0.0, causal and s_q == s_k, attn_mask=mask, scale=scale)
    else:
        scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
        if causal:
            scores = scores + _bottom_right_mask(s_q, s_k, q.device, scores.dtype)
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.matmul(torch.exp(scores - lse[..., None]), vf)
    return out.to(q.dtype), lse.float()


def attention_backward_ref(q, k, v, out, lse, dout, causal: bool, scale=None):
    """(dq, dk, dv) from the saved output and log-sum-exp, GQA gradients summed over each group."""
    runtime_check(check_attention_sizes, q.shape, k.shape, causal)
    b, h, s_q, d = q.shape
    h_kv, s_k = k.shape[1], k.shape[2]
    group = h // h_kv
    scale = resolve_scale(scale, d)
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    qf, of, dof = _upcast(q), _upcast(out), _upcast(dout)
    kf, vf = _expand_heads(_upcast(k), group), _expand_heads(_upcast(v), group)
    mask = _bottom_right_mask(s_q, s_k, q.device, qf.dtype) if causal and s_q != s_k else None
    if _flash_cpu_ok(qf, kf, vf, of, dof):
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dof.contiguous(), qf, kf, vf, of, lse.to(qf.dtype), 0.0, causal and s_q == s_k,
            attn_mask=mask, scale=scale)
    else:
        scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
        if causal:
            scores = scores + _bottom_right_mask(s_q, s_k, q.device, scores.dtype)
        p = torch.exp(scores - lse[..., None].to(scores.dtype))
        dv = torch.matmul(p.transpose(-1, -2), dof)
        dp = torch.matmul(dof, vf.transpose(-1, -2))
        delta = (dof * of).sum(-1, keepdim=True)
        ds = p * (dp - delta) * scale
        dq = torch.matmul(ds, kf)
        dk = torch.matmul(ds.transpose(-1, -2), qf)
    if group > 1:
        dk = dk.reshape(b, h_kv, group, s_k, d).sum(2)
        dv = dv.reshape(b, h_kv, group, s_k, d).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _vjp_attention(inputs, outputs, cts, causal, scale):
    # The log-sum-exp is internal (no user-facing function returns it), so only the output's
    # cotangent flows; the backward is one primitive with its own template.
    q, k, v = inputs
    out, lse = outputs
    return list(emit(q.graph, "attention_bwd", [q.ref, k.ref, v.ref, out.ref, lse.ref, cts[0].ref],
                     {"causal": causal, "scale": scale}))


def _check_saved_forward(op: str, out, lse, dout, fwd_out, fwd_lse) -> None:
    """A backward node's saved out/lse and incoming dout must have the forward's types."""
    for name, t, want in (("out", out, fwd_out), ("lse", lse, fwd_lse), ("dout", dout, fwd_out)):
        if t.rank != want.rank or t.dtype is not want.dtype:
            raise ShapeError(f"{op}: {name} must be {want}, got {t}")
        for axis, (a, b) in enumerate(zip(t.shape, want.shape)):
            unify_dim(a, b, f"{op}: dim {axis} of {name}")


def _infer_attention_bwd(types, attrs):
    q, k, v, out, lse, dout = types
    fwd_out, fwd_lse = _infer_attention([q, k, v], attrs)
    _check_saved_forward("attention_bwd", out, lse, dout, fwd_out, fwd_lse)
    return q, k, v


register(Primitive("attention", ANCHOR, _infer_attention, ref=attention_forward_ref, vjp=_vjp_attention))
register(Primitive("attention_bwd", ANCHOR, _infer_attention_bwd, ref=attention_backward_ref, vjp=None))


# ---------------------------------------------------------------------------------------------
# variable-length attention: packed [T, H, D] with cumulative offsets


def _infer_varlen(types, attrs):
    q, k, v, cu_q, cu_k = types
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.rank != 3:
            raise ShapeError(f"attention_varlen expects packed [T, H, D] tensors; {name} has shape "
                             f"{_dims(t.shape)}")
    dtype = _kernel_dtype([q, k, v], "attention_varlen")
    _index_dtype(cu_q, "cu_seqlens_q", "attention_varlen", 1)
    _index_dtype(cu_k, "cu_seqlens_k", "attention_varlen", 1)
    unify_dim(cu_q.shape[0], cu_k.shape[0], "number of sequences in cu_seqlens_q vs cu_seqlens_k")
    unify_dim(k.shape[0], v.shape[0], "tokens of k vs v")
    unify_dim(k.shape[1], v.shape[1], "heads of k vs v")
    d = unify_dim(q.shape[2], k.shape[2], "head dim of q vs k")
    unify_dim(d, v.shape[2], "head dim of q vs v")
    check_heads(q.shape[1], k.shape[1], "attention_varlen")
    return TensorType(q.shape, dtype), TensorType((q.shape[1], q.shape[0]), dt.f32)


def varlen_lengths(q, k, cu_q, cu_k, causal: bool, max_q=None, max_k=None):
    """Host-side per-sequence lengths after checking the offsets; raises DSLError."""
    offs_q, offs_k = cu_q.tolist(), cu_k.tolist()
    what = "attention_varlen"
    if not offs_q or offs_q[0] != 0 or offs_k[0] != 0:
        raise DSLError(f"{what}: cu_seqlens must start at 0 (got {offs_q[:1]} and {offs_k[:1]})")
    if offs_q[-1] != q.shape[0] or offs_k[-1] != k.shape[0]:
        raise DSLError(f"{what}: cu_seqlens end at {offs_q[-1]} / {offs_k[-1]} but q has {q.shape[0]} "
                       f"tokens and k has {k.shape[0]}")
    lens_q = [b - a for a, b in zip(offs_q, offs_q[1:])]
    lens_k = [b - a for a, b in zip(offs_k, offs_k[1:])]
    if min(lens_q + lens_k, default=0) < 0:
        raise DSLError(f"{what}: cu_seqlens must be non-decreasing")
    runtime_check(check_heads, int(q.shape[1]), int(k.shape[1]), what)
    for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        runtime_check(check_causal, lq, lk, causal, f"{what} sequence {i}")
    if max_q is not None and max(lens_q, default=0) > max_q:
        raise DSLError(f"{what}: max_q={max_q} but a sequence has {max(lens_q)} queries")
    if max_k is not None and max(lens_k, default=0) > max_k:
        raise DSLError(f"{what}: max_k={max_k} but a sequence has {max(lens_k)} keys")
    return offs_q, offs_k, lens_q, lens_k


def _seq(t, start, length):
    """[T, H, D] rows start..start+length as a [1, H, length, D] view."""
    return t[start:start + length].transpose(0, 1).unsqueeze(0)


def attention_varlen_forward_ref(q, k, v, cu_q, cu_k, causal: bool, scale=None, max_q=None, max_k=None):
    offs_q, offs_k, lens_q, lens_k = varlen_lengths(q, k, cu_q, cu_k, causal, max_q, max_k)
    scale = resolve_scale(scale, q.shape[2])
    out = torch.empty_like(q)
    lse = q.new_zeros((q.shape[1], q.shape[0]), dtype=torch.float32)
    # One fused call per sequence: a loop over sequences, never over tokens.
    for sq, sk, lq, lk in zip(offs_q, offs_k, lens_q, lens_k):
        if lq == 0:
            continue
        o, l_ = attention_forward_ref(_seq(q, sq, lq), _seq(k, sk, lk), _seq(v, sk, lk), causal, scale)
        out[sq:sq + lq] = o[0].transpose(0, 1)
        lse[:, sq:sq + lq] = l_[0]
    return out, lse


def attention_varlen_backward_ref(q, k, v, cu_q, cu_k, out, lse, dout, causal: bool, scale=None,
                                  max_q=None, max_k=None):
    offs_q, offs_k, lens_q, lens_k = varlen_lengths(q, k, cu_q, cu_k, causal, max_q, max_k)
    scale = resolve_scale(scale, q.shape[2])
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for sq, sk, lq, lk in zip(offs_q, offs_k, lens_q, lens_k):
        if lq == 0 or lk == 0:
            continue
        g = attention_backward_ref(_seq(q, sq, lq), _seq(k, sk, lk), _seq(v, sk, lk), _seq(out, sq, lq),
                                   lse[:, sq:sq + lq].unsqueeze(0), _seq(dout, sq, lq), causal, scale)
        dq[sq:sq + lq] = g[0][0].transpose(0, 1)
        dk[sk:sk + lk] = g[1][0].transpose(0, 1)
        dv[sk:sk + lk] = g[2][0].transpose(0, 1)
    return dq, dk, dv


def _vjp_varlen(inputs, outputs, cts, causal, scale, max_q, max_k):
    q, k, v, cu_q, cu_k = inputs
    out, lse = outputs
    grads = emit(q.graph, "attention_varlen_bwd",
                 [q.ref, k.ref, v.ref, cu_q.ref, cu_k.ref, out.ref, lse.ref, cts[0].ref],
                 {"causal": causal, "scale": scale, "max_q": max_q, "max_k": max_k})
    return list(grads) + [None, None]


def _infer_varlen_bwd(types, attrs):
    q, k, v, cu_q, cu_k, out, lse, dout = types
    fwd_out, fwd_lse = _infer_varlen([q, k, v, cu_q, cu_k], attrs)
    _check_saved_forward("attention_varlen_bwd", out, lse, dout, fwd_out, fwd_lse)
    return q, k, v


register(Primitive("attention_varlen", ANCHOR, _infer_varlen, ref=attention_varlen_forward_ref,
                   vjp=_vjp_varlen))
register(Primitive("attention_varlen_bwd", ANCHOR, _infer_varlen_bwd, ref=attention_varlen_backward_ref,
                   vjp=None))


# ---------------------------------------------------------------------------------------------
# paged decode attention


def _infer_paged(types, attrs):
    q, kc, vc, table, lens = types
    if q.rank != 3:
        raise ShapeError(f"paged_attention: q must be [B, H, D] (one new token per sequence), got "
                         f"{_dims(q.shape)}")
    for name, t in (("k_cache", kc), ("v_cache", vc)):
        if t.rank != 4:
            raise ShapeError(f"paged_attention: {name} must be [num_blocks, block_size, H_kv, D], got "
                             f"{_dims(t.shape)}")
    dtype = _kernel_dtype([q, kc, vc], "paged_attention")
    _index_dtype(table, "block_table", "paged_attention", 2)
    _index_dtype(lens, "seq_lens", "paged_attention", 1)
    for axis, what in enumerate(("blocks", "block size", "heads", "head dim")):
        unify_dim(kc.shape[axis], vc.shape[axis], f"{what} of k_cache vs v_cache")
    unify_dim(q.shape[2], kc.shape[3], "head dim of q vs the caches")
    b = unify_dim(q.shape[0], table.shape[0], "batch of q vs block_table")
    unify_dim(b, lens.shape[0], "batch of q vs seq_lens")
    check_heads(q.shape[1], kc.shape[2], "paged_attention")
    return TensorType(q.shape, dtype)


def gather_paged(cache, block_table, seq_lens):
    """The cached tokens of each sequence, contiguous: ([B, H_kv, L, D], valid [B, L]) with
    L = max(seq_lens); rows past a sequence's length are padding."""
    block_size = cache.shape[1]
    max_len = int(seq_lens.max()) if seq_lens.numel() else 0
    pos = torch.arange(max_len, device=cache.device)
    valid = pos[None, :] < seq_lens[:, None].long()
    blocks = block_table.long().gather(1, (pos // block_size).expand(block_table.shape[0], -1))
    slots = torch.where(valid, blocks * block_size + pos % block_size, 0)
    flat = cache.reshape(-1, cache.shape[2], cache.shape[3])
    return flat[slots].permute(0, 2, 1, 3), valid


def check_paged(q, k_cache, block_table, seq_lens):
    runtime_check(check_heads, int(q.shape[1]), int(k_cache.shape[2]), "paged_attention")
    if seq_lens.numel() == 0:
        return
    capacity = block_table.shape[1] * k_cache.shape[1]
    lo, hi = int(seq_lens.min()), int(seq_lens.max())
    if lo < 0 or hi > capacity:
        raise DSLError(f"paged_attention: seq_lens must lie in [0, {capacity}] (max_blocks "
                       f"{block_table.shape[1]} x block_size {k_cache.shape[1]}), got [{lo}, {hi}]")
    used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] * k_cache.shape[1] \
        < seq_lens[:, None].long()
    ids = block_table[used]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= k_cache.shape[0]):
        raise DSLError(f"paged_attention: block_table holds block ids outside [0, {k_cache.shape[0]}) "
                       "in slots that seq_lens uses")


def paged_attention_ref(q, k_cache, v_cache, block_table, seq_lens, scale=None):
    """Decode attention of one query per sequence over its cached tokens. A sequence of length 0
    (an idle batch slot) gets a zero output."""
    check_paged(q, k_cache, block_table, seq_lens)
    b, h, d = q.shape
    h_kv = k_cache.shape[2]
    scale = resolve_scale(scale, d)
    if b == 0:
        return q.clone()
    k, valid = gather_paged(k_cache, block_table, seq_lens)
    v, _ = gather_paged(v_cache, block_table, seq_lens)
    qf = _upcast(q).reshape(b, h_kv, h // h_kv, d)
    scores = torch.matmul(qf, _upcast(k).transpose(-1, -2)) * scale       # [B, H_kv, G, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    empty = ~valid.any(dim=1)
    scores[empty] = 0.0
    p = torch.softmax(scores, dim=-1)
    out = torch.matmul(p, _upcast(v)).reshape(b, h, d)
    out[empty] = 0.0
    return out.to(q.dtype)


register(Primitive("paged_attention", ANCHOR, _infer_paged, ref=paged_attention_ref, vjp=None,
                   differentiable=False))


# ---------------------------------------------------------------------------------------------
# rotary embedding


def _infer_rotary(types, attrs):
    x, cos, sin = types
    if not x.dtype.is_float:
        raise ShapeError(f"rotary needs a floating-point x, got {x.dtype.name}")
    same_dtype([x, cos, sin], "rotary")
    if x.rank == 0:
        raise ShapeError("rotary needs x with a head dim (last axis)")
    d = x.shape[-1]
    if isinstance(d, int) and d % 2:
        raise ShapeError(f"rotary splits the last dim into two halves; it must be even, got {d}")
    for name, t in (("cos", cos), ("sin", sin)):
        try:
            out = broadcast_shapes(x.shape, t.shape)
        except ShapeError as exc:
            raise ShapeError(f"rotary: {name} must broadcast to x: {exc}") from None
        if out != tuple(x.shape):
            raise ShapeError(f"rotary: {name} {_dims(t.shape)} must broadcast to x {_dims(x.shape)} "
                             "without growing it")
    return x


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_ref(x, cos, sin, adjoint: bool = False):
    if x.shape[-1] % 2:
        raise DSLError(f"rotary: the last dim of x must be even, got {x.shape[-1]}")
    xf, c, s = _upcast(x), _upcast(cos), _upcast(sin)
    if adjoint:  # the transpose of the linear map x -> x*cos + rotate_half(x)*sin
        y = xf * c - rotate_half(xf * s)
    else:
        y = xf * c + rotate_half(xf) * s
    return y.to(x.dtype)


def _vjp_rotary(inputs, outputs, cts, adjoint):
    x, cos, sin = inputs
    ct = cts[0]
    g = x.graph
    zero, one = const(g, 0.0, x.dtype), const(g, 1.0, x.dtype)
    gx = _rotary(ct, cos, sin, not adjoint)
    if adjoint:   # y = x*c - R(x*s):  d/ds = R(ct) * x
        gsin = _rotary(ct, zero, one, False) * x
    else:         # y = x*c + R(x)*s:  d/ds = ct * R(x)
        gsin = ct * _rotary(x, zero, one, False)
    return [gx, ct * x, gsin]


register(Primitive("rotary", ANCHOR, _infer_rotary, ref=rotary_ref, vjp=_vjp_rotary))


# ---------------------------------------------------------------------------------------------
# user-facing functions


def _values(what: str, *args):
    graph = _graph_of(*args)
    for a in args:
        if not isinstance(a, Value):
            raise DSLError(f"{what} takes traced tensors, got {type(a).__name__}", op=graph.name)
        if a.graph is not graph:
            raise DSLError(f"{what}: operands come from different traced ops", op=graph.name)
    return graph


def _scale_attr(scale, head_dim, graph, what):
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if isinstance(head_dim, int) and head_dim > 0 else None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise DSLError(f"{what}: scale must be a finite Python number or None, got {scale!r}", op=graph.name)
    return float(scale)


def attention(q, k, v, *, causal: bool = False, scale: float | None = None):
    """Scaled dot-product attention over [B, H, S, D] tensors (k/v: [B, H_kv, S_k, D]); returns
    [B, H, S_q, D]. ``causal`` masks with bottom-right alignment; ``scale`` defaults to 1/sqrt(D)."""
    graph = _values("attention", q, k, v)
    attrs = {"causal": bool(causal), "scale": _scale_attr(scale, q.shape[-1], graph, "attention")}
    out, _lse = emit(graph, "attention", [q.ref, k.ref, v.ref], attrs)
    return out


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_q: int | None = None,
                     max_k: int | None = None, causal: bool = False, scale: float | None = None):
    """Attention over sequences packed along the first axis: q [T_q, H, D], k/v [T_k, H_kv, D],
    sequence i owning rows cu_seqlens[i]:cu_seqlens[i+1] (i32 offsets starting at 0). ``max_q`` /
    ``max_k`` are optional upper bounds of the per-sequence lengths (computed when None)."""
    graph = _values("attention_varlen", q, k, v, cu_seqlens_q, cu_seqlens_k)
    for name, val in (("max_q", max_q), ("max_k", max_k)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 0):
            raise DSLError(f"attention_varlen: {name} must be a non-negative int or None, got {val!r}",
                           op=graph.name)
    attrs = {"causal": bool(causal), "max_q": max_q, "max_k": max_k,
             "scale": _scale_attr(scale, q.shape[-1], graph, "attention_varlen")}
    out, _lse = emit(graph, "attention_varlen",
                     [q.ref, k.ref, v.ref, cu_seqlens_q.ref, cu_seqlens_k.ref], attrs)
    return out


def paged_attention(q, k_cache, v_cache, block_table, seq_lens, *, scale: float | None = None):
    """Single-token decode: q [B, H, D] attends to the first seq_lens[b] cached tokens of sequence b,
    token t living in block block_table[b, t // block_size] at slot t % block_size of the caches
    [num_blocks, block_size, H_kv, D]. Unused block-table slots are never read."""
    graph = _values("paged_attention", q, k_cache, v_cache, block_table, seq_lens)
    attrs = {"scale": _scale_attr(scale, q.shape[-1], graph, "paged_attention")}
    return emit(graph, "paged_attention", [q.ref, k_cache.ref, v_cache.ref, block_table.ref, seq_lens.ref],
                attrs)


def _rotary(x, cos, sin, adjoint: bool):
    return emit(x.graph, "rotary", [x.ref, cos.ref, sin.ref], {"adjoint": bool(adjoint)})


def rotary(x, cos, sin):
    """Rotary position embedding, half-split convention: x * cos + rotate_half(x) * sin, with
    rotate_half([x1, x2]) = [-x2, x1] over the last axis; cos/sin broadcast to x."""
    _values("rotary", x, cos, sin)
    return _rotary(x, cos, sin, False)


__all__ = ["attention", "attention_varlen", "paged_attention", "rotary"]
