"""Attention kernel families: flash-attention forward and backward (dense and varlen), paged decode
attention with split-K, and rotary embedding. Each renders its template (codegen/templates/
attention_*.j2), launches it with the tensors' strides, and names the sizes that key its tuning
records: head dim, GQA ratio and power-of-two sequence-length buckets (causal and varlen are part
of the rendered source, hence of the source hash that keys records too)."""

from __future__ import annotations

from dsl import dtypes as dt
from dsl import shapes as sh
from dsl.attention_prims import (check_attention_sizes, check_heads, check_paged, resolve_scale, runtime_check,
                           varlen_lengths)
from dsl.errors import DSLError
from dsl.graph import Graph, Ref

from ..partition import KernelGroup
from ..printer import literal
from ..render import Code, render
from ..space import SearchSpace
from ..template import KernelTemplate, register_template
from ..work import TiledWork, dtype_of, param, stream_work
from .common import Rendered, fused_epilogue, node_list

FWD, BWD, PAGED, ROTARY = "attention_fwd", "attention_bwd", "attention_paged", "attention_rotary"
VARLEN_OPS = ("attention_varlen", "attention_varlen_bwd")


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def seq_bucket(n: int) -> int:
    """Sequence lengths key tuning records by power-of-two bucket (at least 16)."""
    return max(16, _pow2(n))


def _threads(config, device) -> int:
    return (64 if device.vendor == "amd" else 32) * config["num_warps"]


# ---------------------------------------------------------------------------------------------
# search spaces


def _fwd_smem(config, shape, elem_bytes):
    d = _pow2(shape.get("D", 128))
    q_tile = config["BLOCK_M"] * d
    kv_tiles = 2 * config["BLOCK_N"] * d * max(1, config["num_stages"])  # num_stages buffers each
    # Exact on 10 sm_90 compiles of recorded launches (benchmarks/results/static_sm90_2026-12-03).
    return (q_tile + kv_tiles) * elem_bytes + 1024


def _bwd_smem(config, shape, elem_bytes):
    # dK/dV kernel: k and v stay resident, q and dO tiles are pipelined.
    d = _pow2(shape.get("D", 128))
    kv = 2 * config["BLOCK_N"] * d
    q_do = 2 * config["BLOCK_M"] * d * max(1, config["num_stages"])
    # At or above the sm_90 compiles within 512 B: the pipelined q/dO tiles plus row statistics.
    return (kv + q_do) * elem_bytes + 1024 + max(1, config["num_stages"]) * config["BLOCK_M"] * 8


def _smem_ok(estimate):
    def check(config, shape, device):
        return device.vendor == "cpu" or estimate(config, shape, 2) <= device.smem_per_block
    return check


def _fwd_regs_ok(config, shape, device):
    # fp32 accumulator [BLOCK_M, D] plus the score tile [BLOCK_M, BLOCK_N] per thread. Calibrated on
    # sm_90 compiles of the launch as the runtime specialises it (benchmarks/results/
    # static_sm90_2026-12-03): 128 per thread is clean (the Triton tutorial's Hopper 128x128 on 8
    # warps: 239 registers, 0 spills; 64x128 on 4 warps), 192 spills (128x64 on 4, 256x64 on 8).
    if device.vendor == "cpu":
        return True
    d = _pow2(shape.get("D", 128))
    return config["BLOCK_M"] * (d + config["BLOCK_N"]) / _threads(config, device) <= 128


def _bwd_regs_ok(config, shape, device):
    # The dK/dV kernel holds its two [BLOCK_N, D] accumulators and streams [BLOCK_M, D] query and
    # dO tiles; on sm_90 compiles the query tile decides (every BLOCK_M=64 config at D=128 spills,
    # every 4-warp config spills; 32x128 on 8 warps is clean at 253 registers): both bounds fit all 9.
    if device.vendor == "cpu":
        return True
    d = _pow2(shape.get("D", 128))
    threads = _threads(config, device)
    return config["BLOCK_M"] * d / threads <= 16 and 2 * config["BLOCK_N"] * d / threads <= 128


