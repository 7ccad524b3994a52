"""MoE kernel families: routing (moe_route), the expert-sorted grouped GEMM with SwiGLU / weighted
combine epilogues (moe_gemm), the per-expert weight gradient (moe_wgrad) and the fixed-order combine
(moe_combine). All GEMMs share one alignment of the token-slots per ids tensor and BLOCK_M
(moe_align.j2): slots sorted by expert, each expert padded to BLOCK_M in the index list only.

Tuning keys: E, N, K, top-k, the operand width and a token-count bucket M on a dense ladder (powers
of two and their midpoints, so neighbouring buckets are at most 1.5x apart; the lookup's nearest-
shape rule then never borrows a config across a large gap).
"""

from __future__ import annotations

import collections

from dsl import dtypes as dt
from dsl import shapes as sh
from dsl.errors import DSLError
from dsl.graph import Graph, Ref
from dsl.moe import identity_cache_get, identity_cache_put, select_on_logits

from ..partition import KernelGroup
from ..render import Code, load_module, render
from ..space import SearchSpace
from ..template import KernelTemplate, register_template
from ..work import TiledWork, gemm_work, param, stream_work
from .common import Rendered, fused_epilogue, node_list

GEMM_MODES = {"grouped_matmul": "plain", "grouped_matmul_combine": "combine", "moe_gate_up": "swiglu",
              "moe_gate_up_bwd": "swiglu_bwd"}


# ---------------------------------------------------------------------------------------------
# token-count buckets


def token_bucket(n: int) -> int:
    """The smallest ladder value >= n; the ladder is 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, ... (powers
    of two and the midpoints 1.5 * 2^i), so a bucket is never more than 1.5x its neighbour."""
    if n <= 1:
        return 1
    p = 1 << (int(n).bit_length() - 1)
    if n == p:
        return p
    mid = p + p // 2
    return mid if n <= mid and p >= 2 else 2 * p


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# ---------------------------------------------------------------------------------------------
# search spaces


def _gate_up(shape) -> int:
    # Weight tiles per program: 2 for the SwiGLU modes (gate and up), 1 otherwise.
    return shape.get("w_tiles", 1)


def _gemm_smem(config, shape, elem_bytes):
    tile = (config["BLOCK_M"] * config["BLOCK_K"]
            + _gate_up(shape) * config["BLOCK_K"] * config["BLOCK_N"]) * elem_bytes
    # num_stages buffers + 1 KiB: exact on 18 sm_90 compiles (benchmarks/results/static_sm90_2026-12-03).
    return tile * max(1, config["num_stages"]) + 1024


def _rows_per_expert_ok(config, shape, device):
    # A block belongs to one expert: a BLOCK_M far above an expert's average row count is padding.
    rows = shape.get("M", 1 << 30) * shape.get("topk", 1) / max(1, shape.get("E", 1))
    return config["BLOCK_M"] <= max(16, _pow2(int(2 * rows) + 1))


def _gemm_tile_ok(config, shape, device):
    return (config["BLOCK_N"] <= max(16, 2 * shape.get("N", 1 << 30))
            and config["BLOCK_K"] <= max(16, 2 * shape.get("K", 1 << 30)))


