import pytest
import torch

import dsl
import runtime
from dsl import DSLError

T = dsl.Tensor


@dsl.op
def gated_linear(x: T["M", "K"], w: T["N", "K"], b: T["N"], *, alpha: float = 1.0):
    return dsl.silu(x @ w.T + b) * alpha


def _args():
    g = torch.Generator().manual_seed(0)
    return torch.randn(7, 12, generator=g), torch.randn(5, 12, generator=g), torch.randn(5, generator=g)


def _want(x, w, b, alpha):
    return torch.nn.functional.silu(x @ w.T + b) * alpha


@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
def test_backends_agree(backend):
    x, w, b = _args()
    torch.testing.assert_close(runtime.compile(gated_linear, backend=backend)(x, w, b, alpha=0.5),
                               _want(x, w, b, 0.5), rtol=1e-4, atol=1e-5)


def test_kernels_and_explain():
    f = runtime.compile(gated_linear, backend="triton")
    (k,) = f.kernels
    assert k.template == "gemm" and "@triton.jit" in k.source and len(k.source_hash) == 16
    rows = f.explain(*_args())
    assert rows[0].problem == {"B": 1, "M": 7, "N": 5, "K": 12}
    assert rows[0].source in {"default", "measured", "nearest", "shipped", "predicted", "override"}
    assert "gemm" in str(rows)
    assert str(runtime.compile(gated_linear, backend="torch").explain(*_args())).startswith("no kernels")


def test_autograd_through_triton_backend():
    x, w, b = [t.requires_grad_() for t in _args()]
    x2, w2, b2 = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    runtime.compile(gated_linear, backend="triton")(x, w, b, alpha=0.3).sum().backward()
    _want(x2, w2, b2, 0.3).sum().backward()
    for g1, g2 in [(x.grad, x2.grad), (w.grad, w2.grad), (b.grad, b2.grad)]:
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)


def test_torch_compile_traces_through_without_graph_breaks():
    f = runtime.compile(gated_linear, backend="torch")
    compiled = torch.compile(lambda x, w, b: f(x, w, b, alpha=2.0) + 1, fullgraph=True, backend="eager")
    x, w, b = _args()
    torch.testing.assert_close(compiled(x, w, b), _want(x, w, b, 2.0) + 1, rtol=1e-5, atol=1e-6)


def test_opcheck_custom_op_registration():
    f = runtime.compile(gated_linear, backend="torch")
    x, w, b = _args()
    torch.library.opcheck(torch.ops.kdsl.call.default, (f.key, "alpha=0.5", [x, w, b]),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_outputs_never_alias_inputs():
    @dsl.op
    def ident(x: T["M"]):
        return x

    x = torch.randn(4)
    y = runtime.compile(ident, backend="torch")(x)
    assert y.data_ptr() != x.data_ptr()
    torch.testing.assert_close(x, y)


def test_bad_backend_and_bad_op():
    with pytest.raises(DSLError, match="unknown backend"):
        runtime.compile(gated_linear, backend="cuda")
    with pytest.raises(DSLError, match="@dsl.op"):
        runtime.compile(lambda x: x)


def test_bad_call_is_a_dsl_error_not_a_traceback():
    f = runtime.compile(gated_linear, backend="triton")
    x, w, b = _args()
    with pytest.raises(DSLError, match="'b' must have rank 1"):
        f(x, w, b[None])
    with pytest.raises(DSLError, match="static attribute"):
        f(x, w, b, alpha="big")
