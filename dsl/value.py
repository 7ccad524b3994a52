"""Symbolic tensor values seen by a traced function, with Python operators."""

from __future__ import annotations

from .graph import Graph, Ref, TensorType


class Value:
    __slots__ = ("graph", "ref")
    __array_priority__ = 1000  # make numpy scalars defer to our operators

    def __init__(self, graph: Graph, ref: Ref):
        self.graph, self.ref = graph, ref

    @property
    def type(self) -> TensorType:
        return self.graph.type_of(self.ref)

    @property
    def shape(self) -> tuple:
        return self.type.shape

    @property
    def dtype(self):
        return self.type.dtype

    @property
    def ndim(self) -> int:
        return len(self.type.shape)

    def __repr__(self) -> str:
        return f"Value(%{self.ref.node}: {self.type})"

    def __bool__(self):
        from .errors import DSLError

        raise DSLError("a traced tensor has no truth value: use dsl.where(cond, a, b) instead of if/and/or",
                       op=self.graph.name)

    # arithmetic ------------------------------------------------------------------------------
    def __add__(self, o): return _p().add(self, o)
    def __radd__(self, o): return _p().add(o, self)
    def __sub__(self, o): return _p().sub(self, o)
    def __rsub__(self, o): return _p().sub(o, self)
    def __mul__(self, o): return _p().mul(self, o)
    def __rmul__(self, o): return _p().mul(o, self)
    def __truediv__(self, o): return _p().div(self, o)
    def __rtruediv__(self, o): return _p().div(o, self)
    def __neg__(self): return _p().neg(self)
    def __pow__(self, o): return _p().pow(self, o)
    def __matmul__(self, o): return _p().matmul(self, o)
    def __rmatmul__(self, o): return _p().matmul(o, self)
    def __lt__(self, o): return _p().less(self, o)
    def __le__(self, o): return _p().less_equal(self, o)
    def __gt__(self, o): return _p().greater(self, o)
    def __ge__(self, o): return _p().greater_equal(self, o)
    def __abs__(self): return _p().abs(self)

    # shape ------------------------------------------------------------------------------------
    @property
    def T(self):
        return _p().transpose(self)

    def transpose(self, a: int = -2, b: int = -1):
        return _p().transpose(self, a, b)

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return _p().reshape(self, shape)

    def __getitem__(self, index):
        return _p().getitem(self, index)

    def sum(self, axis=-1, keepdim=False): return _p().sum(self, axis=axis, keepdim=keepdim)
    def mean(self, axis=-1, keepdim=False): return _p().mean(self, axis=axis, keepdim=keepdim)
    def max(self, axis=-1, keepdim=False): return _p().max(self, axis=axis, keepdim=keepdim)
    def to(self, dtype): return _p().cast(self, dtype)


def _p():
    from . import primitives

    return primitives