def _tiles_fit(m_key, n_key):
    def check(config, shape, device):
        return (config["BLOCK_M"] <= max(16, shape.get(m_key, 1 << 30))
                and config["BLOCK_N"] <= max(16, shape.get(n_key, 1 << 30)))
    return check


def _warps_fit(config, shape, device):
    # Each warp of a tl.dot owns at least 16 rows of the query (or key) tile.
    return 16 * config["num_warps"] <= max(config["BLOCK_M"], config["BLOCK_N"]) * 2


_ATTN_PARAMS = {"BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (16, 32, 64, 128), "num_warps": (2, 4, 8),
                "num_stages": (1, 2, 3, 4)}

FWD_SPACE = SearchSpace(
    template=FWD,
    params=dict(_ATTN_PARAMS),
    default={"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    constraints=(("tile_fits_problem", _tiles_fit("Sq", "Sk")), ("shared_memory", _smem_ok(_fwd_smem)),
                 ("registers", _fwd_regs_ok), ("warps_fit_tile", _warps_fit)),
    smem_bytes=_fwd_smem,
)

# BLOCK_M x BLOCK_N are the (query, key) tiles of the dK/dV kernel; the dQ kernel uses them swapped
# (BLOCK_N query rows, BLOCK_M keys), so one config makes both kernels' resident tile the large one.
BWD_SPACE = SearchSpace(
    template=BWD,
    params=dict(_ATTN_PARAMS),
    default={"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    constraints=(("tile_fits_problem", _tiles_fit("Sq", "Sk")), ("shared_memory", _smem_ok(_bwd_smem)),
                 ("registers", _bwd_regs_ok), ("warps_fit_tile", _warps_fit)),
    smem_bytes=_bwd_smem,
)


def _paged_smem(config, shape, elem_bytes):
    d = _pow2(shape.get("D", 128))
    return (16 * d + 2 * config["BLOCK_N"] * d * max(1, config["num_stages"])) * elem_bytes + 1024


PAGED_SPACE = SearchSpace(
    template=PAGED,
    params={"BLOCK_N": (16, 32, 64, 128), "NUM_SPLITS": (1, 2, 4, 8, 16), "num_warps": (1, 2, 4, 8),
            "num_stages": (1, 2, 3)},
    default={"BLOCK_N": 64, "NUM_SPLITS": 4, "num_warps": 4, "num_stages": 2},
    constraints=(
        # Every split owns at least one key block of a context that fills the block table.
        ("splits_need_context",
         lambda c, s, d: c["NUM_SPLITS"] * c["BLOCK_N"] <= max(c["BLOCK_N"], s.get("L", 1 << 30))),
        ("block_fits_context", lambda c, s, d: c["BLOCK_N"] <= max(16, s.get("L", 1 << 30))),
        ("shared_memory", _smem_ok(_paged_smem)),
    ),
    smem_bytes=_paged_smem,
)

ROTARY_SPACE = SearchSpace(
    template=ROTARY,
    params={"BLOCK_R": (1, 2, 4, 8, 16, 32, 64), "num_warps": (1, 2, 4, 8)},
    default={"BLOCK_R": 16, "num_warps": 4},
    constraints=(("tile_elements", lambda c, s, d: c["BLOCK_R"] * _pow2(s.get("D", 128)) <= 16384),
                 ("rows_fit_problem", lambda c, s, d: c["BLOCK_R"] <= max(1, s.get("R", 1 << 30)))),
)


# ---------------------------------------------------------------------------------------------
# flash attention forward / backward


def _precision(dtype) -> str:
    # fp32 inputs must stay exact fp32 (tf32 would break the accuracy contract); 16-bit inputs
    # use the tensor cores natively.
    return "ieee" if dtype is dt.f32 else "tf32"


