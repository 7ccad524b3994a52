"""Quantized GEMMs: packed low-bit weights (W{2,3,4,8}A16), int8 x int8 (W8A8) and fp8 e4m3.

Templates: ``quant_gemm.j2`` (dequantization fused into the K loop's prologue) and ``int8_gemm.j2``
(integer or fp8 products, scales in the epilogue; its ``operand`` switch makes the fp8 variant,
tuned as template "fp8_gemm"). Each rendered module holds one ``@triton.jit`` kernel and a
``launch(...)`` that computes the grid. The public ops that launch them are in
``runtime.ops.quant``; their reference semantics in ``dsl.quantize``.

Split-K: with ``SPLIT_K > 1`` each program sums a contiguous run of K tiles into a float32
partial ``[SPLIT_K, M, N]``; the partials are added here (deterministic, unlike atomics) and the
bias is added by split 0 only.
"""

from __future__ import annotations

import dataclasses
import functools
from types import ModuleType

import torch

from dsl.errors import CodegenError, DSLError, TuningError
from dsl.qtensor import PER_CHANNEL

from ..render import load_module, render, source_hash
from ..space import SearchSpace
from ..template import KernelTemplate, register_template
from ..work import TiledWork, gemm_work
from .common import Rendered
from .moe import token_bucket

ACT_DTYPES = (torch.float16, torch.float32, torch.bfloat16)

FP8_DTYPE = torch.float8_e4m3fn

def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()



# ---- search spaces ----------------------------------------------------------------------------
# Constraints read the tuning problem (see "tuning keys" below): M, N, K; quant_gemm also
# "group_size" and "bits" and the activation width "act_bits". Callers that build a shape by hand
# may give group_size -1 (per channel) and "elem_bytes" instead.


def _fits(block: str, dim: str):
    # A block much larger than its dimension only computes padding; 16 is tl.dot's minimum.
    return lambda c, s, d: c[block] <= max(16, _pow2_at_least(s[dim]))

