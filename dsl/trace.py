"""``@dsl.op``: tensor annotations, tracing into a Graph, and binding of real tensors at call time."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from typing import Any, Callable

from . import dtypes as dt
from . import shapes as sh
from .errors import DSLError
from .graph import Graph, Ref, TensorType
from .value import Value

STATIC_TYPES = (int, float, bool, str)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """What ``dsl.Tensor["M", "K", dsl.f16]`` evaluates to. ``dtype`` None: taken from the call."""

    dims: tuple
    dtype: dt.DType | None

    def __repr__(self) -> str:
        parts = [repr(d) for d in self.dims] + ([repr(self.dtype)] if self.dtype else [])
        return f"dsl.Tensor[{', '.join(parts)}]"


class Tensor:
    """Annotation: ``dsl.Tensor[dim, ..., dtype]``; a dim is a symbol (str) or an int."""

    def __class_getitem__(cls, item) -> TensorSpec:
        items = item if isinstance(item, tuple) else (item,)
        dtype = None
        if items and isinstance(items[-1], dt.DType):
            dtype, items = items[-1], items[:-1]
        for d in items:
            if isinstance(d, bool) or not (isinstance(d, int) and d >= 0 or sh.is_symbol(d)):
                raise DSLError(f"invalid dim {d!r} in dsl.Tensor[...]: use a non-negative int or an "
                               "identifier such as 'M'")
        return TensorSpec(tuple(items), dtype)


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    spec: TensorSpec


@dataclasses.dataclass(frozen=True)
class Static:
    name: str
    type: type
    default: Any


def _where(fn) -> str:
    try:
        lines, start = inspect.getsourcelines(fn)
        return f"{os.path.relpath(inspect.getsourcefile(fn))}:{start}"
    except (OSError, TypeError):
        return getattr(fn, "__qualname__", "<op>")


class Op:
    """A traced op. ``.graph`` traces with default static attributes (and f32 where the
    annotations leave the dtype open); ``.trace(dtypes, **static)`` traces for a call."""

    def __init__(self, fn: Callable, name: str | None = None):
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.name = name or fn.__name__
        self.where = _where(fn)
        self.params: list[Param] = []
        self.statics: dict[str, Static] = {}
        sig = inspect.signature(fn)
        try:
            hints = inspect.get_annotations(fn, eval_str=True)
        except Exception as exc:
            raise DSLError(f"cannot read the annotations: {exc}", op=self.name, line=self.where) from None
        for p in sig.parameters.values():
            ann = hints.get(p.name)
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                if not isinstance(ann, TensorSpec):
                    raise DSLError(f"parameter '{p.name}' needs a dsl.Tensor[...] annotation "
                                   "(positional parameters are tensors; static attributes are keyword-only)",
                                   op=self.name, line=self.where)
                self.params.append(Param(p.name, ann))
            elif p.kind == p.KEYWORD_ONLY:
                if p.default is inspect.Parameter.empty:
                    raise DSLError(f"static attribute '{p.name}' needs a default value",
                                   op=self.name, line=self.where)
                typ = ann if ann in STATIC_TYPES else type(p.default)
                if typ not in STATIC_TYPES:
                    raise DSLError(f"static attribute '{p.name}' must be int, float, bool or str, "
                                   f"not {typ.__name__}", op=self.name, line=self.where)
                self.statics[p.name] = Static(p.name, typ, p.default)
            else:
                raise DSLError(f"*args/**kwargs are not supported (parameter '{p.name}')",
                               op=self.name, line=self.where)
        self._traces: dict[tuple, Graph] = {}

    def __repr__(self) -> str:
        return f"<dsl.op {self.name} ({', '.join(p.name for p in self.params)})>"

    # -- static attributes ----------------------------------------------------------------------
    def check_statics(self, kwargs: dict) -> dict:
        out = {}
        for key, value in kwargs.items():
            if key not in self.statics:
                known = ", ".join(self.statics) or "none"
                raise DSLError(f"unknown keyword '{key}' (static attributes: {known})", op=self.name,
                               line=self.where)
            st = self.statics[key]
            ok = isinstance(value, st.type) and not (st.type is not bool and isinstance(value, bool))
            if st.type is float and isinstance(value, int) and not isinstance(value, bool):
                value, ok = float(value), True
            if not ok:
                raise DSLError(f"keyword '{key}' is a static attribute of type {st.type.__name__}; got "
                               f"{type(value).__name__} (tensors must be passed positionally)",
                               op=self.name, line=self.where)
            out[key] = value
        full = {k: s.default for k, s in self.statics.items()}
        full.update(out)
        return full

    # -- tracing --------------------------------------------------------------------------------
    @property
    def graph(self) -> Graph:
        return self.trace(None)

    def trace(self, dtypes: tuple | None = None, **static) -> Graph:
        statics = self.check_statics(static)
        if dtypes is None:
            dtypes = tuple(p.spec.dtype or dt.f32 for p in self.params)
        key = (dtypes, tuple(sorted(statics.items())))
        if key not in self._traces:
            self._traces[key] = self._trace(dtypes, statics)
        return self._traces[key]

    def _trace(self, dtypes, statics) -> Graph:
        from . import passes

        graph = Graph(self.name)
        args = []
        for index, (p, dtype) in enumerate(zip(self.params, dtypes)):
            node = graph.add_node("input", [], {"name": p.name, "index": index},
                                  (TensorType(p.spec.dims, dtype),), line=self.where)
            graph.inputs.append(node.id)
            args.append(Value(graph, Ref(node.id)))
        result = self.fn(*args, **statics)
        graph.outputs = [self._output_ref(graph, r, i) for i, r in
                         enumerate(result if isinstance(result, tuple) else (result,))]
        return passes.optimize(graph)

    def _output_ref(self, graph, value, i) -> Ref:
        if not isinstance(value, Value) or value.graph is not graph:
            raise DSLError(f"output {i} is {type(value).__name__}, not a tensor computed by this op",
                           op=self.name, line=self.where)
        return value.ref

    # -- calling ----------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        if any(isinstance(a, Value) for a in args):
            return self.inline(*args, **kwargs)
        from .reference import run

        graph, tensors, env = self.bind(args, kwargs)
        outs = run(graph, tensors, env)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def inline(self, *args, **kwargs):
        """Compose: calling an op on traced values inside another op traces its body in place."""
        statics = self.check_statics(kwargs)
        if len(args) != len(self.params):
            raise DSLError(f"expects {len(self.params)} tensors, got {len(args)}", op=self.name)
        return self.fn(*args, **statics)

    def bind(self, args, kwargs):
        """Check real tensors against the annotations; return (graph, tensors, symbol env)."""
        import torch

        if len(args) != len(self.params):
            names = ", ".join(p.name for p in self.params)
            raise DSLError(f"expects {len(self.params)} tensor arguments ({names}), got {len(args)}",
                           op=self.name, line=self.where)
        dtypes = []
        for p, a in zip(self.params, args):
            if not isinstance(a, torch.Tensor):
                raise DSLError(f"argument '{p.name}' must be a torch.Tensor, got {type(a).__name__}",
                               op=self.name, node=f"input {p.name}", line=self.where)
            d = dt.from_torch(a.dtype)
            if d is None:
                raise DSLError(f"argument '{p.name}' has unsupported dtype {a.dtype}", op=self.name,
                               node=f"input {p.name}", line=self.where)
            if p.spec.dtype is not None and p.spec.dtype is not d:
                raise DSLError(f"argument '{p.name}' must be {p.spec.dtype.name}, got {d.name}",
                               op=self.name, node=f"input {p.name}", line=self.where)
            dtypes.append(d)
        graph = self.trace(tuple(dtypes), **kwargs)
        env = bind_shapes(graph, args, self.name)
        return graph, list(args), env


def bind_shapes(graph: Graph, tensors, op_name: str) -> dict[str, int]:
    env: dict[str, int] = {}
    for nid, t in zip(graph.inputs, tensors):
        node = graph.node(nid)
        name = node.attr["name"]
        spec = node.type.shape
        if t.dim() != len(spec):
            raise DSLError(f"argument '{name}' must have rank {len(spec)} "
                           f"[{', '.join(map(str, spec))}], got shape {list(t.shape)}",
                           op=op_name, node=f"input {name}", line=node.line)
        for axis, (d, n) in enumerate(zip(spec, t.shape)):
            n = int(n)
            if isinstance(d, int):
                if d != n:
                    raise DSLError(f"argument '{name}' dim {axis} must be {d}, got {n} "
                                   f"(shape {list(t.shape)})", op=op_name, node=f"input {name}",
                                   line=node.line)
            elif d in env and env[d] != n:
                raise DSLError(f"argument '{name}' dim {axis} is {d}={n}, but {d}={env[d]} from an "
                               f"earlier argument", op=op_name, node=f"input {name}", line=node.line)
            else:
                env[d] = n
    for a, b, nid in graph.constraints:
        va, vb = sh.evaluate(a, env), sh.evaluate(b, env)
        if va != vb:
            node = graph.node(nid) if nid in graph.nx else None
            raise DSLError(f"shape mismatch: {a}={va} but {b}={vb}", op=op_name,
                           node=node.label if node else None, line=node.line if node else None)
    return env


def op(fn: Callable | None = None, *, name: str | None = None):
    """Decorator: declare a kdsl op. Positional parameters are tensors (``dsl.Tensor[...]``),
    keyword-only parameters are static attributes."""
    if fn is None:
        return lambda f: Op(f, name)
    return Op(fn, name)