def _gemm_smem_ok(config, shape, device):
    if device.vendor == "cpu":
        return True
    return _gemm_smem(config, shape, max(1, shape.get("dtype_bits", 16) // 8)) <= device.smem_per_block


def _gemm_regs_ok(config, shape, device):
    # fp32 accumulators per thread (two for SwiGLU) must leave room for the operand fragments.
    if device.vendor == "cpu":
        return True
    # On sm_90 every clean config also has an output tile of at most 16384 elements: the down
    # GEMM's 128x256 on 8 warps (128 per thread) spills 824 B where gate/up 128x128 does not.
    threads = (32 if device.vendor == "nvidia" else 64) * config["num_warps"]
    return (_gate_up(shape) * config["BLOCK_M"] * config["BLOCK_N"] / threads <= 128
            and config["BLOCK_M"] * config["BLOCK_N"] <= 16384)


GEMM_SPACE = SearchSpace(
    template="moe_gemm",
    params={"BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (16, 32, 64, 128, 256), "BLOCK_K": (16, 32, 64, 128),
            "GROUP_M": (1, 4, 8, 16), "num_warps": (2, 4, 8), "num_stages": (1, 2, 3, 4, 5)},
    default={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
    constraints=(("rows_per_expert", _rows_per_expert_ok), ("tile_fits_problem", _gemm_tile_ok),
                 ("shared_memory", _gemm_smem_ok), ("registers", _gemm_regs_ok)),
    smem_bytes=_gemm_smem,
)


def _wgrad_smem(config, shape, elem_bytes):
    tile = config["BLOCK_M"] * (config["BLOCK_N"] + config["BLOCK_K"]) * elem_bytes
    return tile * max(1, config["num_stages"]) + 1024


WGRAD_SPACE = SearchSpace(
    template="moe_wgrad",
    params={"BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (16, 32, 64, 128), "BLOCK_K": (16, 32, 64, 128),
            "num_warps": (2, 4, 8), "num_stages": (1, 2, 3, 4)},
    default={"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},
    constraints=(("rows_per_expert", _rows_per_expert_ok),
                 ("tile_fits_problem", lambda c, s, d: c["BLOCK_N"] <= max(16, 2 * s.get("N", 1 << 30))
                  and c["BLOCK_K"] <= max(16, 2 * s.get("K", 1 << 30))),
                 ("shared_memory", lambda c, s, d: d.vendor == "cpu" or _wgrad_smem(
                     c, s, max(1, s.get("dtype_bits", 16) // 8)) <= d.smem_per_block),
                 ("registers", lambda c, s, d: d.vendor == "cpu" or c["BLOCK_N"] * c["BLOCK_K"] / (
                     (32 if d.vendor == "nvidia" else 64) * c["num_warps"]) <= 128)),
    smem_bytes=_wgrad_smem,
)

ROUTE_SPACE = SearchSpace(
    template="moe_route",
    params={"BLOCK_R": (1, 2, 4, 8, 16, 32, 64), "num_warps": (1, 2, 4, 8)},
    default={"BLOCK_R": 4, "num_warps": 4},
    constraints=(("tile_elements", lambda c, s, d: c["BLOCK_R"] * _pow2(s.get("E", 1)) <= 16384),
                 ("rows_fit_problem", lambda c, s, d: c["BLOCK_R"] <= max(1, _pow2(s.get("M", 1 << 30))))),
)

COMBINE_SPACE = SearchSpace(
    template="moe_combine",
    params={"BLOCK_T": (1, 2, 4, 8, 16, 32), "BLOCK_N": (32, 64, 128, 256, 512, 1024), "num_warps": (1, 2, 4, 8)},
    default={"BLOCK_T": 16, "BLOCK_N": 128, "num_warps": 4},
    constraints=(("tile_elements", lambda c, s, d: c["BLOCK_T"] * c["BLOCK_N"] <= 16384),
                 ("no_wasted_columns", lambda c, s, d: c["BLOCK_N"] <= max(32, 2 * s.get("N", 1 << 30)))),
)


# ---------------------------------------------------------------------------------------------
# alignment (shared by every GEMM of one ids tensor)

_ALIGN_CACHE: "collections.OrderedDict[int, tuple]" = collections.OrderedDict()


def align_module():
    return load_module(render("moe_align.j2"), "moe_align")


def alignment(ids, num_experts: int, block_m: int):
    """The expert-sorted, BLOCK_M-padded slot layout of ``ids``; computed once per ids tensor (and
    version) and BLOCK_M, so a layer's forward and backward kernels share it."""
    key = (int(num_experts), int(block_m))
    hit = identity_cache_get(_ALIGN_CACHE, ids, key)
    if hit is None:
        hit = align_module().align(ids, num_experts, block_m)
        identity_cache_put(_ALIGN_CACHE, ids, key, hit, size=16)
    return hit


# ---------------------------------------------------------------------------------------------
# shared rendering helpers


def _epilogue(graph, group, anchor, indents=(4,)):
    epi_refs, inputs, outputs, printer = fused_epilogue(graph, group, anchor, acc="val")
    return epi_refs, inputs, outputs, [printer.code(n) for n in indents]


def _add_epilogue_strides(strides: dict, epi, outs, stride_of) -> None:
    """Name the fused epilogue's operands in0.., out0.. in ``strides`` (the launchers' argument order)."""
    for prefix, tensors in (("in", epi), ("out", outs)):
        for i, t in enumerate(tensors):
            strides[f"{prefix}{i}"] = stride_of(t)
            strides["epilogue"].append(f"{prefix}{i}")


def _precision(dtype) -> str:
    return "ieee" if dtype in (dt.f32, dt.f64) else "tf32"


def _slot_strides(t) -> tuple[int, int, int]:
    """(token stride, slot stride, column stride) of a [T, k, N] or [T, N] tensor."""
    if t.dim() == 3:
        return t.stride(0), t.stride(1), t.stride(2)
    return t.stride(0), 0, t.stride(1)


def _check_ids(ids, where):
    if ids.dtype.is_floating_point:
        raise DSLError(f"{where}: ids must be an integer tensor, got {ids.dtype}")


# ---------------------------------------------------------------------------------------------
# moe_gemm


def render_moe_gemm(graph: Graph, group: KernelGroup, op_name: str) -> Rendered:
    anchor = graph.node(group.anchor)
    mode = GEMM_MODES[anchor.op]
    x_ref, w_ref, ids_ref = anchor.inputs[:3]
    x_type, w_type, ids_type = (graph.type_of(r) for r in (x_ref, w_ref, ids_ref))
    weighted = mode == "combine" and anchor.attr["weighted"]
    extra = list(anchor.inputs[3:])     # the routing weights (combine) or dh (swiglu_bwd)
    epi_refs, inputs, outputs, (body, body8) = _epilogue(graph, group, anchor, (4, 8))
    dtype = x_type.dtype
    source = render("moe_gemm.j2", kernel=group.name, op_name=op_name, mode=mode, weighted=weighted,
                    anchor=Code(f"%{anchor.id} {anchor.op}"), node_list=node_list(graph, group.epilogue),
                    inputs=inputs, outputs=outputs, body=body, body8=body8, precision=_precision(dtype),
                    dtype_name=dtype.name)
    transpose_w = bool(anchor.attr.get("transpose_w", False))
    if mode in ("swiglu", "swiglu_bwd"):
        n_dim, k_dim = anchor.attr["hidden"], w_type.shape[2]
    else:
        n_dim = w_type.shape[2] if transpose_w else w_type.shape[1]
        k_dim = x_type.shape[-1]
    meta = {"mode": mode, "weighted": weighted, "transpose_w": transpose_w, "n_extra": len(extra),
            "T": ids_type.shape[0], "topk": ids_type.shape[1], "E": w_type.shape[0], "N": n_dim, "K": k_dim,
            "dtype_bits": dtype.bits}
    return Rendered(group.name, "moe_gemm", source, [x_ref, w_ref, ids_ref] + extra + epi_refs,
                    list(group.outputs), meta)


def _problem(meta, env, **extra) -> dict:
    val = {k: sh.evaluate(meta[k], env) for k in ("T", "topk", "E", "N", "K")}
    out = {"M": token_bucket(val["T"]), "E": max(1, val["E"]), "N": max(1, val["N"]), "K": max(1, val["K"]),
           "topk": max(1, val["topk"]), "dtype_bits": meta["dtype_bits"]}
    out.update(extra)
    return out


def problem_moe_gemm(rendered: Rendered, env) -> dict:
    return _problem(rendered.meta, env, w_tiles=2 if rendered.meta["mode"] in ("swiglu", "swiglu_bwd") else 1)


def invoke_moe_gemm(module, rendered: Rendered, ins, outs, env, config):
    meta = rendered.meta
    mode = meta["mode"]
    x, w, ids = ins[:3]
    extra = ins[3:3 + meta["n_extra"]]
    epi = ins[3 + meta["n_extra"]:]
    _check_ids(ids, rendered.name)
    T, k = ids.shape
    E = w.shape[0]
    if mode in ("swiglu", "swiglu_bwd"):
        N, K = w.shape[1] // 2, w.shape[2]
        w_sn, w_sk = w.stride(1), w.stride(2)
    elif meta["transpose_w"]:
        K, N = w.shape[1], w.shape[2]
        w_sn, w_sk = w.stride(2), w.stride(1)
    else:
        N, K = w.shape[1], w.shape[2]
        w_sn, w_sk = w.stride(1), w.stride(2)
    if not outs or outs[0].numel() == 0:
        return
    out_shape = tuple(outs[0].shape)
    epi = [t.expand(out_shape) for t in epi]
    strides = {"a": _slot_strides(x), "w": (w.stride(0), w_sn, w_sk), "epilogue": []}
    if x.dim() == 2:
        strides["a"] = (x.stride(0), 0, x.stride(1))
    scale = dh = None
    if meta["weighted"]:
        scale = extra[0]
        strides["scale"] = (scale.stride(0), scale.stride(1))
    if mode == "swiglu_bwd":
        dh = extra[0]
        strides["dh"] = _slot_strides(dh)
    _add_epilogue_strides(strides, epi, outs, _slot_strides)
    align = alignment(ids, E, config["BLOCK_M"])
    module.launch(x, w, align, scale, dh, epi, outs, strides, T * k, N, K, E, k, config)


# ---------------------------------------------------------------------------------------------
# moe_wgrad


def render_moe_wgrad(graph: Graph, group: KernelGroup, op_name: str) -> Rendered:
    anchor = graph.node(group.anchor)
    x_ref, dy_ref, ids_ref = anchor.inputs[:3]
    scaled = anchor.attr["scaled"]
    extra = list(anchor.inputs[3:])
    epi_refs, inputs, outputs, (body,) = _epilogue(graph, group, anchor)
    dtype = graph.type_of(x_ref).dtype
    source = render("moe_wgrad.j2", kernel=group.name, op_name=op_name, scaled=scaled,
                    anchor=Code(f"%{anchor.id} grouped_matmul_dw"), node_list=node_list(graph, group.epilogue),
                    inputs=inputs, outputs=outputs, body=body, precision=_precision(dtype), dtype_name=dtype.name)
    ids_type = graph.type_of(ids_ref)
    meta = {"scaled": scaled, "n_extra": len(extra), "T": ids_type.shape[0], "topk": ids_type.shape[1],
            "E": anchor.attr["E"], "N": graph.type_of(dy_ref).shape[-1], "K": graph.type_of(x_ref).shape[-1],
            "dtype_bits": dtype.bits}
    return Rendered(group.name, "moe_wgrad", source, [x_ref, dy_ref, ids_ref] + extra + epi_refs,
                    list(group.outputs), meta)


def problem_moe_wgrad(rendered: Rendered, env) -> dict:
    return _problem(rendered.meta, env)


def invoke_moe_wgrad(module, rendered: Rendered, ins, outs, env, config):
    meta = rendered.meta
    x, dy, ids = ins[:3]
    extra = ins[3:3 + meta["n_extra"]]
    epi = ins[3 + meta["n_extra"]:]
    _check_ids(ids, rendered.name)
    T, k = ids.shape
    E, N, K = outs[0].shape
    if outs[0].numel() == 0:
        return
    epi = [t.expand(outs[0].shape) for t in epi]
    strides = {"x": _slot_strides(x), "dy": _slot_strides(dy), "epilogue": []}
    scale = None
    if meta["scaled"]:
        scale = extra[0]
        strides["scale"] = (scale.stride(0), scale.stride(1))
    _add_epilogue_strides(strides, epi, outs, lambda t: tuple(t.stride()))
    align = alignment(ids, E, config["BLOCK_M"])
    module.launch(x, dy, align, scale, epi, outs, strides, T * k, N, K, E, k, config)


# ---------------------------------------------------------------------------------------------
# moe_route


def render_moe_route(graph: Graph, group: KernelGroup, op_name: str) -> Rendered:
    anchor = graph.node(group.anchor)
    a = anchor.attr
    x_type = graph.type_of(anchor.inputs[0])
    common = dict(kernel=group.name, op_name=op_name, anchor=Code(f"%{anchor.id} {anchor.op}"),
                  dtype_name=x_type.dtype.name, gate=a["gate"], renormalize=a["renormalize"])
    if anchor.op == "route_bwd":
        epi_refs, inputs, outputs, (body,) = _epilogue(graph, group, anchor)
        source = render("moe_route.j2", mode="bwd", node_list=node_list(graph, group.epilogue),
                        inputs=inputs, outputs=outputs, body=body, **common)
        refs = list(anchor.inputs) + epi_refs
        ids_shape = graph.type_of(anchor.inputs[1]).shape
    else:
        has_bias = len(anchor.inputs) == 2
        source = render("moe_route.j2", mode=anchor.op, node_list=Code("none"), has_bias=has_bias,
                        select_logits=select_on_logits(a["gate"], has_bias, a["n_groups"], a["group_score"]),
                        n_groups=a["n_groups"], topk_groups=a["topk_groups"], group_score=a["group_score"],
                        val_triton=Code(anchor.types[0].dtype.triton), **common)
        refs = list(anchor.inputs)
        ids_shape = anchor.types[1].shape
        # Both outputs are always written (the kernel produces them together), used or not.
        group.outputs = [Ref(anchor.id, 0), Ref(anchor.id, 1)]
    rows = x_type.shape[:-1]
    meta = {"op": anchor.op, "rows": rows, "E": x_type.shape[-1], "topk": ids_shape[-1],
            "n_groups": a.get("n_groups", 1)}
    return Rendered(group.name, "moe_route", source, refs, list(group.outputs), meta)


def problem_moe_route(rendered: Rendered, env) -> dict:
    meta = rendered.meta
    rows = 1
    for d in meta["rows"]:
        rows *= sh.evaluate(d, env)
    return {"M": token_bucket(rows), "E": max(1, sh.evaluate(meta["E"], env)),
            "topk": max(1, sh.evaluate(meta["topk"], env))}


def invoke_moe_route(module, rendered: Rendered, ins, outs, env, config):
    meta = rendered.meta
    if meta["op"] == "route_bwd":
        x, ids, ct = ins[:3]
        _check_ids(ids, rendered.name)
        module.launch(x, ids, ct, ins[3:], outs, config)
        return
    x = ins[0]
    E, k = x.shape[-1], outs[1].shape[-1]
    if k > E:
        raise DSLError(f"top-k {k} is larger than the number of experts {E}", op=rendered.name)
    bias = ins[1] if len(ins) == 2 else None
    module.launch(x, bias, outs[0], outs[1], meta["n_groups"], config)


# ---------------------------------------------------------------------------------------------
# moe_combine


def render_moe_combine(graph: Graph, group: KernelGroup, op_name: str) -> Rendered:
    anchor = graph.node(group.anchor)
    epi_refs, inputs, outputs, (body,) = _epilogue(graph, group, anchor)
    y_type = graph.type_of(anchor.inputs[0])
    source = render("moe_combine.j2", kernel=group.name, op_name=op_name,
                    anchor=Code(f"%{anchor.id} combine"), node_list=node_list(graph, group.epilogue),
                    inputs=inputs, outputs=outputs, body=body, dtype_name=y_type.dtype.name)
    meta = {"T": y_type.shape[0], "topk": y_type.shape[1], "N": y_type.shape[2]}
    return Rendered(group.name, "moe_combine", source, list(anchor.inputs) + epi_refs, list(group.outputs), meta)


def problem_moe_combine(rendered: Rendered, env) -> dict:
    meta = rendered.meta
    return {"M": token_bucket(sh.evaluate(meta["T"], env)), "N": max(1, sh.evaluate(meta["N"], env)),
            "topk": max(1, sh.evaluate(meta["topk"], env))}


def invoke_moe_combine(module, rendered: Rendered, ins, outs, env, config):
    y, w = ins[:2]
    if outs[0].numel() == 0:
        return
    epi = [t.expand(outs[0].shape) for t in ins[2:]]
    strides = {"epilogue": []}
    _add_epilogue_strides(strides, epi, outs, _slot_strides)
    module.launch(y, w, epi, outs, strides, config)


# ---------------------------------------------------------------------------------------------
# cost functions: what one launch does at a tuning problem (uniform routing assumed: each of the
# min(E, M*topk) active experts gets M*topk/E rows, padded to BLOCK_M per expert)


def _compute_dtype(problem) -> str:
    return str(problem.get("dtype", "f32" if problem.get("dtype_bits", 16) == 32 else "f16"))


def expert_rows(problem) -> tuple[int, int]:
    """(active experts, routed rows per active expert) of a tuning problem."""
    slots = max(1, int(problem["M"]) * int(problem.get("topk", 1)))
    active = max(1, min(int(problem.get("E", 1)), slots))
    return active, -(-slots // active)


def moe_gemm_work(problem, config, device) -> TiledWork:
    """A batched GEMM over the active experts; SwiGLU modes compute the gate and up tiles (w_tiles
    2) in one program, which is a BLOCK_N twice as wide for work, traffic and registers."""
    active, rows = expert_rows(problem)
    tiles = int(problem.get("w_tiles", 1))
    cfg = dict(config, BLOCK_N=param(config, "BLOCK_N") * tiles)
    passed = {k: problem[k] for k in ("b_bytes", "dequant_ops", "out_bytes") if k in problem}
    return gemm_work({"B": active, "M": rows, "N": int(problem["N"]) * tiles, "K": problem["K"],
                      "dtype": _compute_dtype(problem), **passed}, cfg, device)


def moe_wgrad_work(problem, config, device) -> TiledWork:
    """dW[e] = X_e^T dY_e: an [N, K] output tile per program (BLOCK_N x BLOCK_K), reduced over the
    expert's rows in BLOCK_M steps."""
    active, rows = expert_rows(problem)
    cfg = {"BLOCK_M": param(config, "BLOCK_N"), "BLOCK_N": param(config, "BLOCK_K"),
           "BLOCK_K": param(config, "BLOCK_M"), "num_warps": param(config, "num_warps", 4),
           "num_stages": param(config, "num_stages", 2)}
    return gemm_work({"B": active, "M": problem["N"], "N": problem["K"], "K": rows,
                      "dtype": _compute_dtype(problem)}, cfg, device)


def moe_route_work(problem, config, device) -> TiledWork:
    # Read a row of E logits (padded to a power of two), write k weights and k ids.
    e = _pow2(int(problem["E"]))
    k = int(problem.get("topk", 1))
    tile = param(config, "BLOCK_R") * e
    return stream_work(int(problem["M"]) * e, tile, param(config, "num_warps", 4), 2 + 12 * k / e, device,
                       "f32", flops_per_elem=float(k))


def moe_combine_work(problem, config, device) -> TiledWork:
    # Read topk expert rows and their weights per output element, write one.
    k = int(problem.get("topk", 1))
    tile = param(config, "BLOCK_T") * param(config, "BLOCK_N")
    return stream_work(int(problem["M"]) * int(problem["N"]), tile, param(config, "num_warps", 4),
                       2.0 * (k + 1), device, "f32", flops_per_elem=2.0 * k)


GEMM_TEMPLATE = register_template(KernelTemplate(
    name="moe_gemm", sources=("moe_gemm.j2", "moe_align.j2", "moe_common.j2"), space=GEMM_SPACE,
    render=render_moe_gemm, launch=invoke_moe_gemm, problem=problem_moe_gemm, work=moe_gemm_work,
    anchors=tuple(GEMM_MODES),
))
WGRAD_TEMPLATE = register_template(KernelTemplate(
    name="moe_wgrad", sources=("moe_wgrad.j2", "moe_align.j2", "moe_common.j2"), space=WGRAD_SPACE,
    render=render_moe_wgrad, launch=invoke_moe_wgrad, problem=problem_moe_wgrad, work=moe_wgrad_work,
    anchors=("grouped_matmul_dw",),
))
ROUTE_TEMPLATE = register_template(KernelTemplate(
    name="moe_route", sources=("moe_route.j2",), space=ROUTE_SPACE, render=render_moe_route,
    launch=invoke_moe_route, problem=problem_moe_route, work=moe_route_work,
    anchors=("route", "topk", "route_bwd"),
))
COMBINE_TEMPLATE = register_template(KernelTemplate(
    name="moe_combine", sources=("moe_combine.j2",), space=COMBINE_SPACE, render=render_moe_combine,
    launch=invoke_moe_combine, problem=problem_moe_combine, work=moe_combine_work, anchors=("combine",),
))

__all__ = ["token_bucket", "alignment", "align_module", "GEMM_SPACE", "WGRAD_SPACE", "ROUTE_SPACE",
           "COMBINE_SPACE", "GEMM_MODES"]
