"""A graph compiled to Triton kernels and how it runs: kernels through their templates' launchers,
views as torch views, extern primitives by their reference semantics. The runtime's compiled ops
and the tuner both build programs from here."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from dsl import shapes as sh
from dsl.graph import Graph, Ref
from dsl.reference import eval_node

from .kernels import render_group
from .partition import Step, partition
from .render import load_module, source_hash
from .template import get_template


@dataclasses.dataclass
class KernelInfo:
    """A generated kernel as users see it: ``CompiledOp.kernels``."""

    name: str
    template: str
    source: str
    source_hash: str
    nodes: list[int]

    def __repr__(self) -> str:
        return f"<kernel {self.name} template={self.template} hash={self.source_hash}>"


class TritonProgram:
    """A graph compiled to Triton kernels. ``config_for(kernel_info, problem, env) -> config`` picks the
    launch configuration of each kernel (the runtime's lookup chain)."""

    def __init__(self, graph: Graph, op_name: str):
        self.graph = graph
        self.steps: list[Step] = partition(graph)
        self.rendered = {}
        self.modules = {}
        self.infos: list[KernelInfo] = []
        for step in self.steps:
            if step.kind != "kernel":
                continue
            r = render_group(graph, step.kernel, op_name)
            self.rendered[step.kernel.name] = r
            self.infos.append(KernelInfo(r.name, r.template, r.source, source_hash(r.source),
                                         list(step.kernel.nodes)))

    def module(self, name: str):
        if name not in self.modules:
            self.modules[name] = load_module(self.rendered[name].source, name)
        return self.modules[name]

    def problem(self, name: str, env) -> dict:
        r = self.rendered[name]
        return get_template(r.template).problem(r, env)

    def run(self, tensors, env: dict[str, int], config_for: Callable[[KernelInfo, dict, dict], dict]):
        graph = self.graph
        device = tensors[0].device if tensors else torch.device("cpu")
        values: dict[Ref, torch.Tensor] = {Ref(nid): t for nid, t in zip(graph.inputs, tensors)}
        infos = {i.name: i for i in self.infos}
        for step in self.steps:
            if step.kind == "kernel":
                r = self.rendered[step.kernel.name]
                ins = [values[ref] for ref in r.input_refs]
                outs = []
                for ref in r.output_refs:
                    t = graph.type_of(ref)
                    shape = tuple(sh.evaluate(d, env) for d in t.shape)
                    out = torch.empty(shape, dtype=t.dtype.torch, device=device)
                    values[ref] = out
                    outs.append(out)
                template = get_template(r.template)
                config = config_for(infos[r.name], template.problem(r, env), env)
                template.launch(self.module(r.name), r, ins, outs, env, config)
            else:
                node = graph.node(step.node)
                outs = eval_node(node, [values[ref] for ref in node.inputs], env)
                for i, o in enumerate(outs):
                    values[Ref(node.id, i)] = o.to(device) if o.device != device else o
        results = []
        for ref in graph.outputs:
            if ref not in values:  # an output that is a constant
                node = graph.node(ref.node)
                values[ref] = eval_node(node, [], env)[0].to(device)
            results.append(values[ref])
        return results
