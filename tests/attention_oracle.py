"""Independent attention references for the attention tests (not kdsl code).

``exact`` is plain attention in float64 (the "ref_fp32" of flash-attention's rule, computed even
more exactly); ``plain_same_dtype`` is the same naive computation in the inputs' dtype, the error
budget: kdsl's error against the exact result may be at most twice the plain computation's error
(plus a tiny epsilon), for the output and for dQ, dK and dV.
"""

from __future__ import annotations

import torch

EPS = 1e-5


def _naive(q, k, v, causal, scale):
    group = q.shape[-3] // k.shape[-3]
    k = k.repeat_interleave(group, dim=-3)
    v = v.repeat_interleave(group, dim=-3)
    s_q, s_k = q.shape[-2], k.shape[-2]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        keep = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(diagonal=s_k - s_q)
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _run(q, k, v, dout, causal, scale, dtype):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = _naive(q, k, v, causal, scale)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(dtype))
    return (out.detach(), *grads)


def exact(q, k, v, dout, causal=False, scale=None):
    """(out, dq, dk, dv) in float64."""
    return _run(q, k, v, dout, causal, scale, torch.float64)


def plain_same_dtype(q, k, v, dout, causal=False, scale=None):
    """(out, dq, dk, dv) of naive attention in the inputs' own dtype."""
    return _run(q, k, v, dout, causal, scale, q.dtype)


def max_err(got, want) -> float:
    return (got.double() - want.double()).abs().max().item() if got.numel() else 0.0


def assert_flash_rule(got, plain, ref, names=("out", "dq", "dk", "dv")):
    """max|got - ref| <= 2 * max|plain - ref| + EPS, per tensor."""
    for name, g, p, r in zip(names, got, plain, ref):
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} vs {tuple(r.shape)}"
        assert g.dtype == p.dtype, f"{name}: dtype {g.dtype} vs {p.dtype}"
        err, budget = max_err(g, r), 2 * max_err(p, r) + EPS
        assert err <= budget, f"{name}: max error {err:.3e} exceeds 2 x plain torch ({budget:.3e})"


def varlen_split(t, cu):
    """Packed [T, H, D] -> list of [1, H, L, D] per sequence."""
    cu = cu.tolist()
    return [t[a:b].transpose(0, 1)[None] for a, b in zip(cu, cu[1:])]


def varlen_reference(q, k, v, dout, cu_q, cu_k, causal, fn):
    """Apply ``fn`` (exact or plain_same_dtype) per sequence; pack the results back."""
    outs = [[], [], [], []]
    for qs, ks, vs, ds in zip(varlen_split(q, cu_q), varlen_split(k, cu_k), varlen_split(v, cu_k),
                              varlen_split(dout, cu_q)):
        res = fn(qs, ks, vs, ds, causal)
        for acc, t in zip(outs, res):
            acc.append(t[0].transpose(0, 1))
    return tuple(torch.cat(parts) for parts in outs)


def gathered_decode(q, k_cache, v_cache, table, lens, scale=None):
    """Decode attention by explicit gathering per sequence, float64 (zeros for length 0)."""
    b, h, d = q.shape
    block = k_cache.shape[1]
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros(b, h, d, dtype=torch.float64)
    for i in range(b):
        n = int(lens[i])
        if n == 0:
            continue
        t = torch.arange(n)
        slots = table[i, t // block].long() * block + t % block
        k = k_cache.reshape(-1, *k_cache.shape[2:])[slots].double().transpose(0, 1)   # [H_kv, n, D]
        v = v_cache.reshape(-1, *v_cache.shape[2:])[slots].double().transpose(0, 1)
        group = h // k.shape[0]
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        p = torch.softmax((q[i].double()[:, None] @ k.transpose(-1, -2)) * scale, dim=-1)
        out[i] = (p @ v)[:, 0]
    return out


def random_paged(batch, h, h_kv, d, block, max_blocks, lens, dtype=torch.float32, seed=0, spare=3):
    """Random caches and a shuffled block table whose slots past each length hold -1."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = batch * max_blocks + spare
    q = torch.randn(batch, h, d, generator=g).to(dtype)
    kc = torch.randn(num_blocks, block, h_kv, d, generator=g).to(dtype)
    vc = torch.randn(num_blocks, block, h_kv, d, generator=g).to(dtype)
    table = torch.randperm(num_blocks, generator=g)[:batch * max_blocks].reshape(batch, max_blocks)
    table = table.to(torch.int32)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    for i, n in enumerate(lens):
        table[i, -(-n // block):] = -1
    return q, kc, vc, table, lens_t
