"""Quantized GEMMs: packed low-bit weights (W{2,3,4,8}A16), int8 x int8 (W8A8) and fp8 e4m3.

Templates: ``quant_gemm.j2`` (dequantization fused into the K loop's prologue) and ``int8_gemm.j2``
(integer or fp8 products, scales in the epilogue; its ``operand`` switch makes the fp8 variant,
tuned as template "fp8_gemm"). Each rendered module holds one ``@triton.jit`` kernel and a
``launch(...)`` that computes the grid. On CPU tensors the kernels run under Triton's interpreter,
which must be switched on (``TRITON_INTERPRET=1``) before triton is first imported.

Split-K: with ``SPLIT_K > 1`` each program sums a contiguous run of K tiles into a float32
partial ``[SPLIT_K, M, N]``; the partials are added here (deterministic, unlike atomics) and the
bias is added by split 0 only.
"""

from __future__ import annotations

import dataclasses
import functools
from types import ModuleType

import torch

from autotune.cost_model import gemm_work, register_cost_model, roofline_time
from autotune.devices import Device, cpu_device, local_device
from autotune.lookup import DIRECT, KernelChoice, template_tune_command
from autotune.space import SearchSpace, register_space
from autotune.tuner import TemplateTasks, register_template_tasks
from codegen.render import load_module, render, source_hash
from dsl.errors import CodegenError, DSLError, TuningError
from dsl.qtensor import PER_CHANNEL, QTensor, check_format

from . import register_invoker
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


def _device_has_fp8(c, s, d: Device):
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
    def check(c, s, d: Device):
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
    return register_space(SearchSpace(
        template=template,
        params={**_COMMON_PARAMS, "BLOCK_K": block_k},
        default={"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": default_block_k, "SPLIT_K": 1, "GROUP_M": 8,
                 "num_warps": 4, "num_stages": 3},
        constraints=_COMMON_CONSTRAINTS + tuple(constraints) + (("fits_shared_memory", _smem_fits(smem)),),
        smem_bytes=smem,
    ))


QUANT_GEMM_SPACE = _space("quant_gemm", (16, 32, 64, 128, 256), 32,
                          [("block_k_within_group", _block_k_within_group)], _quant_smem)
INT8_GEMM_SPACE = _space("int8_gemm", (32, 64, 128, 256), 64, [("mma_k_for_8bit", _mma_k_for_8bit)],
                         _scaled_smem)
FP8_GEMM_SPACE = _space("fp8_gemm", (32, 64, 128, 256), 64,
                        [("mma_k_for_8bit", _mma_k_for_8bit), ("device_has_fp8", _device_has_fp8)],
                        _scaled_smem)

SPACES = {"quant_gemm": QUANT_GEMM_SPACE, "int8_gemm": INT8_GEMM_SPACE, "fp8_gemm": FP8_GEMM_SPACE}


def default_config(template: str, shape: dict, device: Device | None = None) -> dict[str, int]:
    """A feasible starting config from the shape alone (used when no tuned record is given)."""
    space = SPACES[template]
    device = device or local_device()
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


def _checked_config(template: str, config, shape: dict, device: Device) -> dict[str, int]:
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
class _Kernel:
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

    def tune_hint(self, m: int, n: int, k: int) -> str:
        return template_tune_command(self.template, {"M": max(1, m), "N": n, "K": k}, self.options)


@functools.lru_cache(maxsize=None)
def _quant_kernel(bits: int, group_size: int, symmetric: bool, has_bias: bool, act: str) -> _Kernel:
    ieee = act == "f32"
    source = quant_gemm_source(bits, group_size, symmetric, has_bias, ieee)
    meta = {"bits": bits, "group_size": group_size, "symmetric": symmetric, "has_bias": has_bias, "act": act}
    rendered = Rendered(_quant_name(bits, group_size, symmetric, has_bias), "quant_gemm", source, [], [], meta)
    options = {"bits": bits, "group_size": group_size, "asym": not symmetric, "dtype": act}
    return _Kernel("quant_gemm", rendered, _module(source, "quant_gemm"),
                   source_hash(quant_gemm_source(bits, group_size, symmetric, False, ieee)), options)


