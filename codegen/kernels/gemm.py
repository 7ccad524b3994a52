"""The tiled GEMM template with a fused elementwise epilogue."""

from __future__ import annotations

from dsl import dtypes as dt
from dsl.graph import Graph

from ..partition import KernelGroup
from ..render import Code, render
from ..space import SearchSpace
from ..template import KernelTemplate, register_template
from ..work import gemm_work
from .common import Rendered, fused_epilogue, node_list


def _smem(config, shape, elem_bytes):
    # Software pipelining keeps num_stages buffers of the A and B tiles in shared memory (as Triton
    # allocates them: one per stage, not num_stages - 1).
    # Calibrated exactly on 11 sm_90 compiles of recorded launches (benchmarks/results/
    # static_sm90_2026-12-03): num_stages buffers plus 1 KiB of scratch.
    tile = (config["BLOCK_M"] + config["BLOCK_N"]) * config["BLOCK_K"] * elem_bytes
    return tile * max(1, config["num_stages"]) + 1024


def _fits_problem(config, shape, device):
    # Tiles far larger than the problem only waste work; keep at most one padded power of two.
    m, n = shape.get("M", 1 << 30), shape.get("N", 1 << 30)
    return config["BLOCK_M"] <= max(16, 2 * m) and config["BLOCK_N"] <= max(16, 2 * n)


def _smem_ok(config, shape, device):
    return device.vendor == "cpu" or _smem(config, shape, 2) <= device.smem_per_block


def _regs_ok(config, shape, device):
    # fp32 accumulator registers per thread must leave room for operands (255 max on NVIDIA); on
    # sm_90 compiles 128 per thread never spills at 4 or 8 warps, 256 always does.
    if device.vendor == "cpu":
        return True
    threads = 32 * config["num_warps"] if device.vendor == "nvidia" else 64 * config["num_warps"]
    return config["BLOCK_M"] * config["BLOCK_N"] / threads <= 128


SPACE = SearchSpace(
    template="gemm",
    params={"BLOCK_M": (16, 32, 64, 128, 256), "BLOCK_N": (16, 32, 64, 128, 256),
            "BLOCK_K": (16, 32, 64, 128), "GROUP_M": (1, 4, 8),
            "num_warps": (2, 4, 8), "num_stages": (1, 2, 3, 4, 5)},
    default={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
    constraints=(("tile_fits_problem", _fits_problem), ("shared_memory", _smem_ok),
                 ("registers", _regs_ok)),
    smem_bytes=_smem,
)


def render_gemm(graph: Graph, group: KernelGroup, op_name: str) -> Rendered:
    anchor = graph.node(group.anchor)
    a_ref, b_ref = anchor.inputs
    dtype = anchor.type.dtype
    epi_inputs, inputs, outputs, printer = fused_epilogue(graph, group, anchor)
    precision = "ieee" if dtype in (dt.f32, dt.f64) else "tf32"
    source = render("gemm.j2", kernel=group.name, op_name=op_name, anchor=Code(f"%{anchor.id} matmul"),
                    node_list=node_list(graph, group.epilogue), inputs=inputs, outputs=outputs,
                    body=printer.code(4), precision=precision)
    return Rendered(group.name, "gemm", source, [a_ref, b_ref] + epi_inputs, list(group.outputs),
                    {"shape": anchor.type.shape, "k": graph.type_of(a_ref).shape[-1]})


def problem(rendered: Rendered, env) -> dict:
    from dsl import shapes as sh

    shape = [sh.evaluate(d, env) for d in rendered.meta["shape"]]
    batch = 1
    for d in shape[:-2]:
        batch *= d
    return {"B": batch, "M": shape[-2], "N": shape[-1], "K": sh.evaluate(rendered.meta["k"], env)}


def invoke(module, rendered: Rendered, ins, outs, env, config):
    module.launch(ins[0], ins[1], ins[2:], outs, config)


TEMPLATE = register_template(KernelTemplate(
    name="gemm", sources=("gemm.j2",), space=SPACE, render=render_gemm, launch=invoke, problem=problem,
    work=gemm_work, token_dim="M", anchors=("matmul",),
))
