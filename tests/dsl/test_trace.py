import pytest
import torch

import dsl
from dsl import DSLError


@dsl.op
def gated(x: dsl.Tensor["M", "K", dsl.f32], w: dsl.Tensor["N", "K", dsl.f32], b: dsl.Tensor["N", dsl.f32],
          *, alpha: float = 1.0):
    return dsl.silu(x @ w.T + b) * alpha


def test_trace_builds_typed_graph():
    g = gated.graph
    ops = [n.op for n in g.topo()]
    assert ops.count("input") == 3
    assert "matmul" in ops and "silu" in ops
    (out,) = g.output_types()
    assert out.shape == ("M", "N") and out.dtype is dsl.f32
    assert all(n.line for n in g.topo() if n.op != "input")
    assert "test_trace.py" in g.node(g.outputs[0].node).line


def test_static_attributes_trace_separately():
    g1 = gated.trace(None, alpha=1.0)
    g2 = gated.trace(None, alpha=2.0)
    assert g1 is not g2
    assert gated.trace(None, alpha=2.0) is g2


def test_eager_call_runs_reference():
    x, w, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)
    torch.testing.assert_close(gated(x, w, b, alpha=0.5), torch.nn.functional.silu(x @ w.T + b) * 0.5)


def test_composition_inlines_ops():
    @dsl.op
    def twice(x: dsl.Tensor["M", "K"], w: dsl.Tensor["N", "K"], b: dsl.Tensor["N"]):
        return gated(x, w, b) + gated(x, w, b, alpha=2.0)

    assert sum(n.op == "matmul" for n in twice.graph.topo()) == 1  # CSE merged the two matmuls


def test_symbolic_reshape_and_products():
    @dsl.op
    def flat(x: dsl.Tensor["B", "S", "D"]):
        return dsl.reshape(x, (-1, "D")) * 2.0

    (t,) = flat.graph.output_types()
    assert t.shape == ("B*S", "D")
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(flat(x), x.reshape(6, 4) * 2)


def test_int_dim_against_symbol_checked_at_call():
    @dsl.op
    def f(x: dsl.Tensor["M", "K"], w: dsl.Tensor[8, "N"]):
        return x @ w

    f(torch.randn(2, 8), torch.randn(8, 3))
    with pytest.raises(DSLError, match=r"K=5 but 8|8 but K=5|shape mismatch"):
        f(torch.randn(2, 5), torch.randn(8, 3))


# -- bad input ---------------------------------------------------------------------------------

def test_wrong_rank_names_argument():
    with pytest.raises(DSLError) as e:
        gated(torch.randn(3), torch.randn(5, 4), torch.randn(5))
    msg = str(e.value)
    assert "gated" in msg and "'x'" in msg and "rank 2" in msg and "test_trace.py" in msg


def test_wrong_dtype():
    with pytest.raises(DSLError, match="must be f32, got f16"):
        gated(torch.randn(3, 4).half(), torch.randn(5, 4), torch.randn(5))


def test_inconsistent_symbol():
    with pytest.raises(DSLError, match=r"K=4"):
        gated(torch.randn(3, 4), torch.randn(5, 6), torch.randn(5))


def test_non_static_keyword():
    with pytest.raises(DSLError, match="static attribute"):
        gated(torch.randn(3, 4), torch.randn(5, 4), torch.randn(5), alpha=torch.tensor(1.0))
    with pytest.raises(DSLError, match="unknown keyword 'beta'"):
        gated(torch.randn(3, 4), torch.randn(5, 4), torch.randn(5), beta=1.0)


def test_shape_mismatch_inside_op_names_node_and_line():
    @dsl.op
    def bad(x: dsl.Tensor["M", "K"], y: dsl.Tensor["N", "K"]):
        return x + y  # the mismatch under test

    with pytest.raises(DSLError) as e:
        bad.graph
    msg = str(e.value)
    assert "op 'bad'" in msg and "(add)" in msg and "return x + y" in msg and "M vs N" in msg


def test_unknown_primitive():
    @dsl.op
    def bad(x: dsl.Tensor["M"]):
        return dsl.emit(x.graph, "frobnicate", [x.ref])

    with pytest.raises(DSLError, match="unknown primitive 'frobnicate'"):
        bad.graph


def test_missing_annotation_and_defaults():
    with pytest.raises(DSLError, match="needs a dsl.Tensor"):
        @dsl.op
        def bad(x):
            return x

    with pytest.raises(DSLError, match="needs a default"):
        @dsl.op
        def bad2(x: dsl.Tensor["M"], *, k: int):
            return x


def test_python_control_flow_on_tensors_is_an_error():
    @dsl.op
    def bad(x: dsl.Tensor["M"]):
        return x if x > 0 else -x

    with pytest.raises(DSLError, match="truth value"):
        bad.graph


def test_slicing_rules():
    @dsl.op
    def ok(x: dsl.Tensor["M", 10]):
        return x[..., 2:8:2]

    assert ok.graph.output_types()[0].shape == ("M", 3)

    @dsl.op
    def bad(x: dsl.Tensor["M", 10]):
        return x[1:2, :]

    with pytest.raises(DSLError, match="only slicing on the last axis"):
        bad.graph


def test_dtype_mix_requires_cast():
    @dsl.op
    def bad(x: dsl.Tensor["M", dsl.f32], y: dsl.Tensor["M", dsl.f16]):
        return x + y

    with pytest.raises(DSLError, match="use dsl.cast"):
        bad.graph
