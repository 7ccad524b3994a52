"""Pointwise kernels: a fused group of elementwise nodes over one output shape."""

from __future__ import annotations

from dsl.graph import Graph

from ..partition import KernelGroup
from ..render import render
from ..space import SearchSpace
from ..template import KernelTemplate, register_template
from ..work import pointwise_work
from .common import Rendered, node_list, operand, print_body, strided_offset

SPACE = SearchSpace(
    template="pointwise",
    params={"BLOCK": (128, 256, 512, 1024, 2048, 4096), "num_warps": (1, 2, 4, 8)},
    default={"BLOCK": 1024, "num_warps": 4},
    constraints=(("warps_fit_block", lambda c, s, d: c["BLOCK"] >= 32 * c["num_warps"]),),
)


def render_pointwise(graph: Graph, group: KernelGroup, op_name: str) -> Rendered:
    shape = graph.node(group.nodes[0]).type.shape
    rank = len(shape)
    dims = [(d, f"i{d}") for d in range(rank)]
    inputs, names = [], {}
    for i, ref in enumerate(group.inputs):
        inputs.append(operand(f"in{i}", f"a{i}", graph.type_of(ref).dtype,
                              strided_offset(f"in{i}", dims)))
        names[ref] = f"a{i}"
    printer = print_body(graph, group.nodes, names)
    outputs = [operand(f"out{i}", printer.names[ref], graph.type_of(ref).dtype,
                       strided_offset(f"out{i}", dims)) for i, ref in enumerate(group.outputs)]
    source = render("pointwise.j2", kernel=group.name, op_name=op_name,
                    node_list=node_list(graph, group.nodes), inputs=inputs, outputs=outputs,
                    rank=rank, body=printer.code(4))
    return Rendered(group.name, "pointwise", source, list(group.inputs), list(group.outputs),
                    {"shape": shape})


def problem(rendered: Rendered, env) -> dict:
    from dsl import shapes as sh

    numel = 1
    for d in rendered.meta["shape"]:
        numel *= sh.evaluate(d, env)
    return {"numel": numel}


def invoke(module, rendered: Rendered, ins, outs, env, config):
    module.launch(ins, outs, tuple(outs[0].shape), config)


TEMPLATE = register_template(KernelTemplate(
    name="pointwise", sources=("pointwise.j2",), space=SPACE, render=render_pointwise, launch=invoke,
    problem=problem, work=pointwise_work, token_dim="numel",
))
