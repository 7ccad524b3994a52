"""Quantized MoE experts: the expert-sorted grouped GEMM with dequantization fused into its prologue.

Template ``quant_moe_gemm.j2``, tuned as template "quant_moe_gemm". A quantized SwiGLU MoE layer is
two grouped GEMMs over the token-slots sorted by expert (moe_align's layout, shared with the float
``moe_gemm`` path, computed once per ids tensor and BLOCK_M):

- ``gate_up``: x [T, K] times each slot's expert's packed w13 [2H, K] (gate rows, then up rows); the
  epilogue stores h = silu(gate) * up, one row per (token, slot).
- ``down``: h times the expert's packed w2 [N, H]; the epilogue multiplies by the routing weight.
  With top-k 1 (and no split-K) the kernel stores the token's output itself; otherwise the rows go
  to a float32 [T, k, SPLIT_K, N] buffer that the float path's fixed-order combine kernel (from
  moe_common.j2) sums over slots and splits, so results never depend on scheduling.

So a layer is two to four launches whatever the number of experts (plus moe_align's). Weights are
:class:`StackedQTensor`: every expert's :class:`dsl.QTensor` (layout "k_packed") stacked along a
leading expert dim, one format for all experts. Split-K (for the few rows a decode step gives each
expert) writes float32 partials that the finishing kernel (SwiGLU) or the combine sums in order.

On CPU tensors the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``);
:func:`quant_moe_experts_reference` is the oracle and the CPU path of ``runtime.nn.QuantExperts``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from codegen.render import Code, load_module, render
from dsl.errors import CodegenError, DSLError, TuningError
from dsl.moe import sort_slots
from dsl.qtensor import PER_CHANNEL, QTensor, check_format, unpack_codes, values_per_word

from ..space import SearchSpace
from ..template import KernelTemplate, register_template
from ..work import TiledWork
from .moe import COMBINE_SPACE, _gemm_tile_ok, _rows_per_expert_ok, alignment, moe_gemm_work, token_bucket
from .quant_gemm import (
    _COMMON_PARAMS,
    ACT_DTYPES,
    _block_k_within_group,
    _pow2_at_least,
    _smem_fits,
    _split_k_has_work,
    _split_k_small_batch,
    _threads_have_work,
)

MODES = {"gate_up": "swiglu", "down": "combine"}  # the two GEMMs and their template modes


# ---- stacked expert weights --------------------------------------------------------------------


@dataclasses.dataclass
class StackedQTensor:
    """``num_experts`` quantized weights [N, K] of one format, stacked: ``data`` int32
    [E, ceil(K / V), N], ``scales`` [E, G, N], ``zeros`` uint8 [E, G, N] or None (symmetric). Expert
    e's slices form a :class:`dsl.QTensor` (see its docstring for the layout)."""

    data: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    shape: tuple[int, int]
    symmetric: bool

    def __post_init__(self):
        # Shapes and dtypes only: this runs on every forward, so no value checks (host syncs) here.
        self.shape = tuple(int(d) for d in self.shape)
        check_format(self.bits, self.group_size, self.shape)
        n, k = self.shape
        e = self.data.shape[0] if self.data.dim() == 3 else -1
        groups = 1 if self.group_size == PER_CHANNEL else k // self.group_size
        want = {"data": (e, -(-k // values_per_word(self.bits)), n), "scales": (e, groups, n)}
        if not self.symmetric:
            want["zeros"] = want["scales"]
        elif self.zeros is not None:
            raise DSLError("StackedQTensor: a symmetric format has no zero points; pass zeros=None")
        for name, shape in want.items():
            t = getattr(self, name)
            if t is None or tuple(t.shape) != shape or e < 1:
                got = "None" if t is None else f"{t.dtype} {list(t.shape)}"
                raise DSLError(
                    f"StackedQTensor: {name} must have shape [E, {', '.join(map(str, shape[1:]))}] for "
                    f"{self.bits}-bit [{n}, {k}] experts, got {got}"
                )
        if self.data.dtype != torch.int32 or not self.scales.dtype.is_floating_point or (
            self.zeros is not None and self.zeros.dtype != torch.uint8
        ):
            raise DSLError(
                "StackedQTensor: data must be int32, scales floating point and zeros uint8; got "
                f"{self.data.dtype}, {self.scales.dtype}, {None if self.zeros is None else self.zeros.dtype}"
            )

    @classmethod
    def stack(cls, experts: Sequence[QTensor], what: str = "experts") -> "StackedQTensor":
        """Stack per-expert QTensors; they must share bits, group size, shape, symmetry, scale dtype
        and device (one kernel variant reads them all)."""
        if not experts or not all(isinstance(q, QTensor) for q in experts):
            raise DSLError(f"StackedQTensor.stack: {what} must be a non-empty list of dsl.QTensor")
        first = experts[0]

        def fmt(q):
            return (q.bits, q.group_size, q.shape, q.symmetric, q.scales.dtype, q.device)

        for e, q in enumerate(experts):
            if fmt(q) != fmt(first):
                raise DSLError(
                    f"StackedQTensor.stack: {what} have different formats: expert 0 is {first!r}, "
                    f"expert {e} is {q!r}; a grouped GEMM needs one format for every expert"
                )
        zeros = None if first.symmetric else torch.stack([q.zeros for q in experts])
        return cls(torch.stack([q.data for q in experts]), torch.stack([q.scales for q in experts]), zeros,
                   first.bits, first.group_size, first.shape, first.symmetric)

    @property
    def num_experts(self) -> int:
        return self.data.shape[0]

    def expert(self, e: int) -> QTensor:
        """Expert e's weight as a QTensor of views into the stacked tensors."""
        zeros = None if self.zeros is None else self.zeros[e]
        return QTensor(self.data[e], self.scales[e], zeros, self.bits, self.group_size, self.shape, self.symmetric)

    def dequantize_kn(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Every expert's dequantized weight, transposed: [E, K, N] (one batched dequantize)."""
        n, k = self.shape
        gs = k if self.group_size == PER_CHANNEL else self.group_size
        codes = unpack_codes(self.data.transpose(0, 1).reshape(self.data.shape[1], -1), self.bits, k)
        codes = codes.reshape(k, self.num_experts, n).transpose(0, 1).to(torch.float32)
        zero = (float(1 << (self.bits - 1)) if self.zeros is None
                else self.zeros.to(torch.float32).unsqueeze(2))
        scale = self.scales.to(torch.float32).unsqueeze(2)
        w = (codes.reshape(self.num_experts, k // gs, gs, n) - zero) * scale
        return w.reshape(self.num_experts, k, n).to(dtype)


# ---- search space -------------------------------------------------------------------------------
# Shape keys: M (tokens), N (the GEMM's output columns: H for gate_up, the model dim for down), K,
# E, topk, group_size (-1 = per channel), bits, elem_bytes, w_tiles (2 for gate_up: gate and up).

_SMEM_SLACK = 1024


def _quant_moe_smem(c, s, elem_bytes):
    # Per pipeline stage: the activation tile plus one int32 word tile ([BLOCK_K, BLOCK_N], loaded
    # before unpacking) per weight half; an upper bound of triton's allocation (the static test checks).
    tile = (c["BLOCK_M"] * c["BLOCK_K"] * elem_bytes
            + s.get("w_tiles", 1) * c["BLOCK_K"] * c["BLOCK_N"] * 4)
    return c["num_stages"] * tile + _SMEM_SLACK


def _register_load(c, s, d) -> float:
    """Register-file load per thread: per weight half the fp32 accumulators (counted twice: the
    MMA fragments and the loop-carried sums) and the dequantized K tile, plus the activation tile."""
    threads = (32 if d.vendor == "nvidia" else 64) * c["num_warps"]
    per_half = (2 * c["BLOCK_M"] + c["BLOCK_K"]) * c["BLOCK_N"]
    return (s.get("w_tiles", 1) * per_half + c["BLOCK_M"] * c["BLOCK_K"]) / threads


def _registers_ok(c, s, d):
    # Fitted to a sweep of ptxas on sm_90 (4-bit g128 asym, fp16; BLOCK_M 16/64, BLOCK_N and BLOCK_K
    # 32..128, 4/8 warps, both GEMMs): every config that spilled has a load above 64, and most
    # below it use under 200 registers. A cheap pre-filter; the static check still compiles each.
    return d.vendor == "cpu" or _register_load(c, s, d) <= 64


QUANT_MOE_SPACE = SearchSpace(
    template="quant_moe_gemm",
    params={**_COMMON_PARAMS, "BLOCK_K": (16, 32, 64, 128, 256)},
    default={"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 1, "GROUP_M": 8, "num_warps": 4,
             "num_stages": 3},
    constraints=(
        ("block_k_within_group", _block_k_within_group),
        ("rows_per_expert", _rows_per_expert_ok),
        ("tile_fits_problem", _gemm_tile_ok),
        ("split_k_has_work", _split_k_has_work),
        ("split_k_only_for_small_batch", _split_k_small_batch),
        ("threads_have_work", _threads_have_work),
        ("registers", _registers_ok),
        ("fits_shared_memory", _smem_fits(_quant_moe_smem)),
    ),
    smem_bytes=_quant_moe_smem,
)


def problem_shape(mode: str, tokens: int, topk: int, weight: StackedQTensor, elem_bytes: int) -> dict:
    """The shape dict the space's constraints and :func:`default_config` read, for one GEMM."""
    w_tiles = 2 if mode == "gate_up" else 1
    return {"M": max(1, int(tokens)), "N": weight.shape[0] // w_tiles, "K": weight.shape[1],
            "E": weight.num_experts, "topk": int(topk), "group_size": weight.group_size, "bits": weight.bits,
            "elem_bytes": int(elem_bytes), "w_tiles": w_tiles}


def default_config(shape: dict, device) -> dict[str, int]:
    """A feasible starting config from the shape alone (see :func:`problem_shape` for its keys)."""
    m, n, k = shape["M"], shape["N"], shape["K"]
    experts, topk = shape.get("E", 1), shape.get("topk", 1)
    gs = shape.get("group_size", PER_CHANNEL)
    cfg = dict(QUANT_MOE_SPACE.default)
    cfg["BLOCK_M"] = min(64, max(16, _pow2_at_least(-(-m * topk // max(1, experts)))))  # rows per expert
    cfg["BLOCK_N"] = min(128, max(16, _pow2_at_least(n)))
    cfg["BLOCK_K"] = min(64, max(16, _pow2_at_least(k)), gs if gs != PER_CHANNEL else 64)
    cfg["num_warps"] = 8 if cfg["BLOCK_M"] >= 64 else 4
    if not _threads_have_work(cfg, shape, device):
        cfg["num_warps"] = 2
    # Narrow the tiles until the register load leaves headroom under the constraint's bound (the
    # sweep behind it used 4-bit weights; other widths add a little index math).
    while device.vendor != "cpu" and _register_load(cfg, shape, device) > 48:
        if cfg["BLOCK_N"] > 64:
            cfg["BLOCK_N"] //= 2
        elif cfg["BLOCK_K"] > 32:
            cfg["BLOCK_K"] //= 2
        elif cfg["BLOCK_N"] > 32 and _threads_have_work({**cfg, "BLOCK_N": cfg["BLOCK_N"] // 2}, shape, device):
            cfg["BLOCK_N"] //= 2
        elif cfg["BLOCK_K"] > 16:
            cfg["BLOCK_K"] //= 2
        else:
            break
    if device.vendor != "cpu" and m <= 64:
        # Decode: few rows per expert and a small grid; split K while programs are too few for the SMs.
        blocks = max(min(experts, m * topk), -(-m * topk // cfg["BLOCK_M"]))
        tiles = blocks * -(-n // cfg["BLOCK_N"])
        k_tiles = -(-k // cfg["BLOCK_K"])
        split = 1
        while split < 16 and tiles * split * 2 <= device.sm_count and split * 2 <= k_tiles:
            split *= 2
        cfg["SPLIT_K"] = split
    fits = _smem_fits(_quant_moe_smem)
    while not fits(cfg, shape, device) and cfg["num_stages"] > 2:
        cfg["num_stages"] -= 1
    cfg = QUANT_MOE_SPACE.validate(cfg, where="default config of 'quant_moe_gemm'")
    bad = QUANT_MOE_SPACE.violations(cfg, shape, device)
    if bad:  # the heuristic above is built to satisfy every constraint
        raise TuningError(f"default config {cfg} of 'quant_moe_gemm' violates {bad} for shape {dict(shape)}")
    return cfg


def checked_config(config, shape: dict, device, what: str) -> dict[str, int]:
    if config is None:
        return default_config(shape, device)
    cfg = QUANT_MOE_SPACE.validate(dict(config), where=f"config for 'quant_moe_gemm' ({what})")
    bad = QUANT_MOE_SPACE.violations(cfg, shape, device)
    if bad:
        raise TuningError(f"config {cfg} is infeasible for 'quant_moe_gemm' ({what}) at shape {dict(shape)}: "
                          f"violates {', '.join(bad)}")
    return cfg


# ---- rendering ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def quant_moe_source(mode: str, bits: int, group_size: int, symmetric: bool, ieee_f32: bool) -> str:
    """Source of the quant_moe_gemm module for one GEMM ("gate_up" or "down") and weight format."""
    if mode not in MODES:
        raise CodegenError(f"quant_moe_gemm: mode must be one of {sorted(MODES)}, got {mode!r}")
    check_format(bits, group_size, (1, max(group_size, 1)))
    name = (f"quant_moe_{mode}_w{bits}_{'pc' if group_size == PER_CHANNEL else f'g{group_size}'}_"
            f"{'sym' if symmetric else 'asym'}{'_ieee' if ieee_f32 else ''}")
    return render(
        "quant_moe_gemm.j2",
        kernel=name,
        mode=MODES[mode],
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
        ieee_f32=ieee_f32,
        # The combine kernel stores its fixed-order sum straight into the output, in its dtype.
        combine_outputs=[{"name": "out", "var": "val", "triton": Code("out_ptr.dtype.element_ty")}],
        combine_body=Code(""),
    )


def module_for(mode, weight: StackedQTensor, act_dtype: torch.dtype):
    source = quant_moe_source(mode, weight.bits, weight.group_size, weight.symmetric, act_dtype == torch.float32)
    return load_module(source, "quant_moe_gemm")


# ---- checks -------------------------------------------------------------------------------------


def check_routing(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, num_experts: int,
                  where: str) -> None:
    """Raise DSLError unless x [T, D] is floating point, ids [T, k] integer experts in [0, E) and
    weights [T, k] floating point (one range check: a host sync on a GPU)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in ACT_DTYPES:
        got = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise DSLError(f"{where}: x must be a 2-D float16, bfloat16 or float32 tensor [T, D], got {got}")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise DSLError(f"{where}: ids must be an integer tensor [T, k]")
    if not isinstance(weights, torch.Tensor) or not weights.dtype.is_floating_point:
        raise DSLError(f"{where}: weights must be a floating-point tensor [T, k]")
    if ids.shape[0] != x.shape[0] or weights.shape != ids.shape or ids.shape[1] < 1:
        raise DSLError(f"{where}: x {list(x.shape)}, ids {list(ids.shape)} and weights {list(weights.shape)} "
                       "must be [T, D], [T, k], [T, k] with k >= 1")
    if ids.numel():
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < 0 or hi >= num_experts:
            raise DSLError(f"{where}: expert ids must lie in [0, {num_experts}); got range [{lo}, {hi}]")


def check_experts(gate_up, down, where: str) -> None:
    """Raise DSLError unless gate_up and down are StackedQTensors of one expert count shaped
    [2H, D] (gate rows, then up) and [N, H]."""
    for name, w in (("gate_up", gate_up), ("down", down)):
        if not isinstance(w, StackedQTensor):
            raise DSLError(f"{where}: {name} must be a StackedQTensor (StackedQTensor.stack of the experts' "
                           f"QTensors), got {type(w).__name__}")
    if gate_up.num_experts != down.num_experts:
        raise DSLError(f"{where}: gate_up holds {gate_up.num_experts} experts but down holds {down.num_experts}")
    (two_h, dim), (n, h) = gate_up.shape, down.shape
    if two_h != 2 * h:
        raise DSLError(f"{where}: gate_up [{two_h}, {dim}] must be [2H, D] (gate rows, then up) and down [N, H]; "
                       f"down is [{n}, {h}]")


def check_inputs(x, ids, weights, gate_up, down, where: str) -> None:
    """check_experts, check_routing, and x's features against the experts' D."""
    check_experts(gate_up, down, where)
    check_routing(x, ids, weights, gate_up.num_experts, where)
    if x.shape[-1] != gate_up.shape[1]:
        raise DSLError(f"{where}: x has {x.shape[-1]} features but the experts expect D={gate_up.shape[1]}")


# ---- reference ----------------------------------------------------------------------------------


def expert_loop(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, num_experts: int,
                out_features: int, ffn: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """y [T, N] = sum over j of weights[t, j] * ffn(ids[t, j], x[t]): slots sorted by expert, one
    ``ffn(e, rows [n, D]) -> [n, N]`` call per expert that has rows, the sum over a token's slots in
    float32 in slot order; y in x's dtype."""
    tokens, k = ids.shape
    order, counts = sort_slots(ids, num_experts)
    rows = torch.div(order, k, rounding_mode="floor")  # the token of each sorted slot
    out = torch.zeros(tokens * k, out_features, dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n:
            out[order[start:start + n]] = ffn(e, x.index_select(0, rows[start:start + n])).float()
        start += n
    out = out.view(tokens, k, out_features) * weights.to(torch.float32).unsqueeze(-1)
    return out.sum(dim=1).to(x.dtype)


def quant_moe_experts_reference(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                                gate_up: StackedQTensor, down: StackedQTensor) -> torch.Tensor:
    """What the kernels compute: every expert dequantized in float32 and rounded to x's dtype, then
    per expert h = silu(x @ gate) * up in float32 (h rounded to x's dtype, as the kernel stores it),
    h @ down in float32, times the routing weight, summed over the k slots; y in x's dtype."""
    check_inputs(x, ids, weights, gate_up, down, "quant_moe_experts_reference")
    w13 = gate_up.dequantize_kn(torch.float32).to(x.dtype).to(torch.float32)
    w2 = down.dequantize_kn(torch.float32).to(x.dtype).to(torch.float32)
    hidden = down.shape[1]

    def ffn(e, rows):
        gu = rows.to(torch.float32) @ w13[e]
        h = (F.silu(gu[:, :hidden]) * gu[:, hidden:]).to(x.dtype).to(torch.float32)
        return h @ w2[e]

    return expert_loop(x, ids, weights, gate_up.num_experts, down.shape[0], ffn)


# ---- the kernels --------------------------------------------------------------------------------






# ---- static compilation for a GPU target (no GPU needed) ---------------------------------------


def split_configs(config) -> tuple:
    """``config``: None (defaults), one config for both GEMMs, or {"gate_up": ..., "down": ...}."""
    if config is None:
        return None, None
    if isinstance(config, dict) and config and set(config) <= set(MODES):
        return config.get("gate_up"), config.get("down")
    return config, config


def launch_experts(x, ids, weights, gate_up: StackedQTensor, down: StackedQTensor, cfg_gate_up: dict,
                   cfg_down: dict) -> torch.Tensor:
    """The two grouped GEMMs of a quantized SwiGLU MoE's experts with checked configs (see
    ``runtime.ops.quant.quant_moe_experts``, the op that checks inputs and picks the configs)."""
    topk = ids.shape[1]
    finish = COMBINE_SPACE.default
    h = module_for("gate_up", gate_up, x.dtype).launch(
        x, gate_up.data, gate_up.scales, gate_up.zeros, alignment(ids, gate_up.num_experts, cfg_gate_up["BLOCK_M"]),
        None, topk, cfg_gate_up, finish)
    return module_for("down", down, x.dtype).launch(
        h, down.data, down.scales, down.zeros, alignment(ids, down.num_experts, cfg_down["BLOCK_M"]),
        weights.to(torch.float32), topk, cfg_down, finish)


# ---- the template: one grouped GEMM (gate_up or down) of one weight format, tuned on its own --------


def tuning_problem(mode: str, tokens: int, n: int, k: int, experts: int, topk: int, bits: int, group_size: int,
                   symmetric: bool, elem_bytes: int) -> dict:
    """What keys a grouped quantized GEMM's records: the token bucket, sizes, format and width
    (asymmetric weights add their uint8 zero points as "zero_bits"; per-channel is one group of K)."""
    problem = {"M": token_bucket(tokens), "N": n, "K": k, "E": experts, "topk": topk,
               "group_size": k if group_size == PER_CHANNEL else group_size, "bits": bits,
               "elem_bytes": elem_bytes, "w_tiles": 2 if mode == "gate_up" else 1}
    if not symmetric:
        problem["zero_bits"] = 8
    return problem


def problem_quant_moe(rendered, env) -> dict:
    meta = rendered.meta
    return tuning_problem(meta["mode"], env["M"], env["N"], env["K"], env["E"], env["topk"], meta["bits"],
                          meta["group_size"], meta["symmetric"], meta["elem_bytes"])


def invoke_quant_moe(module, rendered, ins, outs, env, config) -> None:
    """ins: x (or h for down), the stacked words, scales, zeros (or None), ids, routing weights;
    outs: [the GEMM's output]."""
    x, data, scales, zeros, ids, weights = ins
    zeros = None if rendered.meta["symmetric"] else zeros
    mode, topk = rendered.meta["mode"], ids.shape[1]
    scale = weights.to(torch.float32) if mode == "down" else None
    result = module.launch(x, data, scales, zeros, alignment(ids, env["E"], config["BLOCK_M"]), scale, topk,
                           config, COMBINE_SPACE.default)
    outs[0].copy_(result)


def quant_moe_work(problem, config, device) -> TiledWork:
    """The grouped GEMM's tiles with packed weights: B traffic at bits/8 bytes per element plus the
    group's scale (and zero point), and the unpacking ALU work per weight element."""
    meta_bytes = problem.get("elem_bytes", 2) + (1 if "zero_bits" in problem else 0)
    b_bytes = problem["bits"] / 8 + meta_bytes / problem["group_size"]
    dtype = "f32" if problem.get("elem_bytes", 2) == 4 else "f16"
    # Unpacking one weight: shift, mask, int->float, subtract the zero point, scale, cast.
    work = moe_gemm_work({**problem, "dtype": dtype, "b_bytes": b_bytes, "dequant_ops": 6.0}, config, device)
    return dataclasses.replace(work, smem_bytes=_quant_moe_smem(config, problem, problem.get("elem_bytes", 2)))


QUANT_MOE_TEMPLATE = register_template(KernelTemplate(
    name="quant_moe_gemm", sources=("quant_moe_gemm.j2", "moe_align.j2", "moe_common.j2"), space=QUANT_MOE_SPACE,
    launch=invoke_quant_moe, problem=problem_quant_moe, work=quant_moe_work,
    default=lambda problem, device: default_config(problem, device),
))

__all__ = ["MODES", "QUANT_MOE_SPACE", "StackedQTensor", "check_experts", "check_inputs", "check_routing",
           "checked_config", "default_config", "expert_loop", "launch_experts", "module_for", "problem_shape",
           "quant_moe_experts_reference", "quant_moe_source", "split_configs"]