def _attention_meta(graph: Graph, anchor) -> dict:
    q_t = graph.type_of(anchor.inputs[0])
    k_t = graph.type_of(anchor.inputs[1])
    attrs = anchor.attr
    return {"op": anchor.op, "varlen": anchor.op in VARLEN_OPS, "causal": attrs["causal"],
            "scale": attrs["scale"], "max_q": attrs.get("max_q"), "max_k": attrs.get("max_k"),
            "q_shape": q_t.shape, "k_shape": k_t.shape}


def render_attention_fwd(graph: Graph, group: KernelGroup, op_name: str) -> Rendered:
    anchor = graph.node(group.anchor)
    meta = _attention_meta(graph, anchor)
    source = render("attention_fwd.j2", kernel=group.name, op_name=op_name,
                    anchor=Code(f"%{anchor.id} {anchor.op}"), causal=meta["causal"], varlen=meta["varlen"],
                    precision=_precision(anchor.type.dtype))
    # Both outputs always: the kernel writes the log-sum-exp even when only the backward reads it.
    outs = [Ref(anchor.id, 0), Ref(anchor.id, 1)]
    return Rendered(group.name, FWD, source, list(anchor.inputs), outs, meta)


def render_attention_bwd(graph: Graph, group: KernelGroup, op_name: str) -> Rendered:
    anchor = graph.node(group.anchor)
    meta = _attention_meta(graph, anchor)
    source = render("attention_bwd.j2", kernel=group.name, op_name=op_name,
                    anchor=Code(f"%{anchor.id} {anchor.op}"), causal=meta["causal"], varlen=meta["varlen"],
                    precision=_precision(graph.type_of(anchor.inputs[0]).dtype))
    outs = [Ref(anchor.id, i) for i in range(3)]
    return Rendered(group.name, BWD, source, list(anchor.inputs), outs, meta)


def _varlen_sizes(meta, q, k, cu_q, cu_k):
    if q.device.type == "meta":
        # A launch recorded without data (the tuner's static check): token totals bound the lengths.
        return q.shape[0], k.shape[0], cu_q.shape[0] - 1
    _, _, lens_q, lens_k = varlen_lengths(q, k, cu_q, cu_k, meta["causal"], meta["max_q"], meta["max_k"])
    return max(lens_q, default=0), max(lens_k, default=0), len(lens_q)


def invoke_fwd(module, rendered: Rendered, ins, outs, env, config):
    meta = rendered.meta
    out, lse = outs
    if meta["varlen"]:
        q, k, v, cu_q, cu_k = ins
        max_q, _max_k, n_seq = _varlen_sizes(meta, q, k, cu_q, cu_k)
        cu_q, cu_k = cu_q.contiguous(), cu_k.contiguous()
        head_dim = q.shape[2]
    else:
        q, k, v = ins
        runtime_check(check_attention_sizes, q.shape, k.shape, meta["causal"])
        cu_q = cu_k = None
        max_q, n_seq, head_dim = q.shape[2], q.shape[0], q.shape[3]
    module.launch(q, k, v, out, lse, cu_q, cu_k, max_q=max_q, n_seq=n_seq,
                  scale=resolve_scale(meta["scale"], head_dim), config=config)


def invoke_bwd(module, rendered: Rendered, ins, outs, env, config):
    meta = rendered.meta
    dq, dk, dv = outs
    if meta["varlen"]:
        q, k, v, cu_q, cu_k, out, lse, dout = ins
        max_q, max_k, n_seq = _varlen_sizes(meta, q, k, cu_q, cu_k)
        cu_q, cu_k = cu_q.contiguous(), cu_k.contiguous()
        head_dim = q.shape[2]
    else:
        q, k, v, out, lse, dout = ins
        runtime_check(check_attention_sizes, q.shape, k.shape, meta["causal"])
        cu_q = cu_k = None
        max_q, max_k, n_seq, head_dim = q.shape[2], k.shape[2], q.shape[0], q.shape[3]
    module.launch(q, k, v, out, lse, dout, dq, dk, dv, cu_q, cu_k, max_q=max_q, max_k=max_k, n_seq=n_seq,
                  scale=resolve_scale(meta["scale"], head_dim), config=config)


