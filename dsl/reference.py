"""The reference interpreter: evaluates a Graph node by node with each primitive's PyTorch
semantics. It is the oracle of every test and the ``torch`` backend of the runtime."""

from __future__ import annotations

import functools
import inspect

from .graph import Graph, Ref
from .registry import get


@functools.lru_cache(maxsize=None)
def _wants_env(op: str) -> bool:
    ref = get(op).ref
    try:
        return ref is not None and "_env" in inspect.signature(ref).parameters
    except (TypeError, ValueError):  # torch builtins have no Python signature
        return False


def eval_node(node, args, env):
    prim = get(node.op)
    attrs = {k: v for k, v in node.attrs}
    if _wants_env(node.op):
        attrs["_env"] = env
    out = prim.ref(*args, **attrs)
    return out if isinstance(out, tuple) else (out,)


def plan(graph: Graph) -> list[tuple]:
    """The graph's evaluation order with each node's reference and attributes resolved.

    A compiled op keeps this per variant: sorting the graph and looking up primitives on every call
    was most of the torch backend's per-call cost for small ops.
    """
    return [(node, get(node.op).ref, {k: v for k, v in node.attrs}, _wants_env(node.op))
            for node in graph.topo() if node.op != "input"]


def run(graph: Graph, tensors, env: dict[str, int], steps: list[tuple] | None = None):
    values = run_all(graph, tensors, env, steps)
    return [values[r] for r in graph.outputs]


def run_all(graph: Graph, tensors, env: dict[str, int], steps: list[tuple] | None = None) -> dict[Ref, object]:
    """Every value of the graph (for checking one kernel of a partition in isolation)."""
    values: dict[Ref, object] = {Ref(nid, 0): t for nid, t in zip(graph.inputs, tensors)}
    device = tensors[0].device if tensors else None
    for node, ref, attrs, wants_env in (plan(graph) if steps is None else steps):
        out = ref(*[values[r] for r in node.inputs], **({**attrs, "_env": env} if wants_env else attrs))
        outs = out if isinstance(out, tuple) else (out,)
        for i, o in enumerate(outs):
            if device is not None and o.device != device and o.dim() == 0:
                o = o.to(device)
            values[Ref(node.id, i)] = o
    return values
