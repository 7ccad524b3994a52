"""The primitive registry and the one place nodes are created during tracing (``emit``).

A primitive declares its kind (how the partitioner treats it), shape/dtype inference, reference
semantics in PyTorch (the oracle and the CPU path) and a vector-Jacobian rule written with DSL
values, so a backward graph is just another traced graph.
"""

from __future__ import annotations

import dataclasses
import linecache
import os
import sys
from typing import Any, Callable, Sequence

from .dtypes import DType
from .errors import DSLError
from .graph import Graph, Ref, TensorType

# Kinds the partitioner understands.
ELEMENTWISE = "elementwise"   # output shape = broadcast of inputs; printed into fused code
REDUCTION = "reduction"       # reduces one axis
ROWWISE = "rowwise"           # normalises along one axis, same shape out (softmax, rmsnorm)
VIEW = "view"                 # reshape/transpose/slice: zero-copy in the runtime
ANCHOR = "anchor"             # gets its own template (matmul, grouped_matmul, attention, ...)
EXTERN = "extern"             # run by its reference semantics in every backend (rare glue ops)
SOURCE = "source"             # input, const


class ShapeError(Exception):
    """Raised by inference rules; ``emit`` turns it into a DSLError naming op, node and line."""


@dataclasses.dataclass(frozen=True)
class Primitive:
    name: str
    kind: str
    infer: Callable[[list[TensorType], dict], TensorType | tuple[TensorType, ...]]
    ref: Callable[..., Any]                       # (tensors..., **attrs) -> tensor | tuple
    vjp: Callable[..., Sequence[Any]] | None = None   # (inputs, outputs, cotangents, **attrs) -> grads
    differentiable: bool = True


PRIMITIVES: dict[str, Primitive] = {}


def register(prim: Primitive) -> Primitive:
    PRIMITIVES[prim.name] = prim
    return prim


def get(name: str, *, graph: Graph | None = None) -> Primitive:
    try:
        return PRIMITIVES[name]
    except KeyError:
        raise DSLError(f"unknown primitive '{name}'", op=graph.name if graph else None) from None


# -- tracing state ---------------------------------------------------------------------------

_DSL_DIR = os.path.dirname(os.path.abspath(__file__))


def user_line() -> str | None:
    """The first stack frame outside the dsl package: the user's source line."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(_DSL_DIR + os.sep):
            text = linecache.getline(filename, frame.f_lineno).strip()
            short = os.path.relpath(filename) if not os.path.relpath(filename).startswith("..") else filename
            return f"{short}:{frame.f_lineno}" + (f": {text}" if text else "")
        frame = frame.f_back
    return None


def emit(graph: Graph, op: str, inputs: Sequence[Ref], attrs: dict | None = None,
         line: str | None = None):
    """Infer types, add the node, return its output Value(s)."""
    from .value import Value

    prim = get(op, graph=graph)
    attrs = dict(attrs or {})
    line = line or user_line()
    in_types = [graph.type_of(r) for r in inputs]
    _pending_constraints.clear()
    try:
        out = prim.infer(in_types, attrs)
    except ShapeError as exc:
        raise DSLError(str(exc), op=graph.name, node=f"%{graph._next} ({op})", line=line) from None
    types = out if isinstance(out, tuple) else (out,)
    node = graph.add_node(op, inputs, attrs, types, line)
    graph.constraints.extend((a, b, node.id) for a, b in _pending_constraints)
    _pending_constraints.clear()
    vals = tuple(Value(graph, Ref(node.id, i)) for i in range(len(types)))
    return vals if isinstance(out, tuple) else vals[0]


# -- shape helpers used by inference rules ---------------------------------------------------

_pending_constraints: list[tuple[object, object]] = []


def unify_dim(a, b, what: str):
    """Two dims that must be equal. A symbol against an int is checked at call time."""
    if a == b:
        return a
    if isinstance(a, int) and isinstance(b, int):
        raise ShapeError(f"shape mismatch: {what}: {a} vs {b}")
    if isinstance(a, str) and isinstance(b, str) and "*" not in a + b:
        raise ShapeError(f"shape mismatch: {what}: {a} vs {b}")
    # A symbol against an int, or a product of symbols ("2*H") against another expression, can only
    # be decided once the symbols are bound: checked at call time.
    _pending_constraints.append((a, b))
    return a if isinstance(a, int) or "*" not in a else b


def broadcast_shapes(*shapes: tuple) -> tuple:
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for axis in range(rank):
        dim = 1
        for s in shapes:
            k = axis - (rank - len(s))
            if k < 0:
                continue
            d = s[k]
            if d == 1:
                continue
            if dim == 1:
                dim = d
            elif d != dim:
                raise ShapeError(
                    f"shapes {' and '.join('[' + ', '.join(map(str, x)) + ']' for x in shapes)} "
                    f"do not broadcast at axis {axis - rank}: {dim} vs {d}")
        out.append(dim)
    return tuple(out)


def same_dtype(types: Sequence[TensorType], op: str) -> DType:
    dtypes = {t.dtype for t in types}
    if len(dtypes) > 1:
        names = ", ".join(sorted(d.name for d in dtypes))
        raise ShapeError(f"{op} needs operands of one dtype, got {names}; use dsl.cast(x, dtype) first")
    return types[0].dtype


def norm_axis(axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise ShapeError(f"axis {axis} out of range for a tensor of rank {rank}")
    return axis % rank