@functools.lru_cache(maxsize=None)
def _scaled_kernel(template: str, row_scale_vector: bool, col_scale_vector: bool, has_bias: bool,
                   out: str) -> _Kernel:
    operand = "int8" if template == "int8_gemm" else "fp8e4m3"
    source = scaled_gemm_source(operand, row_scale_vector, col_scale_vector, has_bias)
    meta = {"has_bias": has_bias, "out": out}
    rendered = Rendered(_scaled_name(operand, row_scale_vector, col_scale_vector, has_bias), template, source,
                        [], [], meta)
    return _Kernel(template, rendered, _module(source, template),
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
register_invoker("quant_gemm", invoke_quant_gemm, problem_quant_gemm)
register_invoker("int8_gemm", invoke_scaled_gemm, problem_scaled_gemm)
register_invoker("fp8_gemm", invoke_scaled_gemm, problem_scaled_gemm)


def _choice(kernel: _Kernel, m: int, n: int, k: int, device: torch.device, config) -> KernelChoice:
    """The config to launch with: the caller's (checked), else the lookup chain for the tensors'
    device with the shape-aware :func:`default_config` last, remembered per (kernel, M bucket, N, K,
    device) so that a layer's repeated calls cost one dict lookup."""
    if config is not None:
        problem = kernel.problem(m, n, k)
        return KernelChoice(kernel.name, kernel.template, problem,
                            _checked_config(kernel.template, config, problem, _kernel_device(device)),
                            "override", "explicit config given by the caller")
    key = (kernel, token_bucket(m), n, k, device)
    found = DIRECT.cached(key)
    if found is None:
        found = DIRECT.choose(key, kernel=kernel.name, template=kernel.template, source_hash=kernel.key_hash,
                              problem=kernel.problem(m, n, k), device=_kernel_device(device),
                              default=functools.partial(default_config, kernel.template),
                              tune_hint=kernel.tune_hint(m, n, k))
    return found


def invalidate_configs() -> None:
    """Forget the configs chosen so far (all directly launched kernels), e.g. after tuning in this
    process or after pointing ``KDSL_DB`` elsewhere; the next call at each shape looks them up again."""
    DIRECT.clear()


def kernel_of(module: ModuleType):
    """The @triton.jit function of a rendered module (the one callable with a ``fn`` attribute)."""
    for value in vars(module).values():
        if hasattr(value, "fn") and hasattr(value, "run"):
            return value
    raise CodegenError(f"rendered module {module.__name__} has no triton kernel")


def interpreter_active() -> bool:
    """True when triton was imported with TRITON_INTERPRET=1 (its own @jit library is interpreted)."""
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.zeros, InterpretedFunction)


def _check_device(*tensors: torch.Tensor) -> torch.device:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise DSLError(f"quantized matmul: operands live on different devices {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cpu" and not interpreter_active():
        raise CodegenError(
            "the Triton kernels need a GPU, or Triton's interpreter for CPU tensors: set "
            "TRITON_INTERPRET=1 before triton is imported, or use the *_reference functions "
            "(the CPU path of runtime.nn.QuantLinear)"
        )
    return device


def _kernel_device(device: torch.device) -> Device:
    # Tuning records of the interpreter are keyed by this machine's CPU (see autotune.devices).
    return local_device() if device.type == "cuda" else cpu_device()


def _check_bias(bias, n: int, where: str):
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n or not bias.dtype.is_floating_point):
        raise DSLError(
            f"{where}: bias must be a floating-point vector of {n} elements, got "
            f"{bias.dtype} {list(bias.shape)}"
        )


# ---- W{2,3,4,8}A16 ------------------------------------------------------------------------------


