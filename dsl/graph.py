"""The graph IR: a networkx DiGraph of typed nodes with symbolic shapes.

A node has one or more outputs; a value is a reference ``(node id, output index)``. Graphs are
built by tracing (see :mod:`dsl.trace`) and transformed by pure passes that return new graphs.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterable, NamedTuple

import networkx as nx

from .dtypes import DType
from .errors import DSLError

Dim = "str | int"


class Ref(NamedTuple):
    node: int
    index: int = 0


@dataclasses.dataclass(frozen=True)
class TensorType:
    shape: tuple            # of str (symbol) or int
    dtype: DType

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        return f"{self.dtype.name}[{dims}]"


@dataclasses.dataclass(frozen=True)
class Node:
    id: int
    op: str
    inputs: tuple[Ref, ...]
    attrs: tuple[tuple[str, Any], ...]        # sorted, hashable
    types: tuple[TensorType, ...]             # one per output
    line: str | None = None                   # "file.py:12: source text"

    @property
    def attr(self) -> dict:
        return dict(self.attrs)

    @property
    def type(self) -> TensorType:
        return self.types[0]

    @property
    def label(self) -> str:
        return f"%{self.id} ({self.op})"

    def __str__(self) -> str:
        outs = ", ".join(str(t) for t in self.types)
        args = ", ".join(_ref_str(r) for r in self.inputs)
        attrs = ", ".join(f"{k}={v!r}" for k, v in self.attrs)
        body = ", ".join(x for x in (args, attrs) if x)
        return f"%{self.id}: {outs} = {self.op}({body})"


def _ref_str(ref: Ref) -> str:
    return f"%{ref.node}" if ref.index == 0 else f"%{ref.node}.{ref.index}"


class Graph:
    """Typed dataflow graph. ``inputs`` are node ids of ``input`` nodes in parameter order,
    ``outputs`` are value references. ``constraints`` are shape equalities checked at call time."""

    _ids = itertools.count()

    def __init__(self, name: str = "op"):
        self.name = name
        self.nx = nx.DiGraph()
        self.inputs: list[int] = []
        self.outputs: list[Ref] = []
        self.constraints: list[tuple[object, object, int]] = []   # (dim, dim, node id)
        self._next = 0

    # -- construction -------------------------------------------------------------------------
    def add_node(self, op: str, inputs: Iterable[Ref], attrs: dict, types: tuple[TensorType, ...],
                 line: str | None = None) -> Node:
        node = Node(self._next, op, tuple(inputs), tuple(sorted(attrs.items())), tuple(types), line)
        self._next += 1
        self.nx.add_node(node.id, node=node)
        for slot, ref in enumerate(node.inputs):
            if ref.node not in self.nx:
                raise DSLError(f"input {slot} refers to a value of another graph", op=self.name,
                               node=node.label, line=line)
            self.nx.add_edge(ref.node, node.id)
        return node

    def copy(self) -> "Graph":
        g = Graph(self.name)
        g.nx = self.nx.copy()
        g.inputs = list(self.inputs)
        g.outputs = list(self.outputs)
        g.constraints = list(self.constraints)
        g._next = self._next
        return g

    # -- queries ------------------------------------------------------------------------------
    def node(self, nid: int) -> Node:
        return self.nx.nodes[nid]["node"]

    def type_of(self, ref: Ref) -> TensorType:
        return self.node(ref.node).types[ref.index]

    def topo(self) -> list[Node]:
        return [self.node(n) for n in nx.lexicographical_topological_sort(self.nx)]

    def users(self, nid: int) -> list[Node]:
        return [self.node(s) for s in self.nx.successors(nid)]

    def uses_of(self, ref: Ref) -> list[tuple[Node, int]]:
        out = []
        for user in self.users(ref.node):
            out.extend((user, slot) for slot, r in enumerate(user.inputs) if r == ref)
        return out

    def __len__(self) -> int:
        return self.nx.number_of_nodes()

    def input_types(self) -> list[TensorType]:
        return [self.node(i).type for i in self.inputs]

    def output_types(self) -> list[TensorType]:
        return [self.type_of(r) for r in self.outputs]

    def symbols(self) -> list[str]:
        seen: dict[str, None] = {}
        for t in self.input_types():
            for d in t.shape:
                if isinstance(d, str):
                    seen.setdefault(d)
        return list(seen)

    def __str__(self) -> str:
        lines = [f"graph {self.name}("
                 + ", ".join(f"%{i}: {self.node(i).type}" for i in self.inputs) + "):"]
        for node in self.topo():
            if node.op == "input":
                continue
            lines.append(f"  {node}")
        lines.append("  return " + ", ".join(_ref_str(r) for r in self.outputs))
        return "\n".join(lines)
