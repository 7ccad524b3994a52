"""Row reductions (sum, mean, max) and row-wise normalisations (softmax, rmsnorm) with fused
elementwise prologues and epilogues."""

from __future__ import annotations

from dsl.dtypes import compute_type
from dsl.graph import Graph, Ref
from dsl.registry import ROWWISE, get

from ..partition import KernelGroup
from ..printer import literal
from ..render import Code, render
from ..space import SearchSpace
from ..template import KernelTemplate, register_template
from ..work import reduction_work
from .common import Rendered, node_list, operand, print_body

SPACE = SearchSpace(
    template="reduction",
    params={"BLOCK_R": (1, 2, 4, 8, 16, 32), "BLOCK_C": (32, 64, 128, 256, 512, 1024, 2048),
            "num_warps": (1, 2, 4, 8)},
    default={"BLOCK_R": 4, "BLOCK_C": 256, "num_warps": 4},
    constraints=(("tile_elements", lambda c, s, d: c["BLOCK_R"] * c["BLOCK_C"] <= 16384),
                 ("no_wasted_columns", lambda c, s, d: c["BLOCK_C"] <= max(32, 2 * s.get("C", 1 << 30)))),
)


def _row_offset(name: str, nrow: int) -> Code:
    if not nrow:
        return Code("rows * 0")
    return Code(" + ".join(f"i{d} * {name}_s{d}" for d in range(nrow)))


def render_reduction(graph: Graph, group: KernelGroup, op_name: str) -> Rendered:
    anchor = graph.node(group.anchor)
    kind = anchor.op
    rowwise = get(kind).kind == ROWWISE
    in_type = graph.type_of(anchor.inputs[0])
    axis = anchor.attr.get("axis", in_type.rank - 1)
    nrow = in_type.rank - 1
    members = set(group.nodes)

    full_refs, row_refs = [], []
    for nid in group.prologue + [anchor.id]:
        for r in graph.node(nid).inputs:
            if r.node not in members and graph.node(r.node).op != "const" and r not in full_refs:
                full_refs.append(r)
    for nid in group.epilogue:
        for r in graph.node(nid).inputs:
            if r.node in members or graph.node(r.node).op == "const":
                continue
            target = full_refs if rowwise else row_refs
            if r not in target:
                target.append(r)

    names: dict[Ref, str] = {}
    full = []
    for i, ref in enumerate(full_refs):
        full.append(dict(operand(f"f{i}", f"f{i}", graph.type_of(ref).dtype, ""),
                         row_offset=_row_offset(f"f{i}", nrow)))
        names[ref] = f"f{i}"
    rowops = []
    for i, ref in enumerate(row_refs):
        rowops.append(dict(operand(f"r{i}", f"r{i}", graph.type_of(ref).dtype, ""),
                           row_offset=_row_offset(f"r{i}", nrow)))
        names[ref] = f"r{i}"
    pro = print_body(graph, group.prologue, names)
    x = pro.operand(anchor.inputs[0])
    w = pro.operand(anchor.inputs[1]) if kind == "rmsnorm" else "None"
    y = f"v{anchor.id}"
    epi_names = dict(pro.names)
    epi_names[Ref(anchor.id)] = y
    epi = print_body(graph, group.epilogue, epi_names)
    outputs = [dict(operand(f"out{i}", epi.names[ref], graph.type_of(ref).dtype, ""),
                    row_offset=_row_offset(f"out{i}", nrow)) for i, ref in enumerate(group.outputs)]
    acc = compute_type(in_type.dtype)
    if not acc.is_float:
        acc_type, lowest = "tl.int64", "-9223372036854775807"
    else:
        acc_type, lowest = acc.triton, 'float("-inf")'
    eps = literal(anchor.attr.get("eps", 0.0), acc) if kind == "rmsnorm" else "0.0"
    indent = 8 if rowwise else 4
    source = render("reduction.j2", kernel=group.name, op_name=op_name, kind=kind, rowwise=rowwise,
                    anchor=Code(f"%{anchor.id} {kind}"), prologue_list=node_list(graph, group.prologue),
                    epilogue_list=node_list(graph, group.epilogue), full=full, rowops=rowops,
                    outputs=outputs, nrow=nrow, prologue=pro.code(8), epilogue=epi.code(indent),
                    x=Code(x), w=Code(w), y=y, acc_type=Code(acc_type), lowest=Code(lowest), eps=Code(eps))
    return Rendered(group.name, "reduction", source, full_refs + row_refs, list(group.outputs),
                    {"in_shape": in_type.shape, "axis": axis, "n_full": len(full_refs),
                     "rowwise": rowwise})


def problem(rendered: Rendered, env) -> dict:
    from dsl import shapes as sh

    shape = [sh.evaluate(d, env) for d in rendered.meta["in_shape"]]
    axis = rendered.meta["axis"]
    rows = 1
    for i, d in enumerate(shape):
        if i != axis:
            rows *= d
    return {"R": rows, "C": shape[axis]}


def invoke(module, rendered: Rendered, ins, outs, env, config):
    n = rendered.meta["n_full"]
    from dsl import shapes as sh

    in_shape = tuple(sh.evaluate(d, env) for d in rendered.meta["in_shape"])
    module.launch(ins[:n], ins[n:], outs, in_shape, rendered.meta["axis"], config)


TEMPLATE = register_template(KernelTemplate(
    name="reduction", sources=("reduction.j2",), space=SPACE, render=render_reduction, launch=invoke,
    problem=problem, work=reduction_work, token_dim="R",
))
