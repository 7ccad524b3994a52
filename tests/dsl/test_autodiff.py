"""Gradients of compiled ops against torch.autograd: every primitive, gradcheck in float64 on the
torch backend and fp32 comparisons on the triton backend."""

import pytest
import torch

import dsl
import runtime

T = dsl.Tensor


def _pos(x):  # keep log/sqrt/pow on their real domain
    return dsl.abs(x) + 0.5


CASES = {
    "add": lambda x, y, v: x + y,
    "sub": lambda x, y, v: x - v,
    "mul": lambda x, y, v: x * y,
    "div": lambda x, y, v: x / (dsl.abs(v) + 1.0),
    "pow": lambda x, y, v: _pos(x) ** 1.7 + dsl.pow(_pos(x), _pos(y)),
    "maximum": lambda x, y, v: dsl.maximum(x, y),
    "minimum": lambda x, y, v: dsl.minimum(x, v),
    "clamp": lambda x, y, v: dsl.clamp(x, -0.3, 0.4),
    "neg_abs": lambda x, y, v: -dsl.abs(x),
    "exp_log": lambda x, y, v: dsl.exp(x) + dsl.log(_pos(y)),
    "sqrt_rsqrt": lambda x, y, v: dsl.sqrt(_pos(x)) + dsl.rsqrt(_pos(y)),
    "activations": lambda x, y, v: dsl.silu(x) + dsl.gelu(y) + dsl.relu(x) + dsl.sigmoid(y) + dsl.tanh(x),
    "erf": lambda x, y, v: dsl.erf(x),
    "where": lambda x, y, v: dsl.where(x > y, x * 2.0, v),
    "cast": lambda x, y, v: dsl.cast(dsl.cast(x, dsl.f32), x.dtype) * y,
    "sum_mean_max": lambda x, y, v: dsl.sum(x, axis=0) + dsl.mean(y, axis=0) + dsl.max(x * y, axis=0),
    "keepdim": lambda x, y, v: x - dsl.mean(x, axis=-1, keepdim=True),
    "softmax": lambda x, y, v: dsl.softmax(x * y, axis=-1) + dsl.softmax(x, axis=0),
    "rmsnorm": lambda x, y, v: dsl.rmsnorm(x, v, eps=1e-5),
    "reshape_transpose": lambda x, y, v: dsl.reshape(x.T, (-1,)).reshape(("N", "M")).T * y,
    "slice": lambda x, y, v: x[..., 1:4] * 2.0,
    "matmul": lambda x, y, v: x @ y.T,
    "matmul_bias_act": lambda x, y, v: dsl.gelu(x.T @ y + v),
}


def make(name):
    fn = CASES[name]

    def body(x, y, v):
        return fn(x, y, v)

    body.__annotations__ = {"x": T["M", "N"], "y": T["M", "N"], "v": T["N"]}
    body.__name__ = f"grad_{name}"
    return dsl.op(body)


def inputs(dtype, m=4, n=6):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(m, n, generator=g, dtype=dtype), torch.randn(m, n, generator=g, dtype=dtype),
            torch.randn(n, generator=g, dtype=dtype)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradcheck_float64_torch_backend(name):
    f = runtime.compile(make(name), backend="torch")
    args = [a.requires_grad_() for a in inputs(torch.float64)]
    # The cast case rounds through fp32, so its finite differences need a larger step.
    eps, atol = (1e-3, 1e-3) if name == "cast" else (1e-6, 1e-5)
    assert torch.autograd.gradcheck(lambda *a: f(*a), args, eps=eps, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("name", ["activations", "softmax", "rmsnorm", "matmul_bias_act", "sum_mean_max",
                                  "slice", "where", "pow"])
def test_triton_backend_gradients_match_autograd(name):
    op = make(name)
    a1 = [a.requires_grad_() for a in inputs(torch.float32, 5, 7)]
    a2 = [a.detach().clone().requires_grad_() for a in a1]
    y1 = runtime.compile(op, backend="triton")(*a1)
    y2 = runtime.compile(op, backend="torch")(*a2)
    w = torch.randn_like(y1)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-5)
    for g1, g2 in zip(a1, a2):
        torch.testing.assert_close(g1.grad, g2.grad, rtol=1e-4, atol=1e-4)


def test_backward_graph_is_an_ordinary_graph():
    g = dsl.grad(make("matmul_bias_act").graph)
    assert [n.attr["name"] for n in (g.node(i) for i in g.inputs)] == ["x", "y", "v", "grad_0"]
    assert len(g.outputs) == 3
    assert sum(n.op == "matmul" for n in g.topo()) >= 2


def test_integer_inputs_get_no_gradient():
    @dsl.op
    def f(x: T["M", dsl.f64], i: T["M", dsl.i64]):
        return x * dsl.cast(i, dsl.f64)

    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    i = torch.arange(5)
    runtime.compile(f, backend="torch")(x, i).sum().backward()
    torch.testing.assert_close(x.grad, i.double())
