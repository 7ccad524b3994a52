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


def strided_offset(name: str, dims) -> str:
    terms = [f"{idx} * {name}_s{d}" for d, idx in dims]
    return " + ".join(terms) if terms else "0"


def print_body(graph: Graph, node_ids, names: dict[Ref, str], indent: int = 4):
    printer = Printer(graph, names)
    for nid in node_ids:
        printer.emit(graph.node(nid))
    return printer
