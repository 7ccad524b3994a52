"""What every kernel renderer shares: naming operands, printing fused bodies, describing nodes."""

from __future__ import annotations

import dataclasses

from dsl.graph import Graph, Ref

from ..printer import Printer, ctype
from ..render import Code


@dataclasses.dataclass
class Rendered:
    """A rendered kernel: its source, the name of its @triton.jit function, and how the runtime
    calls its ``launch``."""

    name: str
    template: str
    source: str
    input_refs: list[Ref]
    output_refs: list[Ref]
    meta: dict


def node_list(graph: Graph, ids) -> Code:
    # Op names come from the primitive registry and ids are ints: safe to place into a comment.
    return Code(", ".join(f"%{i} {graph.node(i).op}" for i in ids) or "none")


def operand(name: str, var: str, dtype, offset: str) -> dict:
    return {"name": name, "var": var, "ctype": Code(ctype(dtype)), "triton": Code(dtype.triton),
            "offset": Code(offset)}


def strided_offset(name: str, dims, lanes: str = "offs") -> str:
    terms = [f"{idx} * {name}_s{d}" for d, idx in dims]
    # A 0-d tensor still needs a block of offsets: a scalar pointer cannot take the block mask
    # (lane 0 is the only one unmasked, numel being 1).
    return " + ".join(terms) if terms else f"{lanes} * 0"


def print_body(graph: Graph, node_ids, names: dict[Ref, str], indent: int = 4):
    printer = Printer(graph, names)
    for nid in node_ids:
        printer.emit(graph.node(nid))
    return printer


def fused_epilogue(graph: Graph, group, anchor, acc: str = "acc"):
    """The elementwise chain fused after an anchor: ``(extra input refs, input operands, output
    operands, printer)``. The anchor's result is named ``acc`` in the printed body; every other
    non-constant value the chain reads from outside the group becomes an input ``in{i}`` (read as
    ``e{i}``), including the anchor's own operands when the chain reuses them (``x @ w + x``)."""
    refs: list[Ref] = []
    for n in group.epilogue:
        for r in graph.node(n).inputs:
            if (r.node != anchor.id and graph.node(r.node).op != "const" and r not in refs
                    and r.node not in group.epilogue):
                refs.append(r)
    names = {Ref(anchor.id): acc}
    inputs = []
    for i, ref in enumerate(refs):
        inputs.append(operand(f"in{i}", f"e{i}", graph.type_of(ref).dtype, ""))
        names[ref] = f"e{i}"
    printer = print_body(graph, group.epilogue, names)
    outputs = [operand(f"out{i}", printer.names[ref], graph.type_of(ref).dtype, "")
               for i, ref in enumerate(group.outputs)]
    return refs, inputs, outputs, printer