def _check_quant_inputs(x: torch.Tensor, qweight: QTensor, bias, where: str):
    if not isinstance(qweight, QTensor):
        raise DSLError(f"{where}: qweight must be a dsl.QTensor, got {type(qweight).__name__}")
    if not isinstance(x, torch.Tensor) or x.dtype not in ACT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise DSLError(f"{where}: activations must be float16, bfloat16 or float32, got {got}")
    if x.dim() == 0 or x.shape[-1] != qweight.in_features:
        raise DSLError(
            f"{where}: x has {x.shape[-1] if x.dim() else 0} features but the weight expects "
            f"K={qweight.in_features} (weight shape {list(qweight.shape)})"
        )
    _check_bias(bias, qweight.out_features, where)


def quant_matmul_reference(
    x: torch.Tensor, qweight: QTensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """What the kernel computes: dequantize in float32, round the weight to x's dtype, accumulate
    in float32, add the bias, return x's dtype."""
    _check_quant_inputs(x, qweight, bias, "quant_matmul_reference")
    w = qweight.dequantize_kn(torch.float32).to(x.dtype).to(torch.float32)
    y = x.to(torch.float32) @ w
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def _quant_call(x, qweight: QTensor, bias, allow_tf32: bool, where: str):
    """Checks, then (kernel, x as [M, K], device) of one quantized matmul."""
    _check_quant_inputs(x, qweight, bias, where)
    device = _check_device(x, qweight.data, bias)
    act = "tf32" if x.dtype == torch.float32 and allow_tf32 else _DTYPE_NAMES[x.dtype]
    kernel = _quant_kernel(qweight.bits, qweight.group_size, qweight.symmetric, bias is not None, act)
    return kernel, x.reshape(-1, qweight.shape[1]), device


def quant_matmul(
    x: torch.Tensor,
    qweight: QTensor,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
    *,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """``x @ qweight.dequantize().T + bias`` with the Triton kernel. x: [..., K] -> [..., N].

    ``config=None`` takes the tuning database's config for this shape on this device (see
    :func:`explain_quant_matmul`), else the template's shape-aware default."""
    kernel, x2, device = _quant_call(x, qweight, bias, allow_tf32, "quant_matmul")
    (n, k), m = qweight.shape, x2.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    cfg = _choice(kernel, m, n, k, device, config).config
    out = torch.empty(m, n, dtype=x.dtype, device=device)
    ins = [x2, qweight.data, qweight.scales] + ([] if qweight.symmetric else [qweight.zeros])
    invoke_quant_gemm(kernel.module, kernel.rendered, ins + ([] if bias is None else [bias]), [out], None, cfg)
    return out.reshape(*x.shape[:-1], n)


def explain_quant_matmul(x, qweight: QTensor, bias=None, config=None, *, allow_tf32: bool = False) -> KernelChoice:
    """The config :func:`quant_matmul` runs with for these arguments and where it came from
    (override, measured, nearest, shipped, predicted or default), without running it."""
    kernel, x2, device = _quant_call(x, qweight, bias, allow_tf32, "explain_quant_matmul")
    (n, k), m = qweight.shape, x2.shape[0]
    return _choice(kernel, max(1, m), n, k, device, config)


# ---- int8 x int8 and fp8 x fp8 ------------------------------------------------------------------


def _scale_vector(scale, length: int, where: str, what: str) -> tuple[torch.Tensor, bool]:
    """A scale given as a 0-d/1-element tensor (per tensor) or a vector of ``length``."""
    if not isinstance(scale, torch.Tensor) or not scale.dtype.is_floating_point:
        raise DSLError(f"{where}: {what} must be a floating-point tensor")
    if scale.numel() == 1 and length != 1:
        return scale.reshape(1).to(torch.float32), False
    if scale.numel() == length:
        return scale.reshape(length).to(torch.float32), True
    raise DSLError(f"{where}: {what} must hold 1 or {length} values, got shape {list(scale.shape)}")


def _check_scaled(a, b, dtype, where):
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != 2:
            got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise DSLError(f"{where}: {name} must be a 2-D {dtype} tensor, got {got}")
    if a.shape[1] != b.shape[1]:
        raise DSLError(f"{where}: a is [M, K={a.shape[1]}] but b is [N, K={b.shape[1]}]; K must agree")


def _scaled_reference(a, a_scale, b, b_scale, bias, out_dtype):
    # float64 sums of 8-bit products are exact for any K a GEMM here will see.
    acc = a.to(torch.float64) @ b.to(torch.float64).t()
    sa = (
        a_scale.to(torch.float64).reshape(-1, 1)
        if a_scale.numel() > 1
        else a_scale.to(torch.float64).reshape(())
    )
    sb = (
        b_scale.to(torch.float64).reshape(1, -1)
        if b_scale.numel() > 1
        else b_scale.to(torch.float64).reshape(())
    )
    y = acc * sa * sb
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(out_dtype)


def int8_matmul_reference(a, a_scale, b, b_scale, bias=None, out_dtype=torch.float32):
    """``(a @ b.T) * a_scale[:, None] * b_scale[None, :] + bias`` with int8 a [M, K], b [N, K]."""
    _check_scaled(a, b, torch.int8, "int8_matmul_reference")
    return _scaled_reference(a, a_scale, b, b_scale, bias, out_dtype)


def fp8_matmul_reference(a, a_scale, b, b_scale, bias=None, out_dtype=torch.float32):
    """The same with fp8 e4m3 operands."""
    _check_scaled(a, b, FP8_DTYPE, "fp8_matmul_reference")
    return _scaled_reference(a, a_scale, b, b_scale, bias, out_dtype)


def _scaled_call(template, dtype, a, a_scale, b, b_scale, bias, out_dtype, where):
    """Checks, then (kernel, a's scales, b's scales, device) of one int8/fp8 matmul."""
    _check_scaled(a, b, dtype, where)
    if out_dtype not in ACT_DTYPES:
        raise DSLError(f"{where}: out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    m, n = a.shape[0], b.shape[0]
    sa, row_vec = _scale_vector(a_scale, m, where, "a_scale")
    sb, col_vec = _scale_vector(b_scale, n, where, "b_scale")
    _check_bias(bias, n, where)
    device = _check_device(a, b, sa, sb, bias)
    kernel = _scaled_kernel(template, row_vec, col_vec, bias is not None, _DTYPE_NAMES[out_dtype])
    return kernel, sa, sb, device


def _scaled_matmul(template, dtype, a, a_scale, b, b_scale, bias, out_dtype, config, where):
    kernel, sa, sb, device = _scaled_call(template, dtype, a, a_scale, b, b_scale, bias, out_dtype, where)
    (m, k), n = a.shape, b.shape[0]
    if m == 0:
        return torch.empty(0, n, dtype=out_dtype, device=device)
    cfg = _choice(kernel, m, n, k, device, config).config
    out = torch.empty(m, n, dtype=out_dtype, device=device)
    invoke_scaled_gemm(kernel.module, kernel.rendered, [a, b, sa, sb] + ([] if bias is None else [bias]), [out],
                       None, cfg)
    return out


def _explain_scaled(template, dtype, a, a_scale, b, b_scale, bias, out_dtype, config, where) -> KernelChoice:
    kernel, _, _, device = _scaled_call(template, dtype, a, a_scale, b, b_scale, bias, out_dtype, where)
    (m, k), n = a.shape, b.shape[0]
    return _choice(kernel, max(1, m), n, k, device, config)


def int8_matmul(a, a_scale, b, b_scale, bias=None, out_dtype=torch.float32, config=None):
    """int8 a [M, K] x int8 b [N, K] -> int32 accumulation, scales (per token / per channel, or
    per tensor) and bias in the epilogue; output ``out_dtype``. ``config=None``: as quant_matmul."""
    return _scaled_matmul("int8_gemm", torch.int8, a, a_scale, b, b_scale, bias, out_dtype, config, "int8_matmul")


def explain_int8_matmul(a, a_scale, b, b_scale, bias=None, out_dtype=torch.float32, config=None) -> KernelChoice:
    """The config :func:`int8_matmul` runs with for these arguments and where it came from."""
    return _explain_scaled("int8_gemm", torch.int8, a, a_scale, b, b_scale, bias, out_dtype, config,
                           "explain_int8_matmul")


def fp8_matmul(a, a_scale, b, b_scale, bias=None, out_dtype=torch.float32, config=None):
    """fp8 e4m3 a [M, K] x b [N, K] -> float32 accumulation, scales and bias in the epilogue."""
    return _scaled_matmul("fp8_gemm", FP8_DTYPE, a, a_scale, b, b_scale, bias, out_dtype, config, "fp8_matmul")


def explain_fp8_matmul(a, a_scale, b, b_scale, bias=None, out_dtype=torch.float32, config=None) -> KernelChoice:
    """The config :func:`fp8_matmul` runs with for these arguments and where it came from."""
    return _explain_scaled("fp8_gemm", FP8_DTYPE, a, a_scale, b, b_scale, bias, out_dtype, config,
                           "explain_fp8_matmul")


def int8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias=None, config=None):
    """W8A8 linear: quantize x per token on the fly, then :func:`int8_matmul`. x [..., K] -> [..., N]."""
    from runtime.quantize import quantize_int8_per_token  # runtime sits above codegen

    xq, xs = quantize_int8_per_token(x.reshape(-1, x.shape[-1]))
    y = int8_matmul(xq, xs, wq, w_scale, bias, out_dtype=x.dtype, config=config)
    return y.reshape(*x.shape[:-1], wq.shape[0])


# ---- tuning without an op: `kdsl tune quant_gemm|int8_gemm|fp8_gemm --shape M=..,N=..,K=..` -------


def _dtype_option(value, choices: dict, template: str, what: str) -> str:
    if value not in choices:
        raise TuningError(f"{template}: --dtype {value} is not a supported {what} dtype "
                          f"(choose from {', '.join(choices)})")
    return value


def _task(kernel: _Kernel, m: int, n: int, k: int, inputs: list, expected: torch.Tensor, tolerance=None):
    from autotune.tuner import KernelTask

    problem = kernel.problem(m, n, k)
    return KernelTask(kernel.template, kernel.name, kernel.template, kernel.key_hash, problem, kernel.module,
                      kernel.rendered, inputs, [expected], {"M": m, "N": n, "K": k},
                      default=lambda device: default_config(kernel.template, problem, device), tolerance=tolerance)


def _quant_gemm_tasks(shape: dict, options: dict, device, seed: int) -> list:
    from runtime.quantize import quantize_rtn  # runtime sits above codegen; only tuning needs it

    m, n, k = shape["M"], shape["N"], shape["K"]
    bits, group_size, asym = options["bits"], options["group_size"], options["asym"]
    act = _dtype_option(options["dtype"], _ACT_DTYPES, "quant_gemm", "activation")
    check_format(bits, group_size, (n, k))
    g = torch.Generator().manual_seed(seed)
    qweight = quantize_rtn(torch.randn(n, k, generator=g), bits, group_size, not asym).to(device)
    x = torch.randn(m, k, generator=g).to(_ACT_DTYPES[act]).to(device)
    kernel = _quant_kernel(bits, group_size, not asym, False, act)
    inputs = [x, qweight.data, qweight.scales] + ([qweight.zeros] if asym else [])
    # TF32 keeps 10 mantissa bits, as float16 does: the gate takes the half-precision tolerance.
    return [_task(kernel, m, n, k, inputs, quant_matmul_reference(x, qweight), 2e-2 if act == "tf32" else None)]


def _scaled_gemm_tasks(template: str):
    def build(shape: dict, options: dict, device, seed: int) -> list:
        from runtime.quantize import quantize_fp8, quantize_int8_per_channel, quantize_int8_per_token

        m, n, k = shape["M"], shape["N"], shape["K"]
        out = _dtype_option(options["dtype"], _DTYPES, template, "output")
        g = torch.Generator().manual_seed(seed)
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
        # Per-token and per-channel scales: what int8_linear and row-wise fp8 produce.
        if template == "int8_gemm":
            (a, sa), (b, sb) = quantize_int8_per_token(x), quantize_int8_per_channel(w)
            expected = int8_matmul_reference(a, sa, b, sb, None, _DTYPES[out])
        else:
            (a, sa), (b, sb) = quantize_fp8(x, "row"), quantize_fp8(w, "row")
            expected = fp8_matmul_reference(a, sa, b, sb, None, _DTYPES[out])
        kernel = _scaled_kernel(template, True, True, False, out)
        return [_task(kernel, m, n, k, [t.to(device) for t in (a, b, sa, sb)], expected.to(device))]

    return build


register_template_tasks(TemplateTasks("quant_gemm", ("M", "N", "K"),
                                      {"bits": 4, "group_size": 128, "asym": False, "dtype": "f16"},
                                      _quant_gemm_tasks))
register_template_tasks(TemplateTasks("int8_gemm", ("M", "N", "K"), {"dtype": "f32"}, _scaled_gemm_tasks("int8_gemm")))
register_template_tasks(TemplateTasks("fp8_gemm", ("M", "N", "K"), {"dtype": "f32"}, _scaled_gemm_tasks("fp8_gemm")))


# ---- cost models: the GEMM roofline with these templates' operands ------------------------------
# Unpacking one weight: shift, mask, int->float, subtract the zero point, scale, cast to x's dtype.
_DEQUANT_OPS = 6


def _quant_gemm_cost(problem, config, device: Device) -> float:
    # Weight bytes per element: its share of a packed int32 word plus, per group, a float32 scale
    # (the quantizers' default) and a uint8 zero point when asymmetric.
    meta_bytes = 4 + (1 if "zero_bits" in problem else 0)
    b_bytes = 4 / (32 // problem["bits"]) + meta_bytes / problem["group_size"]
    work = gemm_work({**problem, "b_bytes": b_bytes, "dequant_ops": _DEQUANT_OPS}, config, device)
    # Shared memory as the space estimates it: the word tile is loaded unpacked-wide ([BLOCK_K, BLOCK_N]).
    return roofline_time(dataclasses.replace(work, smem_bytes=_quant_smem(config, problem, _elem_bytes(problem))),
                         device)


def _scaled_gemm_cost(problem, config, device: Device) -> float:
    work = gemm_work({**problem, "out_bytes": problem["out_bits"] // 8}, config, device)
    return roofline_time(dataclasses.replace(work, smem_bytes=_scaled_smem(config, problem, 1)), device)


register_cost_model("quant_gemm", _quant_gemm_cost)
register_cost_model("int8_gemm", _scaled_gemm_cost)
register_cost_model("fp8_gemm", _scaled_gemm_cost)


# ---- static compilation for a GPU target (no GPU needed) ---------------------------------------

_TRITON_TYPES = {
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.int8: "i8",
    torch.int32: "i32",
    torch.uint8: "u8",
    FP8_DTYPE: "fp8e4nv",
}


def static_signature(
    template: str,
    *,
    split_k: int = 1,
    act_dtype: torch.dtype = torch.float16,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = True,
    has_bias: bool = False,
    scale_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype = torch.float16,
    row_scale_vector: bool = True,
    col_scale_vector: bool = True,
):
    """The compilable ``JITFunction`` of one kernel variant and its Triton signature (pointer and
    integer argument types; constexprs are left to the caller). ``split_k > 1`` writes float32
    partials, which changes the output pointer's type."""
    from triton.runtime.jit import JITFunction

    if template == "quant_gemm":
        source = quant_gemm_source(bits, group_size, symmetric, has_bias, act_dtype == torch.float32)
        out_t = act_dtype if split_k == 1 else torch.float32
        # zeros and bias, when absent, are stand-ins pointing at the scales (see launch()).
        ptrs = [
            act_dtype,
            torch.int32,
            scale_dtype,
            scale_dtype if symmetric else torch.uint8,
            act_dtype if has_bias else scale_dtype,
            out_t,
        ]
        n_ints = 3 + 11
    elif template in ("int8_gemm", "fp8_gemm"):
        operand, dtype = ("int8", torch.int8) if template == "int8_gemm" else ("fp8e4m3", FP8_DTYPE)
        source = scaled_gemm_source(operand, row_scale_vector, col_scale_vector, has_bias)
        out_t = out_dtype if split_k == 1 else torch.float32
        ptrs = [dtype, dtype, torch.float32, torch.float32, out_dtype if has_bias else torch.float32, out_t]
        n_ints = 3 + 7
    else:
        raise CodegenError(f"unknown quantized template '{template}' (known: {sorted(SPACES)})")
    kernel = kernel_of(_module(source, template))
    fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    names = fn.arg_names
    signature = {name: f"*{_TRITON_TYPES[t]}" for name, t in zip(names, ptrs)}
    signature.update({name: "i32" for name in names[len(ptrs) : len(ptrs) + n_ints]})
    return fn, signature


def _constexprs(cfg: dict) -> dict:
    # EVEN_K is a property of the shape, not a tuning choice; the even case is the one worth checking.
    return {name: cfg[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "GROUP_M")} | {
        "EVEN_K": True
    }


def compile_for_target(template: str, config: dict, *, arch: int = 90, **variant):
    """Compile one kernel variant (``variant``: see :func:`static_signature`) for ``sm_<arch>`` with
    ``triton.compile``; returns the compiled kernel (``.metadata.shared``, ``.asm['ptx']``, ...).

    Needs a process where Triton's interpreter is off (the interpreter replaces triton's own @jit
    library, which the compiler cannot lower).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if interpreter_active():
        raise CodegenError(
            "compile_for_target: Triton's interpreter is on in this process "
            "(TRITON_INTERPRET=1); compile in a process without it"
        )
    if template not in SPACES:
        raise CodegenError(f"unknown quantized template '{template}' (known: {sorted(SPACES)})")
    cfg = SPACES[template].validate(dict(config), where=f"config for '{template}'")
    fn, signature = static_signature(template, split_k=cfg["SPLIT_K"], **variant)
    constexprs = _constexprs(cfg)
    signature.update({name: "constexpr" for name in constexprs})
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def static_check_configs(template: str, configs, target: Device, **variant):
    """Verdicts of :func:`autotune.static_check.check_configs` (compile for ``target`` in a worker
    process, judge shared memory, registers and spills) for configs of one kernel variant."""
    from autotune.static_check import check_config_groups

    def kernel_of(split_partials: bool):
        return (*static_signature(template, split_k=2 if split_partials else 1, **variant), {})

    return check_config_groups(configs, target, group_of=lambda c: c["SPLIT_K"] > 1, kernel_of=kernel_of,
                               constexprs_of=_constexprs)


__all__ = [
    "QUANT_GEMM_SPACE",
    "INT8_GEMM_SPACE",
    "FP8_GEMM_SPACE",
    "default_config",
    "quant_matmul",
    "quant_matmul_reference",
    "int8_matmul",
    "int8_matmul_reference",
    "int8_linear",
    "fp8_matmul",
    "fp8_matmul_reference",
    "explain_quant_matmul",
    "explain_int8_matmul",
    "explain_fp8_matmul",
    "invalidate_configs",
    "problem_quant_gemm",
    "problem_scaled_gemm",
    "invoke_quant_gemm",
    "invoke_scaled_gemm",
    "compile_for_target",
    "static_signature",
    "static_check_configs",
    "interpreter_active",
    "quant_gemm_source",
    "scaled_gemm_source",
]
