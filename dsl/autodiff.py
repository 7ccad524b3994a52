"""Reverse mode: build the backward graph of a graph from each primitive's vector-Jacobian rule.

The backward graph takes the forward inputs followed by one cotangent per forward output and
returns one gradient per differentiable (floating-point) forward input. The forward computation
is replayed inside it and dead code elimination keeps only what the gradients need, so the
backward graph is an ordinary graph that compiles like any other (and fuses freely).
"""

from __future__ import annotations

import functools
import inspect

from . import primitives as P
from .errors import DSLError
from .graph import Graph, Ref, TensorType
from .registry import get
from .value import Value


def grad(graph: Graph) -> Graph:
    from . import passes

    bwd = Graph(f"{graph.name}_backward")
    vals: dict[Ref, Value] = {}
    for index, nid in enumerate(graph.inputs):
        node = graph.node(nid)
        new = bwd.add_node("input", [], {"name": node.attr["name"], "index": index}, node.types, node.line)
        bwd.inputs.append(new.id)
        vals[Ref(nid)] = Value(bwd, Ref(new.id))
    cot_inputs = []
    for i, ref in enumerate(graph.outputs):
        t = graph.type_of(ref)
        new = bwd.add_node("input", [], {"name": f"grad_{i}", "index": len(bwd.inputs)},
                           (TensorType(t.shape, t.dtype),), None)
        bwd.inputs.append(new.id)
        cot_inputs.append(Value(bwd, Ref(new.id)))
    bwd.constraints = list(graph.constraints)

    # Replay the forward pass.
    order = graph.topo()
    for node in order:
        if node.op == "input":
            continue
        ins = [vals[r] for r in node.inputs]
        from .registry import emit

        out = emit(bwd, node.op, [v.ref for v in ins], node.attr, line=node.line)
        outs = out if isinstance(out, tuple) else (out,)
        for i, v in enumerate(outs):
            vals[Ref(node.id, i)] = v

    # Accumulate cotangents in reverse topological order.
    cts: dict[Ref, Value] = {}

    def accumulate(ref: Ref, ct: Value | None):
        if ct is None:
            return
        cts[ref] = ct if ref not in cts else P.add(cts[ref], ct)

    for ref, ct in zip(graph.outputs, cot_inputs):
        if graph.type_of(ref).dtype.is_float:
            accumulate(ref, ct)
    for node in reversed(order):
        prim = get(node.op)
        out_cts = [cts.get(Ref(node.id, i)) for i in range(len(node.types))]
        if all(c is None for c in out_cts) or node.op == "input" or not node.inputs:
            continue
        if prim.vjp is None:
            if prim.differentiable and any(graph.type_of(r).dtype.is_float for r in node.inputs):
                raise DSLError(f"primitive '{node.op}' has no vector-Jacobian rule", op=graph.name,
                               node=node.label, line=node.line)
            continue
        filled = [c if c is not None else _zeros_like(vals[Ref(node.id, i)])
                  for i, c in enumerate(out_cts)]
        ins = [vals[r] for r in node.inputs]
        outs = [vals[Ref(node.id, i)] for i in range(len(node.types))]
        grads = prim.vjp(ins, outs, filled, **_accepted(prim.vjp, node.attr))
        for r, g in zip(node.inputs, grads):
            if g is not None and graph.type_of(r).dtype.is_float:
                if tuple(g.shape) != tuple(graph.type_of(r).shape):
                    g = P.unbroadcast(g, graph.type_of(r).shape)
                if g.dtype is not graph.type_of(r).dtype:
                    g = P.cast(g, graph.type_of(r).dtype)
                accumulate(r, g)

    outputs = []
    for nid in graph.inputs:
        t = graph.node(nid).type
        if not t.dtype.is_float:
            continue
        g = cts.get(Ref(nid))
        if g is None:
            g = _zeros_like(vals[Ref(nid)])
        outputs.append(g.ref)
    bwd.outputs = outputs
    return passes.optimize(bwd)


@functools.lru_cache(maxsize=None)
def _params(fn) -> tuple[bool, frozenset]:
    sig = inspect.signature(fn)
    var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    return var_kw, frozenset(sig.parameters)


def _accepted(fn, attrs: dict) -> dict:
    """The attributes a VJP rule asks for (rules that need none may omit them)."""
    var_kw, names = _params(fn)
    return dict(attrs) if var_kw else {k: v for k, v in attrs.items() if k in names}


def _zeros_like(v: Value) -> Value:
    zero = P.const(v.graph, 0.0, v.dtype)
    return P.expand(zero, v.shape) if v.shape else zero


def differentiable_inputs(graph: Graph) -> list[int]:
    """Positions of the forward inputs that get a gradient (floating-point ones)."""
    return [i for i, nid in enumerate(graph.inputs) if graph.node(nid).type.dtype.is_float]
