"""``Attention``: qkv projection, rotary embedding, attention and output projection, for training
(forward and backward through the compiled ops) and for serving with a paged KV cache.

The KV cache is a small protocol (:class:`KVCache`), so a serving engine can hand in its own paged
memory: the module writes the new tokens' keys/values through ``write`` and then reads
``k_cache``/``v_cache``/``block_table``/``seq_lens``. Two plain implementations live here:
:class:`PagedKVCache` (caller-given block tables) and :class:`ContiguousKVCache` (one block per
sequence, for tests and simple generation loops).
"""

from __future__ import annotations

import threading
from typing import Protocol, runtime_checkable

import torch
from torch import nn

import dsl
from dsl.attention_prims import gather_paged
from dsl.attention_prims import rotary as _rotary
from dsl.errors import DSLError
from dsl.trace import TensorSpec

from ..compiler import CompiledOp, compile
from ..ops.attention_ops import attention, attention_varlen, paged_attention, rope_tables
from ..ops.dense import linear


# ---------------------------------------------------------------------------------------------
# KV caches


@runtime_checkable
class KVCache(Protocol):
    """One layer's KV cache as the Attention module sees it during one forward step.

    ``k_cache``/``v_cache``: [num_blocks, block_size, H_kv, D]; ``block_table``: [B, max_blocks]
    int32 (block ids of each sequence in token order; slots past its length are never read);
    ``seq_lens``: [B] int32, tokens cached per sequence. ``write(k, v, positions)`` stores the keys
    and values [B, S, H_kv, D] of the new tokens at their positions [B, S] and raises ``seq_lens``
    to cover them; attention then runs over all ``seq_lens[b]`` tokens, the new ones being the last.
    """

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor

    def write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None: ...


def write_paged(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
    """Scatter k/v [B, S, H_kv, D] into the paged caches at ``positions`` [B, S] (one vectorised copy)."""
    block_size = k_cache.shape[1]
    capacity = block_table.shape[1] * block_size
    if positions.shape != k.shape[:2]:
        raise DSLError(f"KV cache write: positions {list(positions.shape)} must be [B, S] of k "
                       f"{list(k.shape)}")
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= capacity):
        raise DSLError(f"KV cache write: positions must lie in [0, {capacity}) (max_blocks "
                       f"{block_table.shape[1]} x block_size {block_size})")
    pos = positions.long()
    blocks = block_table.long().gather(1, pos // block_size)
    if blocks.numel() and (int(blocks.min()) < 0 or int(blocks.max()) >= k_cache.shape[0]):
        raise DSLError("KV cache write: the block table maps a written position to no valid block")
    slots = (blocks * block_size + pos % block_size).reshape(-1)
    h_kv, d = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, h_kv, d).index_copy_(0, slots, k.reshape(-1, h_kv, d).to(k_cache.dtype))
    v_cache.view(-1, h_kv, d).index_copy_(0, slots, v.reshape(-1, h_kv, d).to(v_cache.dtype))


