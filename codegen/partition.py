"""Partition a graph into kernels.

1. Anchors (matmul and the other GEMM-like primitives) each get their template; the chain of
   single-consumer elementwise nodes after an anchor, with the anchor's output shape, is fused into
   its epilogue (bias, activation, residual, scaling, cast).
2. Reductions and row-wise ops (sum/max/mean, softmax, rmsnorm) get the reduction template, with the
   single-consumer elementwise tree that produces their input fused as a prologue and the chain that
   consumes their output fused as an epilogue.
3. Remaining elementwise nodes are grouped into pointwise kernels: a node joins the group of one of
   its producers when the output shapes agree and the kernel graph stays acyclic.
Views run as zero-copy torch views; ``extern`` primitives and constants feeding them run by their
reference semantics. The result is a schedule in dependency order.
"""

from __future__ import annotations

import dataclasses

import networkx as nx

from dsl.graph import Graph, Node, Ref
from dsl.registry import ANCHOR, ELEMENTWISE, EXTERN, REDUCTION, ROWWISE, SOURCE, VIEW, get

from .printer import PRINTABLE


@dataclasses.dataclass
class KernelGroup:
    name: str
    template: str
    nodes: list[int]                      # in topological order
    anchor: int | None = None             # the anchor / reduction node
    prologue: list[int] = dataclasses.field(default_factory=list)
    epilogue: list[int] = dataclasses.field(default_factory=list)
    inputs: list[Ref] = dataclasses.field(default_factory=list)
    outputs: list[Ref] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Step:
    kind: str                             # "kernel" | "view" | "extern" | "const"
    node: int | None = None
    kernel: KernelGroup | None = None


def _single_use(graph: Graph, ref: Ref, outputs: set[Ref]) -> Node | None:
    uses = graph.uses_of(ref)
    if ref in outputs or len(uses) != 1:
        return None
    return uses[0][0]