def _split_k_has_work(c, s, d):
    return c["SPLIT_K"] == 1 or c["SPLIT_K"] <= -(-s["K"] // c["BLOCK_K"])

def _split_k_small_batch(c, s, d):
    # Split-K buys parallelism when the M x N grid is too small to fill the GPU: small batches.
    return c["SPLIT_K"] == 1 or s["M"] <= 64

def _threads_have_work(c, s, d):
    return c["BLOCK_M"] * c["BLOCK_N"] >= 4 * 32 * c["num_warps"]

def _block_k_within_group(c, s, d):
    # One K tile must never straddle two scale groups: the prologue loads one scale row per tile.
    # A group spanning all of K (per-channel scales) has nothing to straddle.
    gs = s.get("group_size", PER_CHANNEL)
    return gs == PER_CHANNEL or gs >= s["K"] or gs % c["BLOCK_K"] == 0

def _mma_k_for_8bit(c, s, d):
    return c["BLOCK_K"] >= 32  # int8 and fp8 MMA instructions consume K in steps of 32

def _device_has_fp8(c, s, d):
    return d.vendor == "cpu" or (d.vendor == "nvidia" and d.compute_capability >= 89)

# Shared-memory estimates: upper bounds of what triton allocates on sm_80/sm_90 (checked against
# ``compile_for_target(...).metadata.shared``): one tile per pipeline stage, plus a little for
# barriers and the epilogue.
_SMEM_SLACK = 1024

def _quant_smem(c, s, elem_bytes):
    # Activation tile plus the loaded int32 word tile ([BLOCK_K, BLOCK_N], before unpacking).
    tile = c["BLOCK_M"] * c["BLOCK_K"] * elem_bytes + c["BLOCK_K"] * c["BLOCK_N"] * 4
    return c["num_stages"] * tile + _SMEM_SLACK

def _scaled_smem(c, s, elem_bytes):
    return c["num_stages"] * (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] + _SMEM_SLACK  # 1-byte operands

def _elem_bytes(s) -> int:
    return s["act_bits"] // 8 if "act_bits" in s else s.get("elem_bytes", 2)

def _smem_fits(smem):
    def check(c, s, d):
        return d.vendor == "cpu" or smem(c, s, _elem_bytes(s)) <= d.smem_per_block

    return check

_COMMON_PARAMS = {
    "BLOCK_M": (16, 32, 64, 128),
    "BLOCK_N": (16, 32, 64, 128, 256),
    "SPLIT_K": (1, 2, 4, 8, 16),
    "GROUP_M": (1, 4, 8),
    "num_warps": (2, 4, 8),
    "num_stages": (1, 2, 3, 4, 5),
}

_COMMON_CONSTRAINTS = (
    ("block_m_fits_batch", _fits("BLOCK_M", "M")),
    ("block_n_fits_features", _fits("BLOCK_N", "N")),
    ("block_k_fits_reduction", _fits("BLOCK_K", "K")),
    ("split_k_has_work", _split_k_has_work),
    ("split_k_only_for_small_batch", _split_k_small_batch),
    ("threads_have_work", _threads_have_work),
)

def _space(template: str, block_k: tuple[int, ...], default_block_k: int, constraints, smem) -> SearchSpace:
    # The three weight formats share the GEMM tiling; they differ in BLOCK_K (MMA K for 8-bit,
    # group size for 4-bit) and in shared memory per stage.
    return SearchSpace(
        template=template,
        params={**_COMMON_PARAMS, "BLOCK_K": block_k},
        default={"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": default_block_k, "SPLIT_K": 1, "GROUP_M": 8,
                 "num_warps": 4, "num_stages": 3},
        constraints=_COMMON_CONSTRAINTS + tuple(constraints) + (("fits_shared_memory", _smem_fits(smem)),),
        smem_bytes=smem,
    )

QUANT_GEMM_SPACE = _space("quant_gemm", (16, 32, 64, 128, 256), 32,
                          [("block_k_within_group", _block_k_within_group)], _quant_smem)

INT8_GEMM_SPACE = _space("int8_gemm", (32, 64, 128, 256), 64, [("mma_k_for_8bit", _mma_k_for_8bit)],
                         _scaled_smem)

FP8_GEMM_SPACE = _space("fp8_gemm", (32, 64, 128, 256), 64,
                        [("mma_k_for_8bit", _mma_k_for_8bit), ("device_has_fp8", _device_has_fp8)],
                        _scaled_smem)

SPACES = {"quant_gemm": QUANT_GEMM_SPACE, "int8_gemm": INT8_GEMM_SPACE, "fp8_gemm": FP8_GEMM_SPACE}

def default_config(template: str, shape: dict, device) -> dict[str, int]:
    """A feasible starting config from the shape alone (used when no tuned record is given)."""
    space = SPACES[template]
    m, n, k = shape["M"], shape["N"], shape["K"]
    cfg = dict(space.default)
    cfg["BLOCK_M"] = min(64, max(16, _pow2_at_least(m)))
    cfg["BLOCK_N"] = min(128, max(16, _pow2_at_least(n)))
    if template == "quant_gemm":
        gs = shape.get("group_size", PER_CHANNEL)
        grouped = gs != PER_CHANNEL and gs < k  # a tile may not straddle groups (see the constraint)
        cfg["BLOCK_K"] = min(64, max(16, _pow2_at_least(k)), gs if grouped else 64)
    else:
        cfg["BLOCK_K"] = min(64, max(32, _pow2_at_least(k)))
    cfg["num_warps"] = 4 if cfg["BLOCK_M"] * cfg["BLOCK_N"] >= 4 * 32 * 4 else 2
    if device.vendor != "cpu" and m <= 64:
        # Enough programs to cover the SMs: split K while the grid is small and K tiles remain.
        tiles = -(-m // cfg["BLOCK_M"]) * -(-n // cfg["BLOCK_N"])
        k_tiles = -(-k // cfg["BLOCK_K"])
        split = 1
        while split < 16 and tiles * split * 2 <= device.sm_count and split * 2 <= k_tiles:
            split *= 2
        cfg["SPLIT_K"] = split
    fits = _smem_fits(space.smem_bytes)
    while not fits(cfg, shape, device) and cfg["num_stages"] > 2:
        cfg["num_stages"] -= 1
    while not fits(cfg, shape, device) and cfg["BLOCK_N"] > 16:
        cfg["BLOCK_N"] //= 2
    cfg = space.validate(cfg, where=f"default config of '{template}'")
    bad = space.violations(cfg, shape, device)
    if bad:  # the heuristic above is built to satisfy every constraint
        raise TuningError(f"default config {cfg} of '{template}' violates {bad} for shape {dict(shape)}")
    return cfg

def checked_config(template: str, config, shape: dict, device) -> dict[str, int]:
    if config is None:
        return default_config(template, shape, device)
    space = SPACES[template]
    cfg = space.validate(dict(config), where=f"config for '{template}'")
    bad = space.violations(cfg, shape, device)
    if bad:
        raise TuningError(
            f"config {cfg} is infeasible for '{template}' at shape {dict(shape)}: violates {', '.join(bad)}"
        )
    return cfg


# ---- rendering ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def quant_gemm_source(bits: int, group_size: int, symmetric: bool, has_bias: bool, ieee_f32: bool) -> str:
    """Source of the quant_gemm module for one weight format (group_size -1 = per channel)."""
    per_channel = group_size == PER_CHANNEL
    return render(
        "quant_gemm.j2",
        kernel_name=_quant_name(bits, group_size, symmetric, has_bias),
        bits=bits,
        values_per_word=32 // bits,
        code_mask=(1 << bits) - 1,
        half=1 << (bits - 1),
        group_size=max(group_size, 1),
        per_channel=per_channel,
        symmetric=symmetric,
        has_bias=has_bias,
        ieee_f32=ieee_f32,
    )

@functools.lru_cache(maxsize=None)
def scaled_gemm_source(operand: str, row_scale_vector: bool, col_scale_vector: bool, has_bias: bool) -> str:
    """Source of the int8_gemm module; operand "int8" or "fp8e4m3"."""
    if operand not in ("int8", "fp8e4m3"):
        raise CodegenError(f"int8_gemm: operand must be 'int8' or 'fp8e4m3', got {operand!r}")
    return render(
        "int8_gemm.j2",
        kernel_name=_scaled_name(operand, row_scale_vector, col_scale_vector, has_bias),
        operand=operand,
        row_scale_vector=row_scale_vector,
        col_scale_vector=col_scale_vector,
        has_bias=has_bias,
    )

def _quant_name(bits: int, group_size: int, symmetric: bool, has_bias: bool) -> str:
    return (f"quant_gemm_w{bits}_{'pc' if group_size == PER_CHANNEL else f'g{group_size}'}_"
            f"{'sym' if symmetric else 'asym'}{'_bias' if has_bias else ''}")

def _scaled_name(operand: str, row_scale_vector: bool, col_scale_vector: bool, has_bias: bool) -> str:
    return (f"{'int8' if operand == 'int8' else 'fp8'}_gemm_{'row' if row_scale_vector else 'ts'}_"
            f"{'col' if col_scale_vector else 'ts'}{'_bias' if has_bias else ''}")

def _module(source: str, hint: str) -> ModuleType:
    return load_module(source, hint)



# ---- kernels as the runtime and the tuner launch them -------------------------------------------
# Tuning keys. The records of one weight format (bits, group size, symmetry, exact-fp32 or not) are
# keyed by the source hash of its bias-free variant: the bias, like the int8/fp8 choice between
# per-row and per-tensor scales, is one load per output row or column after the K loop and does
# not change which tile is fastest, so every variant of a format shares one tuning. The problem
# holds what does: the token count M in buckets (moe.token_bucket, neighbours <= 1.5x apart), N, K,
# the bits and group size (per-channel scales are one group spanning K), the activation dtype (its
# width and exponent bits: f16 5, bf16 8, f32 8) and "zero_bits" 8 for asymmetric weights' uint8 zero
# points (symmetric ones store none; shape keys hold sizes >= 1, so the key is absent). int8/fp8:
# M bucket, N, K and the output width.

_DTYPE_NAMES = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}

_DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}

# "tf32": float32 activations with allow_tf32 (TF32 tensor cores instead of the exact fp32 dot).
_ACT_DTYPES = {**_DTYPES, "tf32": torch.float32}

_ACT_KEYS = {"f16": (16, 5), "bf16": (16, 8), "f32": (32, 8), "tf32": (32, 8)}

@dataclasses.dataclass(frozen=True, eq=False)
class KernelVariant:
    """One variant of a template with what launching and tuning it need; one object per variant
    (cached), so that it can key the per-shape config cache by identity."""

    template: str
    rendered: Rendered      # name (the @triton.jit function), source, meta
    module: ModuleType
    key_hash: str           # the tuning records' source hash (the variant's bias-free format)
    options: dict           # the `kdsl tune TEMPLATE` options that tune this format

    @property
    def name(self) -> str:
        return self.rendered.name

    def problem(self, m: int, n: int, k: int) -> dict:
        return _PROBLEMS[self.template](self.rendered, {"M": m, "N": n, "K": k})

@functools.lru_cache(maxsize=None)
def quant_kernel(bits: int, group_size: int, symmetric: bool, has_bias: bool, act: str) -> KernelVariant:
    ieee = act == "f32"
    source = quant_gemm_source(bits, group_size, symmetric, has_bias, ieee)
    meta = {"bits": bits, "group_size": group_size, "symmetric": symmetric, "has_bias": has_bias, "act": act}
    rendered = Rendered(_quant_name(bits, group_size, symmetric, has_bias), "quant_gemm", source, [], [], meta)
    options = {"bits": bits, "group_size": group_size, "asym": not symmetric, "dtype": act}
    return KernelVariant("quant_gemm", rendered, _module(source, "quant_gemm"),
                   source_hash(quant_gemm_source(bits, group_size, symmetric, False, ieee)), options)

@functools.lru_cache(maxsize=None)
def scaled_kernel(template: str, row_scale_vector: bool, col_scale_vector: bool, has_bias: bool,
                   out: str) -> KernelVariant:
    operand = "int8" if template == "int8_gemm" else "fp8e4m3"
    source = scaled_gemm_source(operand, row_scale_vector, col_scale_vector, has_bias)
    meta = {"has_bias": has_bias, "out": out}
    rendered = Rendered(_scaled_name(operand, row_scale_vector, col_scale_vector, has_bias), template, source,
                        [], [], meta)
    return KernelVariant(template, rendered, _module(source, template),
                   source_hash(scaled_gemm_source(operand, True, True, False)), {"dtype": out})

def problem_quant_gemm(rendered: Rendered, env) -> dict:
    meta, k = rendered.meta, env["K"]
    bits, exp_bits = _ACT_KEYS[meta["act"]]
    problem = {"M": token_bucket(env["M"]), "N": env["N"], "K": k, "bits": meta["bits"],
               "group_size": k if meta["group_size"] == PER_CHANNEL else meta["group_size"],
               "act_bits": bits, "act_exp_bits": exp_bits}
    if not meta["symmetric"]:
        problem["zero_bits"] = 8
    return problem

def problem_scaled_gemm(rendered: Rendered, env) -> dict:
    return {"M": token_bucket(env["M"]), "N": env["N"], "K": env["K"],
            "out_bits": _ACT_KEYS[rendered.meta["out"]][0]}

def _launch(module: ModuleType, operands, out: torch.Tensor, config: dict) -> None:
    """``module.launch(*operands, ...)`` into ``out`` [M, N]. Split-K programs write float32
    partials [SPLIT_K, M, N], added here (deterministic, unlike atomics)."""
    if out.device.type == "cpu" and any(t is not None and t.dtype == torch.bfloat16 for t in (*operands, out)):
        raise DSLError("quantized GEMM: Triton's CPU interpreter computes bfloat16 wrongly; use "
                       "float16/float32 activations, scales and outputs on CPU, or run on a GPU")
    m, n = out.shape
    split_k = config["SPLIT_K"]
    target = out if split_k == 1 else torch.empty(split_k, m, n, dtype=torch.float32, device=out.device)
    module.launch(*operands, target, m, n, operands[0].shape[1], config)
    if split_k > 1:
        out.copy_(target.sum(dim=0))

def invoke_quant_gemm(module, rendered: Rendered, ins, outs, env, config) -> None:
    """ins: x [M, K], the packed words, the scales, then the zero points (asymmetric) and the bias
    (when the variant has one); outs: [y [M, N]]."""
    x, data, scales, *rest = ins
    zeros = None if rendered.meta["symmetric"] else rest.pop(0)
    bias = rest.pop(0) if rendered.meta["has_bias"] else None
    _launch(module, (x, data, scales, zeros, bias), outs[0], config)

def invoke_scaled_gemm(module, rendered: Rendered, ins, outs, env, config) -> None:
    """ins: a [M, K], b [N, K], float32 scales of a and b, then the bias (when the variant has one)."""
    a, b, a_scale, b_scale, *rest = ins
    _launch(module, (a, b, a_scale, b_scale, rest[0] if rendered.meta["has_bias"] else None), outs[0], config)

_PROBLEMS = {"quant_gemm": problem_quant_gemm, "int8_gemm": problem_scaled_gemm, "fp8_gemm": problem_scaled_gemm}

def interpreter_active() -> bool:
    """True when triton was imported with TRITON_INTERPRET=1 (its own @jit library is interpreted)."""
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.zeros, InterpretedFunction)


