"""Random elementwise/reduction programs: each either compiles and matches the reference on the
Triton backend, or is rejected with a DSLError naming the node (never an internal traceback)."""

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import dsl
import runtime
from dsl import DSLError

UNARY = ["exp", "tanh", "sigmoid", "silu", "gelu", "relu", "abs", "neg", "sqrt_abs", "rsqrt_abs1"]
BINARY = ["add", "sub", "mul", "div_safe", "maximum", "minimum", "where_gt"]
REDUCE = ["sum", "mean", "max", "softmax"]

step = st.one_of(
    st.tuples(st.just("unary"), st.sampled_from(UNARY), st.integers(0, 20)),
    st.tuples(st.just("binary"), st.sampled_from(BINARY), st.integers(0, 20), st.integers(0, 20)),
    st.tuples(st.just("reduce"), st.sampled_from(REDUCE), st.integers(0, 20), st.integers(-2, 1)),
    st.tuples(st.just("scalar"), st.sampled_from(["add", "mul"]), st.integers(0, 20),
              st.floats(-2, 2, allow_nan=False)),
)


def apply(kind, pool, s):
    pick = lambda i: pool[i % len(pool)]  # noqa: E731
    if kind == "unary":
        x = pick(s[2])
        name = s[1]
        if name == "sqrt_abs":
            return dsl.sqrt(dsl.abs(x))
        if name == "rsqrt_abs1":
            return dsl.rsqrt(dsl.abs(x) + 1.0)
        return getattr(dsl, name)(x)
    if kind == "binary":
        a, b = pick(s[2]), pick(s[3])
        if s[1] == "div_safe":
            return a / (dsl.abs(b) + 1.0)
        if s[1] == "where_gt":
            return dsl.where(a > b, a, b * 0.5)
        return getattr(dsl, s[1])(a, b)
    if kind == "reduce":
        x = pick(s[2])
        if s[1] == "softmax":
            return dsl.softmax(x, axis=s[3])
        return getattr(dsl, s[1])(x, axis=s[3])
    x = pick(s[2])
    return x + s[3] if s[1] == "add" else x * s[3]


def make_op(steps):
    def body(a, b, c):
        pool = [a, b, c]
        for s in steps:
            pool.append(apply(s[0], pool, s))
        return pool[-1], pool[-2]

    body.__annotations__ = {"a": dsl.Tensor["M", "N"], "b": dsl.Tensor["N"], "c": dsl.Tensor["M", 1]}
    body.__name__ = "random_program"
    return dsl.op(body)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, min_size=1, max_size=6), m=st.integers(1, 37), n=st.integers(1, 70))
@example(steps=[("reduce", "sum", 1, 0), ("unary", "exp", 3)], m=1, n=5)   # a 0-d pointwise kernel
def test_random_program(steps, m, n):
    op = make_op(steps)
    try:
        op.graph
    except DSLError as exc:
        # Rejections must point at the node that is wrong.
        msg = str(exc)
        assert "op 'random_program'" in msg and "node %" in msg and "test_random_graphs.py" in msg
        return
    args = (torch.randn(m, n), torch.randn(n), torch.randn(m, 1))
    expected = runtime.compile(op, backend="torch")(*args)
    got = runtime.compile(op, backend="triton")(*args)
    for e, g in zip(expected, got):
        assert e.shape == g.shape and e.dtype == g.dtype
        scale = max(1.0, e.abs().nan_to_num(0, 0, 0).max().item()) if e.numel() else 1.0
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * scale, equal_nan=True)


def test_generator_reaches_both_outcomes():
    ok = make_op([("binary", "add", 0, 1), ("reduce", "softmax", 3, -1)])
    assert len(ok.graph) > 4
    # sum over axis 0 of [M, N] gives [N]; adding it to c [M, 1] broadcasts, then reducing the
    # rank-1 result over axis 1 must be rejected with the node named.
    bad = make_op([("reduce", "sum", 0, 0), ("reduce", "max", 3, 1)])
    with pytest.raises(DSLError, match=r"node %\d+ \(max\).*axis 1 out of range"):
        bad.graph
