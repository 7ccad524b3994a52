"""Attention as ready compiled ops: ``attention`` (SDPA layout, GQA), ``attention_varlen`` (packed
sequences), ``paged_attention`` (single-token decode over a paged KV cache) and ``rotary``.

Each wrapper checks the layout up front (so a wrong call fails with a DSLError naming the tensor,
before anything is traced or launched) and calls a compiled dsl op: generated Triton kernels for
CUDA tensors (``backend="auto"``), the reference semantics (SDPA's fused CPU kernel) for CPU tensors.
All of them are differentiable except ``paged_attention`` (serving only).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

import codegen.kernels.attention  # noqa: F401  (registers the attention templates and spaces)
import dsl
from dsl.attention_prims import attention as _attention
from dsl.attention_prims import attention_varlen as _attention_varlen
from dsl.attention_prims import check_heads, paged_attention as _paged_attention, rotary as _rotary
from dsl.errors import DSLError
from dsl.registry import ShapeError
from dsl.trace import TensorSpec

from ..compiler import CompiledOp, compile

T = dsl.Tensor


@dsl.op
def attention_op(q: T["B", "H", "S", "D"], k: T["B", "HKV", "SK", "D"], v: T["B", "HKV", "SK", "D"], *,
                 causal: bool = True, scale: float = 1.0, default_scale: bool = True):
    return _attention(q, k, v, causal=causal, scale=None if default_scale else scale)


@dsl.op
def attention_varlen_op(q: T["TQ", "H", "D"], k: T["TK", "HKV", "D"], v: T["TK", "HKV", "D"],
                        cu_seqlens_q: T["N", dsl.i32], cu_seqlens_k: T["N", dsl.i32], *,
                        causal: bool = True, scale: float = 1.0, default_scale: bool = True):
    return _attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal,
                             scale=None if default_scale else scale)


@dsl.op
def paged_attention_op(q: T["B", "H", "D"], k_cache: T["NB", "P", "HKV", "D"],
                       v_cache: T["NB", "P", "HKV", "D"], block_table: T["B", "MB", dsl.i32],
                       seq_lens: T["B", dsl.i32], *, scale: float = 1.0, default_scale: bool = True):
    return _paged_attention(q, k_cache, v_cache, block_table, seq_lens,
                            scale=None if default_scale else scale)


def _tuning_inputs(op_name: str):
    """Inputs for tuning the paged/varlen ops at a shape: the generic factory's all-zero integer
    tensors would mean empty sequences (no work, or offsets that do not add up)."""

    def make(shape: dict, dtype=None, device="cpu", seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        torch_dtype = dtype.torch if dtype is not None else torch.float32
        rnd = lambda *dims: (torch.randn(*dims, generator=g) / 4).to(torch_dtype).to(device)  # noqa: E731
        if op_name == "paged_attention_op":
            b, h, h_kv, d, nb, p, mb = (shape[k] for k in ("B", "H", "HKV", "D", "NB", "P", "MB"))
            if nb < b * mb:
                raise DSLError(f"tuning paged_attention_op needs NB >= B * MB ({b * mb}), got NB={nb}")
            # Full contexts over a shuffled table: the decode workload at its longest.
            table = torch.randperm(nb, generator=g)[:b * mb].reshape(b, mb).to(torch.int32)
            lens = torch.full((b,), mb * p, dtype=torch.int32)
            return [rnd(b, h, d), rnd(nb, p, h_kv, d), rnd(nb, p, h_kv, d), table.to(device), lens.to(device)]
        tq, tk, h, h_kv, d, n = (shape[k] for k in ("TQ", "TK", "H", "HKV", "D", "N"))
        # N - 1 sequences of (nearly) equal lengths; the last one takes the remainder.
        def offsets(total):
            step = total // max(1, n - 1)
            cu = [min(total, i * step) for i in range(n)]
            cu[-1] = total
            return torch.tensor(cu, dtype=torch.int32, device=device)
        return [rnd(tq, h, d), rnd(tk, h_kv, d), rnd(tk, h_kv, d), offsets(tq), offsets(tk)]

    return make


# The tuner may ask an op for example inputs (``op.example_inputs(shape, dtype, device, seed)``).
paged_attention_op.example_inputs = _tuning_inputs("paged_attention_op")
attention_varlen_op.example_inputs = _tuning_inputs("attention_varlen_op")

_compiled: dict[tuple, CompiledOp] = {}
_lock = threading.Lock()


def _get(op, backend: str) -> CompiledOp:
    key = (op.name, backend)
    with _lock:
        if key not in _compiled:
            _compiled[key] = compile(op, backend=backend)
        return _compiled[key]


def _scale_kw(scale) -> dict:
    if scale is None:
        return {"default_scale": True}
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise DSLError(f"scale must be a Python number or None, got {type(scale).__name__}")
    return {"scale": float(scale), "default_scale": False}


def _check_rank(what: str, layout: str, **tensors):
    rank = layout.count(",") + 1
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise DSLError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise DSLError(f"{what}: {name} must be {layout}, got shape {list(t.shape)}")


def _check_gqa(what: str, h: int, h_kv: int):
    try:
        check_heads(h, h_kv, what)
    except ShapeError as exc:
        raise DSLError(str(exc)) from None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale=None, *,
              backend: str = "auto") -> torch.Tensor:
    """Scaled dot-product attention in SDPA layout: q [B, H, S_q, D], k/v [B, H_kv, S_k, D] with
    H % H_kv == 0 (grouped-query attention when H_kv < H). ``causal`` masks with bottom-right
    alignment (query i sees keys j <= i + S_k - S_q; S_q > S_k is an error). ``scale`` defaults to
    1/sqrt(D). Returns [B, H, S_q, D]."""
    _check_rank("attention", "[B, H, S, D] (SDPA layout)", q=q, k=k, v=v)
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise DSLError(f"attention: q [B, H, S_q, D] = {list(q.shape)} needs k and v of shape "
                       f"[B, H_kv, S_k, D] with the same batch and head dim; got k {list(k.shape)}, "
                       f"v {list(v.shape)}")
    _check_gqa("attention", q.shape[1], k.shape[1])
    return _get(attention_op, backend)(q, k, v, causal=bool(causal), **_scale_kw(scale))


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, causal: bool = True, scale=None, *,
                     backend: str = "auto") -> torch.Tensor:
    """Attention over packed sequences: q [T_q, H, D], k/v [T_k, H_kv, D]; sequence i owns rows
    cu_seqlens[i]:cu_seqlens[i+1] (int32, starting at 0). Returns [T_q, H, D]."""
    _check_rank("attention_varlen", "[T, H, D] (packed tokens)", q=q, k=k, v=v)
    _check_rank("attention_varlen", "[num_seqs + 1] int32 offsets", cu_seqlens_q=cu_seqlens_q,
                cu_seqlens_k=cu_seqlens_k)
    _check_gqa("attention_varlen", q.shape[1], k.shape[1])
    return _get(attention_varlen_op, backend)(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=bool(causal),
                                              **_scale_kw(scale))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    seq_lens: torch.Tensor, scale=None, *, backend: str = "auto") -> torch.Tensor:
    """Single-token decode: q [B, H, D] over the first seq_lens[b] tokens of each sequence in the
    paged caches [num_blocks, block_size, H_kv, D], token t of sequence b living in block
    block_table[b, t // block_size] (int32) at slot t % block_size. Returns [B, H, D]; a sequence of
    length 0 gets zeros."""
    _check_rank("paged_attention", "[B, H, D]", q=q)
    _check_rank("paged_attention", "[num_blocks, block_size, H_kv, D]", k_cache=k_cache, v_cache=v_cache)
    _check_gqa("paged_attention", q.shape[1], k_cache.shape[2])
    return _get(paged_attention_op, backend)(q, k_cache, v_cache, block_table, seq_lens, **_scale_kw(scale))


# -- rotary: one op per (rank of x, broadcast pattern of cos/sin) -----------------------------

_rotary_ops: dict[tuple, dsl.Op] = {}


def _rotary_spec(x_shape, t_shape) -> TensorSpec:
    # cos/sin align to x on the right; their size-1 dims broadcast, the others are x's dims.
    lead = len(x_shape) - len(t_shape)
    dims = tuple(1 if n == 1 else f"X{lead + i}" for i, n in enumerate(t_shape))
    return TensorSpec(dims, None)


def _rotary_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> dsl.Op:
    key = (x.dim(), tuple(n == 1 for n in cos.shape), tuple(n == 1 for n in sin.shape))
    op = _rotary_ops.get(key)
    if op is None:
        def rotary_fn(x, cos, sin):
            return _rotary(x, cos, sin)

        rotary_fn.__annotations__ = {
            "x": TensorSpec(tuple(f"X{i}" for i in range(x.dim())), None),
            "cos": _rotary_spec(x.shape, cos.shape), "sin": _rotary_spec(x.shape, sin.shape)}
        op = _rotary_ops[key] = dsl.op(rotary_fn, name="rotary_r{}_{}_{}".format(
            x.dim(), "".join("1" if b else "n" for b in key[1]), "".join("1" if b else "n" for b in key[2])))
    return op


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Rotary embedding, half-split (GPT-NeoX / Llama) convention: x * cos + rotate_half(x) * sin
    with rotate_half([x1, x2]) = [-x2, x1] over the last axis; cos/sin broadcast to x."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise DSLError("rotary: x must be a tensor whose last axis is the head dim")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() > x.dim() or any(a != b and a != 1 for a, b in zip(reversed(t.shape), reversed(x.shape))):
            raise DSLError(f"rotary: {name} {list(t.shape)} must broadcast to x {list(x.shape)}")
    if cos.dtype != x.dtype or sin.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return _get(_rotary_op(x, cos, sin), backend)(x, cos, sin)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float = 10000.0,
                dtype: torch.dtype = torch.float32):
    """cos/sin tables [..., head_dim] for ``positions`` (any shape) in the half-split convention:
    angle_i = position * theta^(-2i / head_dim) for i < head_dim / 2, repeated for both halves."""
    if head_dim % 2:
        raise DSLError(f"rotary needs an even head dim, got {head_dim}")
    even = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64)
    inv_freq = theta ** (-even / head_dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


# -- `kdsl demo` ------------------------------------------------------------------------------


def _sdpa_bottom_right(q, k, v, causal=True):
    """Independent reference: SDPA with an explicit boolean bottom-right mask and GQA expansion."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s_q, s_k = q.shape[-2], k.shape[-2]
    mask = None
    if causal:
        mask = torch.ones(s_q, s_k, dtype=torch.bool).tril(diagonal=s_k - s_q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def demo_cases():
    """(name, compiled op, args, independent reference) at small shapes, for `kdsl demo`."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731

    # Causal GQA with seq_q < seq_k (prefill of 19 new tokens after 24 cached) and head dim 40.
    q, k, v = r(1, 4, 19, 40), r(1, 2, 43, 40), r(1, 2, 43, 40)

    # Two packed sequences of 7 and 12 queries over 9 and 20 keys.
    n_seqs = 2
    cu_q = torch.tensor([0, 7, 19], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 29], dtype=torch.int32)
    vq, vk, vv = r(19, 4, 32), r(29, 1, 32), r(29, 1, 32)

    def varlen_ref(q, k, v, cu_q, cu_k):
        outs = []
        for i in range(n_seqs):
            qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t, a, b in
                          ((q, cu_q[i], cu_q[i + 1]), (k, cu_k[i], cu_k[i + 1]), (v, cu_k[i], cu_k[i + 1])))
            outs.append(_sdpa_bottom_right(qs, ks, vs)[0].transpose(0, 1))
        return torch.cat(outs)

    # Decode over a shuffled block table with unused (-1) slots; lengths 1, 13 and 30.
    blocks, block_size = 12, 8
    pq, kc, vc = r(3, 4, 32), r(blocks, block_size, 2, 32), r(blocks, block_size, 2, 32)
    table = torch.randperm(blocks, generator=g).reshape(3, 4).to(torch.int32)
    table[0, 1:] = -1
    lens = torch.tensor([1, 13, 30], dtype=torch.int32)

    def paged_ref(q, kc, vc, table, lens):
        outs = []
        for b in range(q.shape[0]):
            t = torch.arange(int(lens[b]))
            slots = table[b, t // block_size].long() * block_size + t % block_size
            ks = kc.reshape(-1, 2, 32)[slots].transpose(0, 1)[None]
            vs = vc.reshape(-1, 2, 32)[slots].transpose(0, 1)[None]
            outs.append(_sdpa_bottom_right(q[b][None, :, None], ks, vs, causal=False)[0, :, 0])
        return torch.stack(outs)

    x = r(2, 6, 4, 16)
    cos, sin = rope_tables(torch.arange(6).expand(2, 6)[..., None], 16)

    def rotary_ref(x, cos, sin):
        x1, x2 = x[..., :8], x[..., 8:]
        return torch.cat((x1 * cos[..., :8] - x2 * sin[..., :8], x2 * cos[..., 8:] + x1 * sin[..., 8:]), -1)

    rot_op = _rotary_op(x, cos, sin)
    return [
        ("attention causal GQA (S_q < S_k, D=40)", _get(attention_op, "auto"), (q, k, v), _sdpa_bottom_right),
        ("attention varlen causal", _get(attention_varlen_op, "auto"), (vq, vk, vv, cu_q, cu_k), varlen_ref),
        ("paged decode attention", _get(paged_attention_op, "auto"), (pq, kc, vc, table, lens), paged_ref),
        ("rotary (half-split)", _get(rot_op, "auto"), (x, cos, sin), rotary_ref),
    ]


__all__ = ["attention", "attention_varlen", "paged_attention", "rotary", "rope_tables",
           "attention_op", "attention_varlen_op", "paged_attention_op", "demo_cases"]