# ---- cost models: the GEMM roofline with these templates' operands ------------------------------
# Unpacking one weight: shift, mask, int->float, subtract the zero point, scale, cast to x's dtype.
_DEQUANT_OPS = 6

def quant_gemm_work(problem, config, device) -> TiledWork:
    # Weight bytes per element: its share of a packed int32 word plus, per group, a float32 scale
    # (the quantizers' default) and a uint8 zero point when asymmetric.
    meta_bytes = 4 + (1 if "zero_bits" in problem else 0)
    b_bytes = 4 / (32 // problem["bits"]) + meta_bytes / problem["group_size"]
    work = gemm_work({**problem, "b_bytes": b_bytes, "dequant_ops": _DEQUANT_OPS}, config, device)
    # Shared memory as the space estimates it: the word tile is loaded unpacked-wide ([BLOCK_K, BLOCK_N]).
    return dataclasses.replace(work, smem_bytes=_quant_smem(config, problem, _elem_bytes(problem)))

def scaled_gemm_work(problem, config, device) -> TiledWork:
    work = gemm_work({**problem, "out_bytes": problem["out_bits"] // 8}, config, device)
    return dataclasses.replace(work, smem_bytes=_scaled_smem(config, problem, 1))


def _compute_dtype(problem, default: str) -> dict:
    return {**problem, "dtype": problem.get("dtype", default)}


def _default(template):
    return lambda problem, device: default_config(template, problem, device)


# ---- the templates -----------------------------------------------------------------------------
# Launched by library code (runtime.ops.quant) until quantized weights are a graph type, so they
# render no IR group; tuned as templates (`kdsl tune quant_gemm ...`, autotune.template_tasks).

QUANT_GEMM_TEMPLATE = register_template(KernelTemplate(
    name="quant_gemm", sources=("quant_gemm.j2",), space=QUANT_GEMM_SPACE, launch=invoke_quant_gemm,
    problem=problem_quant_gemm, work=quant_gemm_work, default=_default("quant_gemm"),
))
INT8_GEMM_TEMPLATE = register_template(KernelTemplate(
    name="int8_gemm", sources=("int8_gemm.j2",), space=INT8_GEMM_SPACE, launch=invoke_scaled_gemm,
    problem=problem_scaled_gemm, work=lambda p, c, d: scaled_gemm_work(_compute_dtype(p, "i8"), c, d),
    default=_default("int8_gemm"),
))
FP8_GEMM_TEMPLATE = register_template(KernelTemplate(
    name="fp8_gemm", sources=("int8_gemm.j2",), space=FP8_GEMM_SPACE, launch=invoke_scaled_gemm,
    problem=problem_scaled_gemm, work=lambda p, c, d: scaled_gemm_work(_compute_dtype(p, "f8e4m3"), c, d),
    default=_default("fp8_gemm"),
))

__all__ = ["QUANT_GEMM_SPACE", "INT8_GEMM_SPACE", "FP8_GEMM_SPACE", "ACT_DTYPES", "FP8_DTYPE", "KernelVariant",
           "default_config", "checked_config", "quant_kernel", "scaled_kernel", "problem_quant_gemm",
           "problem_scaled_gemm", "invoke_quant_gemm", "invoke_scaled_gemm", "interpreter_active",
           "quant_gemm_source", "scaled_gemm_source"]