def partition(graph: Graph) -> list[Step]:
    order = graph.topo()
    outputs = set(graph.outputs)
    owner: dict[int, KernelGroup] = {}
    groups: list[KernelGroup] = []

    def fusable(node: Node, shape) -> bool:
        return (node.id not in owner and get(node.op).kind == ELEMENTWISE and node.op in PRINTABLE
                and len(node.types) == 1 and tuple(node.type.shape) == tuple(shape))

    def grow_epilogue(group: KernelGroup, start: Node):
        cur = start
        while True:
            user = _single_use(graph, Ref(cur.id), outputs)
            if user is None or not fusable(user, start.type.shape):
                return
            group.epilogue.append(user.id)
            owner[user.id] = group
            cur = user

    # 1. anchors (each template names the primitives it anchors)
    from .template import anchor_templates

    anchors = anchor_templates()
    for node in order:
        if get(node.op).kind == ANCHOR:
            template = anchors.get(node.op, node.op)
            g = KernelGroup(f"k{len(groups)}_{template}", template, [], anchor=node.id)
            owner[node.id] = g
            groups.append(g)
            if len(node.types) == 1:
                grow_epilogue(g, node)

    # 2. reductions with prologue trees and epilogue chains
    for node in order:
        kind = get(node.op).kind
        if kind not in (REDUCTION, ROWWISE):
            continue
        g = KernelGroup(f"k{len(groups)}_reduction", "reduction", [], anchor=node.id)
        owner[node.id] = g
        groups.append(g)
        in_shape = graph.type_of(node.inputs[0]).shape
        stack = [r for r in node.inputs]
        while stack:
            ref = stack.pop()
            producer = graph.node(ref.node)
            if _single_use(graph, ref, outputs) is None or not fusable(producer, in_shape):
                continue
            owner[producer.id] = g
            g.prologue.append(producer.id)
            stack.extend(producer.inputs)
        grow_epilogue(g, node)

    # 3. pointwise groups
    def creates_cycle(group: KernelGroup, nid: int) -> bool:
        """Would adding node ``nid`` to ``group`` make the kernel-level graph cyclic?"""
        def key(n):
            if n == nid:
                return group.name
            g = owner.get(n)
            return g.name if g is not None else n
        quotient = nx.DiGraph()
        quotient.add_edges_from((key(u), key(v)) for u, v in graph.nx.edges if key(u) != key(v))
        return not nx.is_directed_acyclic_graph(quotient)

    pointwise: list[KernelGroup] = []
    for node in order:
        if node.id in owner or get(node.op).kind != ELEMENTWISE:
            continue
        # Prefer a producer's group (vertical fusion), else any group of the same shape
        # (horizontal fusion: independent work over one shape shares a launch).
        producers = [owner.get(r.node) for r in node.inputs]
        candidates = [g for g in producers if g is not None and g.template == "pointwise"]
        candidates += [g for g in reversed(pointwise) if g not in candidates]
        placed = None
        for cand in candidates:
            if (tuple(graph.node(cand.nodes[0]).type.shape) == tuple(node.type.shape)
                    and not creates_cycle(cand, node.id)):
                placed = cand
                break
        if placed is None:
            placed = KernelGroup(f"k{len(groups)}_pointwise", "pointwise", [])
            groups.append(placed)
            pointwise.append(placed)
        placed.nodes.append(node.id)
        owner[node.id] = placed

    # members, inputs and outputs of each group
    position = {n.id: i for i, n in enumerate(order)}
    for g in groups:
        if g.template != "pointwise":
            g.nodes = sorted([g.anchor] + g.prologue + g.epilogue, key=position.get)
            g.prologue.sort(key=position.get)
        members = set(g.nodes)
        seen_in: dict[Ref, None] = {}
        for nid in g.nodes:
            for ref in graph.node(nid).inputs:
                if ref.node not in members and graph.node(ref.node).op != "const":
                    seen_in.setdefault(ref)
        g.inputs = list(seen_in)
        outs: dict[Ref, None] = {}
        for nid in g.nodes:
            node = graph.node(nid)
            for i in range(len(node.types)):
                ref = Ref(nid, i)
                if ref in outputs or any(u.id not in members for u, _ in graph.uses_of(ref)):
                    outs.setdefault(ref)
        g.outputs = list(outs)

    # schedule: contract kernels, keep views/externs/consts as their own steps
    dag = nx.DiGraph()
    step_of: dict[int, str] = {}
    steps: dict[str, Step] = {}
    for node in order:
        if node.op == "input":
            continue
        if node.id in owner:
            key = owner[node.id].name
            if key not in steps:
                steps[key] = Step("kernel", kernel=owner[node.id])
        else:
            kind = get(node.op).kind
            key = f"n{node.id}"
            steps[key] = Step("view" if kind == VIEW else "const" if kind == SOURCE else "extern",
                              node=node.id)
        step_of[node.id] = key
        dag.add_node(key)
    for u, v in graph.nx.edges:
        if u in step_of and v in step_of and step_of[u] != step_of[v]:
            dag.add_edge(step_of[u], step_of[v])
    if not nx.is_directed_acyclic_graph(dag):  # pragma: no cover - guarded by construction
        raise RuntimeError("partition produced a cyclic kernel graph")
    first = {key: min(position[n] for n, k in step_of.items() if k == key) for key in steps}
    ordered = nx.lexicographical_topological_sort(dag, key=lambda k: first[k])
    # constants only need materialising when a non-kernel step reads them
    result = []
    for key in ordered:
        step = steps[key]
        if step.kind == "const" and graph.node(step.node).op == "const":
            readers = [step_of[s] for s in graph.nx.successors(step.node) if s in step_of]
            if all(steps[r].kind == "kernel" for r in readers):
                continue
        result.append(step)
    return result


def kernels(steps: list[Step]) -> list[KernelGroup]:
    return [s.kernel for s in steps if s.kind == "kernel"]


__all__ = ["KernelGroup", "Step", "partition", "kernels", "EXTERN"]
