"""Generated kernels (Triton interpreter) against the graph's reference semantics and against
independent PyTorch computations, across dtypes and edge shapes."""

import pytest
import torch
import torch.nn.functional as F

import dsl
import runtime

T = dsl.Tensor


@dsl.op
def readme_op(x: T["M", "K"], w: T["N", "K"], b: T["N"], r: T["M", "N"]):
    return dsl.gelu(x @ w.T + b) * 0.5 + r


def _args(m, n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return mk(m, k), mk(n, k), mk(n), mk(m, n)


def _independent(x, w, b, r):
    return F.gelu(x @ w.T + b) * 0.5 + r


@pytest.mark.parametrize("m,n,k", [(37, 29, 45), (1, 1, 1), (65, 130, 17), (0, 8, 16), (16, 16, 0)])
def test_gemm_epilogue_fp32(m, n, k):
    args = _args(m, n, k, torch.float32)
    got = runtime.compile(readme_op, backend="triton")(*args)
    want = _independent(*args)
    assert got.shape == (m, n)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_gemm_epilogue_fp16_no_worse_than_twice_torch():
    args = _args(67, 45, 83, torch.float16, seed=1)
    exact = _independent(*[a.double() for a in args])
    got = runtime.compile(readme_op, backend="triton")(*args)
    plain = _independent(*[a.float() for a in args]).half()  # what plain PyTorch gives in fp16
    err_kdsl = (got.double() - exact).abs().max().item()
    err_torch = (plain.double() - exact).abs().max().item()
    assert got.dtype == torch.float16
    assert err_kdsl <= 2 * err_torch + 1e-6


def test_gemm_non_contiguous_operands_and_batched():
    @dsl.op
    def bmm(a: T["B", "M", "K"], b: T["B", "K", "N"], s: T["M", 1]):
        return dsl.relu(a @ b) * s

    a = torch.randn(3, 20, 9).transpose(1, 2).contiguous().transpose(1, 2)  # strided view
    b = torch.randn(3, 11, 9).transpose(1, 2)
    s = torch.randn(20, 1)
    got = runtime.compile(bmm, backend="triton")(a, b, s)
    torch.testing.assert_close(got, torch.relu(a @ b) * s, rtol=1e-4, atol=1e-5)


def test_gemm_config_override_changes_tiles_not_results():
    args = _args(40, 24, 70, torch.float32)
    f = runtime.compile(readme_op, backend="triton",
                        configs={"gemm": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 1,
                                          "num_warps": 2, "num_stages": 1}})
    rows = f.explain(*args)
    assert rows[0].source == "override" and rows[0].config["BLOCK_M"] == 16
    torch.testing.assert_close(f(*args), _independent(*args), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,axis", [((5, 7, 33), 1), ((3, 300), -1), ((1,), 0), ((4, 1, 2), 0)])
def test_reductions_and_rowwise(dtype, shape, axis):
    @dsl.op
    def reds(x: T["A"] if len(shape) == 1 else T["A", "B"] if len(shape) == 2 else T["A", "B", "C"]):
        return (dsl.sum(x * x, axis=axis), dsl.max(x, axis=axis), dsl.mean(dsl.exp(x), axis=axis) + 1.0,
                dsl.softmax(x * 0.5, axis=axis))

    x = torch.randn(*shape).to(dtype)
    got = runtime.compile(reds, backend="triton")(x)
    xf = x.float()
    want = ((xf * xf).sum(axis), xf.amax(axis), xf.exp().mean(axis) + 1, torch.softmax(xf * 0.5, axis))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w, **tol)


def test_rmsnorm_with_fused_epilogue():
    @dsl.op
    def norm(x: T["M", "D"], w: T["D"], r: T["M", "D"]):
        return dsl.rmsnorm(x + r, w, eps=1e-6) * 2.0 + r

    x, w, r = torch.randn(9, 130), torch.randn(130), torch.randn(9, 130)
    f = runtime.compile(norm, backend="triton")
    assert [k.template for k in f.kernels] == ["reduction"]  # prologue and epilogue fused
    h = x + r
    want = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w * 2 + r
    torch.testing.assert_close(f(x, w, r), want, rtol=1e-4, atol=1e-5)


def test_pointwise_broadcast_and_fusion_into_one_kernel():
    @dsl.op
    def pw(x: T["M", "N"], y: T["N"], c: T["M", 1]):
        a = dsl.where(x > 0, dsl.tanh(x), dsl.sigmoid(y * 2.0))
        return dsl.clamp(a * c, -0.5, 0.5) + dsl.abs(y) / (dsl.relu(x) + 1.0)

    x, y, c = torch.randn(6, 11), torch.randn(11), torch.randn(6, 1)
    f = runtime.compile(pw, backend="triton")
    templates = [k.template for k in f.kernels]
    assert templates.count("pointwise") <= 2
    a = torch.where(x > 0, torch.tanh(x), torch.sigmoid(y * 2))
    want = torch.clamp(a * c, -0.5, 0.5) + y.abs() / (torch.relu(x) + 1)
    torch.testing.assert_close(f(x, y, c), want, rtol=1e-5, atol=1e-6)


def test_empty_tensors():
    @dsl.op
    def f(x: T["M", "N"]):
        return dsl.softmax(x) * 2.0, dsl.sum(x, axis=0)

    a, b = runtime.compile(f, backend="triton")(torch.randn(0, 5))
    assert a.shape == (0, 5) and b.shape == (5,) and torch.all(b == 0)


def test_sources_use_int64_offsets_and_name_their_nodes():
    for k in runtime.compile(readme_op, backend="triton").kernels:
        assert ".to(tl.int64)" in k.source
        assert "%" in k.source.splitlines()[1]  # the header names the IR nodes