class PagedKVCache:
    """A paged KV cache with caller-given block tables: ``block_table`` [B, max_blocks] int32."""

    def __init__(self, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 block_table: torch.Tensor, *, dtype: torch.dtype = torch.float32, device=None):
        if block_table.dtype != torch.int32 or block_table.dim() != 2:
            raise DSLError(f"PagedKVCache: block_table must be a 2-D int32 tensor, got "
                           f"{block_table.dtype} {list(block_table.shape)}")
        shape = (num_blocks, block_size, n_kv_heads, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.block_table = block_table.to(device=self.k_cache.device)
        self.seq_lens = torch.zeros(block_table.shape[0], dtype=torch.int32, device=self.k_cache.device)

    def write(self, k, v, positions) -> None:
        write_paged(self.k_cache, self.v_cache, self.block_table, k, v, positions)
        self.seq_lens = torch.maximum(self.seq_lens, (positions.max(dim=1).values + 1).to(torch.int32))

    def reset(self) -> None:
        self.seq_lens.zero_()


class ContiguousKVCache(PagedKVCache):
    """One contiguous [max_len] slab per sequence: a paged cache with one block of ``max_len`` tokens
    per sequence, so the same kernels serve it."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device=None):
        table = torch.arange(batch, dtype=torch.int32, device=device)[:, None]
        super().__init__(batch, max_len, n_kv_heads, head_dim, table, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# the fused qkv projection + rotary op, one per head configuration


_ops: dict[tuple, dsl.Op] = {}
_compiled: dict[tuple, CompiledOp] = {}
_lock = threading.Lock()


def _qkv_rotary_op(dim: int, n_heads: int, n_kv_heads: int, head_dim: int) -> dsl.Op:
    key = (dim, n_heads, n_kv_heads, head_dim)
    if key in _ops:
        return _ops[key]
    hd, kd = n_heads * head_dim, n_kv_heads * head_dim

    def qkv_rotary(x, w, cos, sin):
        # One GEMM for q, k and v; rotary on q and k; the head split is a view.
        qkv = x @ w.T
        q = dsl.reshape(qkv[..., :hd], ("M", n_heads, head_dim))
        k = dsl.reshape(qkv[..., hd:hd + kd], ("M", n_kv_heads, head_dim))
        v = dsl.reshape(qkv[..., hd + kd:], ("M", n_kv_heads, head_dim))
        c = dsl.reshape(cos, ("M", 1, head_dim))
        s = dsl.reshape(sin, ("M", 1, head_dim))
        return _rotary(q, c, s), _rotary(k, c, s), v

    qkv_rotary.__annotations__ = {"x": TensorSpec(("M", dim), None),
                                  "w": TensorSpec((hd + 2 * kd, dim), None),
                                  "cos": TensorSpec(("M", head_dim), None),
                                  "sin": TensorSpec(("M", head_dim), None)}
    op = dsl.op(qkv_rotary, name=f"qkv_rotary_{dim}_{n_heads}_{n_kv_heads}_{head_dim}")
    _ops[key] = op
    return op


def _compiled_qkv(key: tuple, backend: str) -> CompiledOp:
    with _lock:
        if (key, backend) not in _compiled:
            _compiled[(key, backend)] = compile(_qkv_rotary_op(*key), backend=backend)
        return _compiled[(key, backend)]


class Attention(nn.Module):
    """Multi-head attention with rotary embedding and grouped-query heads.

    Parameters: ``qkv.weight`` [(n_heads + 2 n_kv_heads) * head_dim, dim] (q rows, then k, then v)
    and ``o_proj.weight`` [dim, n_heads * head_dim]; no biases. ``forward(x, positions=None,
    kv_cache=None)``: x [B, S, dim] -> [B, S, dim].

    * Without a cache (training, full-sequence inference): causal self-attention over the S tokens,
      rotary at ``positions`` (default 0..S-1); fully differentiable.
    * With a cache: the new tokens' k/v are written at ``positions`` (default: right after the
      cached ones), then S == 1 runs paged decode attention over the block table, and S > 1
      (prefill, chunked prefill) runs causal attention of the S new queries over all cached tokens
      (bottom-right aligned: the new tokens must be the last ones of each sequence).
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None,
                 rope_theta: float = 10000.0, backend: str = "auto", *, causal: bool = True,
                 device=None, dtype: torch.dtype | None = None):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        head_dim = dim // n_heads if head_dim is None else head_dim
        for name, value in (("dim", dim), ("n_heads", n_heads), ("n_kv_heads", n_kv_heads),
                            ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DSLError(f"Attention: {name} must be a positive int, got {value!r}")
        if n_heads % n_kv_heads:
            raise DSLError(f"Attention: n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
        if head_dim % 2:
            raise DSLError(f"Attention: rotary needs an even head_dim, got {head_dim}")
        self.dim, self.n_heads, self.n_kv_heads, self.head_dim = dim, n_heads, n_kv_heads, head_dim
        self.rope_theta, self.backend, self.causal = float(rope_theta), backend, causal
        qkv_rows = (n_heads + 2 * n_kv_heads) * head_dim
        self.qkv = nn.Linear(dim, qkv_rows, bias=False, device=device, dtype=dtype)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, rope_theta={self.rope_theta}, backend={self.backend!r}")

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise DSLError(f"Attention: x must be [B, S, {self.dim}], got {list(x.shape)}")
        b, s, _ = x.shape
        h, h_kv, d = self.n_heads, self.n_kv_heads, self.head_dim
        if positions is None:
            steps = torch.arange(s, device=x.device)
            start = kv_cache.seq_lens.long()[:, None] if kv_cache is not None else 0
            positions = (start + steps).expand(b, s)
        elif positions.shape != (b, s):
            raise DSLError(f"Attention: positions must be [B, S] = [{b}, {s}], got {list(positions.shape)}")
        cos, sin = rope_tables(positions.reshape(-1), d, self.rope_theta, x.dtype)
        qkv_op = _compiled_qkv((self.dim, h, h_kv, d), self.backend)
        q, k, v = qkv_op(x.reshape(b * s, self.dim), self.qkv.weight.to(x.dtype), cos, sin)
        q, k, v = q.view(b, s, h, d), k.view(b, s, h_kv, d), v.view(b, s, h_kv, d)
        if kv_cache is None:
            o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=self.causal,
                          backend=self.backend).transpose(1, 2)
        else:
            kv_cache.write(k, v, positions)
            o = self._cached_attention(q, kv_cache)
        return linear(o.reshape(b, s, h * d), self.o_proj.weight.to(x.dtype), backend=self.backend)

    def _cached_attention(self, q: torch.Tensor, cache: KVCache) -> torch.Tensor:
        b, s, h, d = q.shape
        if s == 1:
            o = paged_attention(q[:, 0], cache.k_cache, cache.v_cache, cache.block_table, cache.seq_lens,
                                backend=self.backend)
            return o[:, None]
        # Prefill over a cache: gather each sequence's cached tokens and pack them; the S new
        # queries are the last S positions, which is the bottom-right causal alignment.
        k, valid = gather_paged(cache.k_cache, cache.block_table, cache.seq_lens)
        v, _ = gather_paged(cache.v_cache, cache.block_table, cache.seq_lens)
        k = k.transpose(1, 2)[valid]
        v = v.transpose(1, 2)[valid]
        lens = cache.seq_lens.to(torch.int32)
        cu_k = torch.zeros(b + 1, dtype=torch.int32, device=q.device)
        cu_k[1:] = torch.cumsum(lens, 0)
        cu_q = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=q.device)
        o = attention_varlen(q.reshape(b * s, h, d), k.to(q.dtype), v.to(q.dtype), cu_q, cu_k,
                             causal=self.causal, backend=self.backend)
        return o.view(b, s, h, d)


__all__ = ["Attention", "KVCache", "PagedKVCache", "ContiguousKVCache", "write_paged"]
