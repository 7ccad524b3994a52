"""runtime.ops attention ops (full accuracy grid on the torch backend), bad input, paged decode,
the Attention module in training and with KV caches, RMSNorm, and the demo cases."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dsl import DSLError
from runtime.nn.attention import Attention, ContiguousKVCache, KVCache, PagedKVCache
from runtime.nn.norm import RMSNorm
from runtime.ops.attention_ops import (attention, attention_varlen, demo_cases, paged_attention, rope_tables,
                                   rotary)

from tests.attention_oracle import (assert_flash_rule, exact, gathered_decode, plain_same_dtype,
                                    random_paged, varlen_reference)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


SEQ_PAIRS = [(1, 67), (37, 53), (45, 45), (70, 33)]   # (seq_q, seq_k); 70 > 33 only without causal
HEADS = [(4, 4), (4, 2), (4, 1)]                       # MHA, GQA, MQA


def _grid():
    for d in (32, 40, 64, 80):
        for s_q, s_k in SEQ_PAIRS:
            for causal in (False, True):
                if causal and s_q > s_k:
                    continue
                for h, h_kv in HEADS:
                    yield d, s_q, s_k, causal, h, h_kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("d,s_q,s_k,causal,h,h_kv", list(_grid()))
def test_flash_rule_full_grid_torch_backend(d, s_q, s_k, causal, h, h_kv, dtype):
    g = torch.Generator().manual_seed(d * 1000 + s_q * 10 + s_k + h_kv)
    mk = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    q, k, v, dout = mk(2, h, s_q, d), mk(2, h_kv, s_k, d), mk(2, h_kv, s_k, d), mk(2, h, s_q, d)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, causal=causal, backend="torch")
    got = (out.detach(), *torch.autograd.grad(out, leaves, dout))
    assert_flash_rule(got, plain_same_dtype(q, k, v, dout, causal), exact(q, k, v, dout, causal))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_varlen_rule_torch_backend(causal, dtype):
    lens_q, lens_k = [1, 13, 0, 40], [3, 13, 5, 71]
    cu_q = torch.tensor([0, 1, 14, 14, 54], dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 16, 21, 92], dtype=torch.int32)
    g = torch.Generator().manual_seed(int(causal))
    mk = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    q, dout = mk(sum(lens_q), 4, 40), mk(sum(lens_q), 4, 40)
    k, v = mk(sum(lens_k), 2, 40), mk(sum(lens_k), 2, 40)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention_varlen(*leaves, cu_q, cu_k, causal=causal, backend="torch")
    got = (out.detach(), *torch.autograd.grad(out, leaves, dout))
    assert_flash_rule(got, varlen_reference(q, k, v, dout, cu_q, cu_k, causal, plain_same_dtype),
                      varlen_reference(q, k, v, dout, cu_q, cu_k, causal, exact))


def test_explicit_scale_and_default_scale():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 24, generator=g) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(attention(q, k, v, causal=False, scale=0.3), want)
    torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True))


# -- bad input --------------------------------------------------------------------------------------


def test_bad_inputs_are_dsl_errors():
    q = torch.randn(1, 6, 8, 16)
    kv = torch.randn(1, 4, 8, 16)
    with pytest.raises(DSLError, match="6 query heads cannot be grouped over 4"):
        attention(q, kv, kv)
    with pytest.raises(DSLError, match=r"\[B, H, S, D\] \(SDPA layout\)"):
        attention(torch.randn(8, 4, 16), torch.randn(8, 4, 16), torch.randn(8, 4, 16))
    with pytest.raises(DSLError, match="seq_q=9 > seq_k=8"):
        attention(torch.randn(1, 4, 9, 16), kv, kv, causal=True)
    with pytest.raises(DSLError, match="same batch and head dim"):
        attention(torch.randn(1, 4, 8, 32), kv, kv)
    with pytest.raises(DSLError, match="sequence 0: causal with seq_q=5 > seq_k=3"):
        attention_varlen(torch.randn(5, 2, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8),
                         torch.tensor([0, 5], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(DSLError, match=r"\[B, H, D\]"):
        paged_attention(torch.randn(2, 4, 1, 16), torch.randn(4, 8, 2, 16), torch.randn(4, 8, 2, 16),
                        torch.zeros(2, 2, dtype=torch.int32), torch.ones(2, dtype=torch.int32))
    with pytest.raises(DSLError, match="must broadcast to x"):
        rotary(torch.randn(2, 3, 8), torch.randn(3, 3, 8), torch.randn(3, 3, 8))


# -- paged decode -------------------------------------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(lens=st.lists(st.integers(0, 40), min_size=1, max_size=5), block=st.sampled_from([1, 4, 16]),
       heads=st.sampled_from([(4, 4), (4, 2), (8, 1)]), seed=st.integers(0, 1000))
def test_paged_equals_gathered_attention_random_tables(lens, block, heads, seed):
    lens = [1] + lens                              # always a sequence of length 1 (lengths 0 allowed too)
    max_blocks = -(-max(lens) // block) + 1         # every row of the table has unused (-1) slots
    q, kc, vc, table, lens_t = random_paged(len(lens), heads[0], heads[1], 32, block, max_blocks, lens,
                                            seed=seed)
    got = paged_attention(q, kc, vc, table, lens_t, backend="torch")
    torch.testing.assert_close(got.double(), gathered_decode(q, kc, vc, table, lens_t), rtol=1e-5, atol=1e-5)


def test_paged_equals_dense_attention_over_gathered_cache():
    # The contiguous view of the cache, run through dense attention with the last token as query.
    q, kc, vc, table, lens = random_paged(3, 4, 2, 40, 4, 6, [1, 9, 24], seed=7)
    got = paged_attention(q, kc, vc, table, lens)
    for b, n in enumerate(lens.tolist()):
        t = torch.arange(n)
        slots = table[b, t // 4].long() * 4 + t % 4
        k = kc.reshape(-1, 2, 40)[slots].transpose(0, 1)[None]
        v = vc.reshape(-1, 2, 40)[slots].transpose(0, 1)[None]
        dense = attention(q[b][None, :, None], k, v, causal=True)   # 1 query at the end: bottom-right
        torch.testing.assert_close(got[b], dense[0, :, 0], rtol=1e-5, atol=1e-6)


def test_tuning_inputs_give_real_work():
    from runtime.ops.attention_ops import attention_varlen_op, paged_attention_op

    q, kc, vc, table, lens = paged_attention_op.example_inputs(
        {"B": 2, "H": 4, "HKV": 2, "D": 16, "NB": 9, "P": 4, "MB": 3})
    ids = table.flatten().tolist()
    assert lens.tolist() == [12, 12] and len(set(ids)) == len(ids)
    assert paged_attention(q, kc, vc, table, lens).abs().sum() > 0
    args = attention_varlen_op.example_inputs({"TQ": 10, "TK": 13, "H": 2, "HKV": 1, "D": 8, "N": 4})
    assert args[3].tolist() == [0, 3, 6, 10] and args[4].tolist() == [0, 4, 8, 13]
    assert attention_varlen(*args).shape == (10, 2, 8)


# -- rotary ---------------------------------------------------------------------------------------------


def test_rotary_op_and_tables():
    pos = torch.arange(6).expand(2, 6)
    cos, sin = rope_tables(pos, 8, theta=10000.0)
    assert cos.shape == (2, 6, 8) and torch.equal(cos[..., :4], cos[..., 4:])
    x = torch.randn(2, 6, 3, 8)
    y = rotary(x, cos[:, :, None], sin[:, :, None])
    angle = pos[..., None].double() * 10000.0 ** (-torch.arange(0, 8, 2).double() / 8)
    z = torch.complex(x[..., :4].double(), x[..., 4:].double()) * torch.exp(1j * angle)[:, :, None]
    torch.testing.assert_close(y.double(), torch.cat([z.real, z.imag], -1), rtol=1e-5, atol=1e-5)


# -- the Attention module -----------------------------------------------------------------------------------


def _reference_module(m: Attention, x: torch.Tensor) -> torch.Tensor:
    """Independent PyTorch: split qkv, rotate halves, SDPA causal with GQA, project out."""
    b, s, _ = x.shape
    h, h_kv, d = m.n_heads, m.n_kv_heads, m.head_dim
    q, k, v = (x @ m.qkv.weight.T).split([h * d, h_kv * d, h_kv * d], -1)
    q, k, v = q.view(b, s, h, d), k.view(b, s, h_kv, d), v.view(b, s, h_kv, d)
    inv = m.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(s, dtype=torch.float64)[:, None] * inv
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos().to(x.dtype)[None, :, None], ang.sin().to(x.dtype)[None, :, None]

    def rot(t):
        return t * cos + torch.cat([-t[..., d // 2:], t[..., : d // 2]], -1) * sin

    o = F.scaled_dot_product_attention(rot(q).transpose(1, 2), rot(k).transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=True)
    return o.transpose(1, 2).reshape(b, s, h * d) @ m.o_proj.weight.T


def _grads(m, x, fn):
    m.zero_grad()
    x = x.clone().requires_grad_()
    y = fn(x)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("backend,dim,heads,kv_heads,seq", [("torch", 64, 4, 2, 11), ("torch", 48, 4, 1, 7),
                                                             ("triton", 32, 2, 1, 9)])
def test_attention_module_training_matches_reference(backend, dim, heads, kv_heads, seq):
    torch.manual_seed(0)
    m = Attention(dim, heads, kv_heads, backend=backend)
    x = torch.randn(2, seq, dim)
    y, gx, gp = _grads(m, x, m)
    y_ref, gx_ref, gp_ref = _grads(m, x, lambda t: _reference_module(m, t))
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-4)
    for name in gp:
        torch.testing.assert_close(gp[name], gp_ref[name], rtol=1e-4, atol=1e-4)


def test_attention_module_decode_with_caches_equals_full_forward():
    torch.manual_seed(1)
    m = Attention(64, 4, 2)
    x = torch.randn(2, 12, 64)
    full = m(x).detach()
    with torch.no_grad():
        cache = ContiguousKVCache(2, 16, 2, 16)
        assert isinstance(cache, KVCache)
        steps = [m(x[:, :5], kv_cache=cache)] + [m(x[:, i:i + 1], kv_cache=cache) for i in range(5, 12)]
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
        assert cache.seq_lens.tolist() == [12, 12]
        # paged cache, shuffled blocks with an unused slot, chunked prefill of 3 + 4 then decode
        table = torch.tensor([[6, 1, 4, -1], [0, 7, 3, 5]], dtype=torch.int32)
        paged = PagedKVCache(8, 4, 2, 16, table)
        steps = [m(x[:, :3], kv_cache=paged), m(x[:, 3:7], kv_cache=paged)]
        steps += [m(x[:, i:i + 1], kv_cache=paged) for i in range(7, 12)]
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


def test_attention_module_validates_configuration():
    with pytest.raises(DSLError, match="multiple of n_kv_heads"):
        Attention(64, 6, 4)
    with pytest.raises(DSLError, match="even head_dim"):
        Attention(30, 2, head_dim=15)
    with pytest.raises(DSLError, match=r"\[B, S, 64\]"):
        Attention(64, 4)(torch.randn(3, 64))


def test_rmsnorm_module_forward_and_backward():
    torch.manual_seed(2)
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.mul_(torch.randn(48))
    x = torch.randn(3, 5, 48, requires_grad=True)
    y = norm(x)
    x2 = x.detach().clone().requires_grad_()
    w2 = norm.weight.detach().clone().requires_grad_()
    want = F.rms_norm(x2, (48,), w2, 1e-5)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    ct = torch.randn_like(y)
    y.backward(ct)
    want.backward(ct)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norm.weight.grad, w2.grad, rtol=1e-4, atol=1e-5)
    with pytest.raises(DSLError, match="last dim"):
        norm(torch.randn(2, 47))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_demo_cases_match_their_references(backend):
    from runtime.compiler import compile as kdsl_compile

    for name, compiled, args, ref in demo_cases():
        got = kdsl_compile(compiled.op, backend=backend)(*args)
        torch.testing.assert_close(got, ref(*args), rtol=1e-4, atol=1e-5, msg=name)


# -- GPU (bf16 is only right on a real GPU) -------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_rule_on_gpu(gpu, dtype, causal):
    g = torch.Generator(device=gpu).manual_seed(0)
    mk = lambda *shape: torch.randn(*shape, generator=g, device=gpu).to(dtype)  # noqa: E731
    q, k, v, dout = mk(2, 8, 200, 80), mk(2, 2, 333, 80), mk(2, 2, 333, 80), mk(2, 8, 200, 80)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, causal=causal, backend="triton")
    got = (out.detach(), *torch.autograd.grad(out, leaves, dout))
    assert_flash_rule(got, plain_same_dtype(q, k, v, dout, causal), exact(q, k, v, dout, causal))


@pytest.mark.gpu
def test_paged_decode_on_gpu(gpu):
    q, kc, vc, table, lens = random_paged(6, 32, 8, 128, 16, 64, [1, 17, 1000, 1024, 0, 513],
                                          dtype=torch.float16)
    got = paged_attention(*(t.to(gpu) for t in (q, kc, vc, table, lens)), backend="triton")
    want = gathered_decode(q, kc, vc, table, lens)
    assert (got.double().cpu() - want).abs().max() < 4e-3
    assert math.isfinite(got.float().abs().sum().item())
