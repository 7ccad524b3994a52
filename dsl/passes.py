"""Graph passes, each a pure function Graph -> Graph."""

from __future__ import annotations

import networkx as nx
import torch

from .errors import DSLError
from .graph import Graph, Ref
from .registry import ELEMENTWISE, SOURCE, get


def verify(graph: Graph) -> Graph:
    """Check structure and types; raise DSLError naming the node."""
    if not nx.is_directed_acyclic_graph(graph.nx):
        raise DSLError("the graph has a cycle", op=graph.name)
    for node in graph.topo():
        prim = get(node.op, graph=graph)
        for slot, ref in enumerate(node.inputs):
            if ref.node not in graph.nx or ref.index >= len(graph.node(ref.node).types):
                raise DSLError(f"input {slot} refers to a missing value", op=graph.name, node=node.label,
                               line=node.line)
        if prim.kind == SOURCE or node.op == "input":
            continue
        in_types = [graph.type_of(r) for r in node.inputs]
        out = prim.infer(in_types, node.attr)
        types = out if isinstance(out, tuple) else (out,)
        if tuple(types) != node.types:
            raise DSLError(f"stored type {node.types} disagrees with inference {types}", op=graph.name,
                           node=node.label, line=node.line)
    for ref in graph.outputs:
        if ref.node not in graph.nx:
            raise DSLError("an output refers to a missing node", op=graph.name)
    return graph


def dce(graph: Graph) -> Graph:
    """Drop nodes no output depends on (inputs always stay: they are the signature)."""
    live = set(graph.inputs)
    for ref in graph.outputs:
        live.add(ref.node)
        live |= nx.ancestors(graph.nx, ref.node)
    g = graph.copy()
    g.nx.remove_nodes_from([n for n in graph.nx if n not in live])
    return g


def _rewrite(graph: Graph, replace: dict[Ref, Ref]) -> Graph:
    """Rebuild with uses of ``replace`` keys redirected; returns a new graph."""
    if not replace:
        return graph
    g = graph.copy()
    for node in graph.topo():
        new_inputs = tuple(replace.get(r, r) for r in node.inputs)
        if new_inputs != node.inputs:
            updated = type(node)(node.id, node.op, new_inputs, node.attrs, node.types, node.line)
            g.nx.nodes[node.id]["node"] = updated
            for r in node.inputs:
                if g.nx.has_edge(r.node, node.id):
                    g.nx.remove_edge(r.node, node.id)
            for r in new_inputs:
                g.nx.add_edge(r.node, node.id)
    g.outputs = [replace.get(r, r) for r in graph.outputs]
    return g


def cse(graph: Graph) -> Graph:
    """Merge nodes computing the same op on the same inputs with the same attributes."""
    seen: dict[tuple, int] = {}
    replace: dict[Ref, Ref] = {}
    for node in graph.topo():
        if node.op == "input":
            continue
        inputs = tuple(replace.get(r, r) for r in node.inputs)
        key = (node.op, inputs, node.attrs, node.types)
        if key in seen:
            for i in range(len(node.types)):
                replace[Ref(node.id, i)] = Ref(seen[key], i)
        else:
            seen[key] = node.id
    return dce(_rewrite(graph, replace))


def fold_constants(graph: Graph) -> Graph:
    """Evaluate elementwise nodes whose inputs are all constants."""
    g = graph.copy()
    replace: dict[Ref, Ref] = {}
    for node in graph.topo():
        prim = get(node.op)
        if prim.kind != ELEMENTWISE or not node.inputs:
            continue
        ins = [g.node(replace.get(r, r).node) for r in node.inputs]
        if not all(n.op == "const" for n in ins):
            continue
        args = [torch.tensor(n.attr["value"], dtype=n.attr["dtype"].torch) for n in ins]
        value = prim.ref(*args, **node.attr).item()
        new = g.add_node("const", [], {"value": value, "dtype": node.type.dtype}, node.types, node.line)
        replace[Ref(node.id)] = Ref(new.id)
    return dce(_rewrite(g, replace))


def optimize(graph: Graph) -> Graph:
    return verify(cse(fold_constants(dce(graph))))