def _attention_problem(rendered: Rendered, env) -> dict:
    meta = rendered.meta
    q = [sh.evaluate(d, env) for d in meta["q_shape"]]
    k = [sh.evaluate(d, env) for d in meta["k_shape"]]
    h, h_kv = q[1], max(1, k[1])
    base = {"H": max(1, h), "G": max(1, h // h_kv), "D": max(1, q[-1])}
    if meta["varlen"]:
        # Packed: the total token counts stand in for the sequence lengths.
        return dict(base, Sq=seq_bucket(q[0]), Sk=seq_bucket(k[0]))
    return dict(base, B=max(1, q[0]), Sq=seq_bucket(q[2]), Sk=seq_bucket(k[2]))


# ---------------------------------------------------------------------------------------------
# single-output anchors with a fused elementwise epilogue (paged decode, rotary)




def render_paged(graph: Graph, group: KernelGroup, op_name: str) -> Rendered:
    anchor = graph.node(group.anchor)
    epi_refs, inputs, outputs, printer = fused_epilogue(graph, group, anchor)
    source = render("attention_paged.j2", kernel=group.name, op_name=op_name,
                    anchor=Code(f"%{anchor.id} paged_attention"), node_list=node_list(graph, group.epilogue),
                    inputs=inputs, outputs=outputs, body=printer.code(4),
                    precision=_precision(anchor.type.dtype))
    k_t = graph.type_of(anchor.inputs[1])
    t_t = graph.type_of(anchor.inputs[3])
    return Rendered(group.name, PAGED, source, list(anchor.inputs) + epi_refs, list(group.outputs),
                    {"scale": anchor.attr["scale"], "q_shape": anchor.type.shape, "k_shape": k_t.shape,
                     "table_shape": t_t.shape})


def invoke_paged(module, rendered: Rendered, ins, outs, env, config):
    q, k_cache, v_cache, table, lens = ins[:5]
    if q.device.type == "cpu":
        # On the CPU (the interpreter) checking is cheap; on a GPU it would cost a host sync per
        # decode step, so there the kernel clamps lengths to the table and reads no unused slot.
        check_paged(q, k_cache, table, lens)
    else:
        runtime_check(check_heads, int(q.shape[1]), int(k_cache.shape[2]), "paged_attention")
    module.launch(q, k_cache, v_cache, table, lens, list(ins[5:]), outs,
                  scale=resolve_scale(rendered.meta["scale"], q.shape[2]), config=config)


def _paged_problem(rendered: Rendered, env) -> dict:
    meta = rendered.meta
    b, h, d = (sh.evaluate(x, env) for x in meta["q_shape"])
    _, block_size, h_kv, _ = (sh.evaluate(x, env) for x in meta["k_shape"])
    max_blocks = sh.evaluate(meta["table_shape"][1], env)
    return {"B": max(1, b), "H": max(1, h), "G": max(1, h // max(1, h_kv)), "D": max(1, d),
            "L": seq_bucket(max_blocks * block_size), "P": max(1, block_size)}


def _const_literal(graph: Graph, ref: Ref):
    node = graph.node(ref.node)
    if node.op != "const":
        return None
    # Constants are not materialised for kernels: print them (fp32 compute type) into the source.
    return Code(literal(node.attr["value"], dt.f32))


def render_rotary(graph: Graph, group: KernelGroup, op_name: str) -> Rendered:
    anchor = graph.node(group.anchor)
    x_ref, cos_ref, sin_ref = anchor.inputs
    cos_lit, sin_lit = _const_literal(graph, cos_ref), _const_literal(graph, sin_ref)
    epi_refs, inputs, outputs, printer = fused_epilogue(graph, group, anchor)
    source = render("attention_rotary.j2", kernel=group.name, op_name=op_name,
                    anchor=Code(f"%{anchor.id} rotary"), adjoint=anchor.attr["adjoint"],
                    cos_literal=cos_lit, sin_literal=sin_lit,
                    node_list=node_list(graph, group.epilogue), inputs=inputs, outputs=outputs,
                    body=printer.code(4))
    tables = [r for r, lit in ((cos_ref, cos_lit), (sin_ref, sin_lit)) if lit is None]
    return Rendered(group.name, ROTARY, source, [x_ref] + tables + epi_refs, list(group.outputs),
                    {"shape": anchor.type.shape, "cos_const": cos_lit is not None,
                     "sin_const": sin_lit is not None})


def invoke_rotary(module, rendered: Rendered, ins, outs, env, config):
    ins = list(ins)
    x = ins.pop(0)
    cos = None if rendered.meta["cos_const"] else ins.pop(0)
    sin = None if rendered.meta["sin_const"] else ins.pop(0)
    if x.shape[-1] % 2:
        raise DSLError(f"rotary: the last dim of x must be even, got {x.shape[-1]}")
    module.launch(x, cos, sin, ins, outs, config)


def _rotary_problem(rendered: Rendered, env) -> dict:
    shape = [sh.evaluate(d, env) for d in rendered.meta["shape"]]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return {"R": max(1, rows), "D": max(1, shape[-1])}


# ---------------------------------------------------------------------------------------------
# cost functions: what one launch does at a tuning problem


def _attention_work(problem, config, device, *, gemms: int, resident: str) -> TiledWork:
    """Flash attention as tiles: a program owns BLOCK_M query rows (``resident`` "q", forward) or
    BLOCK_N key rows ("k", backward dK/dV) of one head and loops over the other side in blocks,
    ``gemms`` tile GEMMs per step (2 forward: QK^T and PV; 5 backward). Causal masking is in the
    source hash, not the problem, so a full square is assumed (an upper bound that ranks alike)."""
    dtype, size = dtype_of(problem)
    b, h, d = int(problem.get("B", 1)), int(problem["H"]), _pow2(int(problem["D"]))
    sq, sk = int(problem["Sq"]), int(problem["Sk"])
    bm, bn = param(config, "BLOCK_M"), param(config, "BLOCK_N")
    warps, stages = param(config, "num_warps", 4), param(config, "num_stages", 2)
    own, other, own_len, other_len = (bm, bn, sq, sk) if resident == "q" else (bn, bm, sk, sq)
    iters = -(-other_len // other)
    programs = b * h * -(-own_len // own)
    threads = warps * device.warp_size
    flops = 2.0 * gemms * own * other * d * iters
    load = 2 * other * d * size * iters + own * d * size
    dram = b * h * (sq + 2 * sk) * d * size * (1 if resident == "q" else 2) + b * h * sq * d * size
    smem = (own * d + 2 * other * d * max(1, stages)) * size
    # Accumulators ([own, D] fp32, two for dK/dV) and the score tile [own, other] per thread.
    accs = 1 if resident == "q" else 2
    regs = int((accs * own * d + own * other) / threads + 40)
    efficiency = min(1.0, (own * other / warps / 1024.0) ** 0.5)
    if device.vendor == "nvidia" and device.compute_capability >= 90 and own < 64 * max(1, warps // 4):
        efficiency *= 0.6  # below a warpgroup's 64 rows: no wgmma
    return TiledWork(programs=programs, flops_per_program=flops, load_bytes_per_program=load,
                     dram_bytes=float(dram), k_iters=iters, smem_bytes=int(smem), regs_per_thread=regs,
                     threads=threads, dtype=dtype, efficiency=efficiency,
                     overlap={1: 0.0, 2: 0.7}.get(stages, 1.0), latency_hiding=max(1, stages - 1),
                     launches=1 if resident == "q" else 2)


def fwd_work(problem, config, device) -> TiledWork:
    return _attention_work(problem, config, device, gemms=2, resident="q")


def bwd_work(problem, config, device) -> TiledWork:
    # The dK/dV kernel (5 GEMMs per step) dominates; the dQ kernel is a second launch.
    return _attention_work(problem, config, device, gemms=5, resident="k")


def paged_work(problem, config, device) -> TiledWork:
    """Decode: each (sequence, kv head, split) program streams its share of the context's K and V
    blocks once for the G query heads that share them; memory-bound."""
    dtype, size = dtype_of(problem)
    b, h, g, d = int(problem["B"]), int(problem["H"]), int(problem.get("G", 1)), _pow2(int(problem["D"]))
    ctx = int(problem["L"])
    bn, splits = param(config, "BLOCK_N"), param(config, "NUM_SPLITS")
    warps, stages = param(config, "num_warps", 4), param(config, "num_stages", 2)
    h_kv = max(1, h // max(1, g))
    per_split = -(-ctx // splits)
    iters = -(-per_split // bn)
    programs = b * h_kv * splits
    kv_bytes = 2 * iters * bn * d * size
    threads = warps * device.warp_size
    extra = 0.0 if splits == 1 else b * h * d * 4 * splits * 2 / device.mem_bandwidth
    return TiledWork(programs=programs, flops_per_program=4.0 * max(16, g) * iters * bn * d,
                     load_bytes_per_program=kv_bytes, dram_bytes=float(programs * kv_bytes + b * h * d * size * 2),
                     k_iters=iters, smem_bytes=int((16 * d + 2 * bn * d * max(1, stages)) * size),
                     regs_per_thread=int((16 * d + 16 * bn) / threads + 40), threads=threads, dtype=dtype,
                     efficiency=0.5, overlap={1: 0.0, 2: 0.7}.get(stages, 1.0),
                     latency_hiding=max(1, stages - 1), launches=1 if splits == 1 else 2, extra_s=extra)


def rotary_work(problem, config, device) -> TiledWork:
    _, size = dtype_of(problem)
    d = _pow2(int(problem["D"]))
    # x in, cos and sin tables (served by cache across heads), out.
    return stream_work(int(problem["R"]) * d, param(config, "BLOCK_R") * d, param(config, "num_warps", 4),
                       2.0 * size + 1.0, device, "f32", flops_per_elem=3.0)


# Token dims for the nearest-shape lookup: query length (prefill/training), batch (decode), rows.
FWD_TEMPLATE = register_template(KernelTemplate(
    name=FWD, sources=("attention_fwd.j2",), space=FWD_SPACE, render=render_attention_fwd, launch=invoke_fwd,
    problem=_attention_problem, work=fwd_work, token_dim="Sq", anchors=("attention", "attention_varlen"),
))
BWD_TEMPLATE = register_template(KernelTemplate(
    name=BWD, sources=("attention_bwd.j2",), space=BWD_SPACE, render=render_attention_bwd, launch=invoke_bwd,
    problem=_attention_problem, work=bwd_work, token_dim="Sq", anchors=("attention_bwd", "attention_varlen_bwd"),
))
PAGED_TEMPLATE = register_template(KernelTemplate(
    name=PAGED, sources=("attention_paged.j2",), space=PAGED_SPACE, render=render_paged, launch=invoke_paged,
    problem=_paged_problem, work=paged_work, token_dim="B", anchors=("paged_attention",),
))
ROTARY_TEMPLATE = register_template(KernelTemplate(
    name=ROTARY, sources=("attention_rotary.j2",), space=ROTARY_SPACE, render=render_rotary,
    launch=invoke_rotary, problem=_rotary_problem, work=rotary_work, token_dim="R", anchors=("rotary",),
))

__all__ = ["FWD_SPACE", "BWD_SPACE", "PAGED_SPACE", "ROTARY_SPACE", "seq_bucket"]
