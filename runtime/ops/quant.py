"""Quantized linear algebra as ready ops: packed-weight (W2/3/4/8 A16), int8 x int8 and fp8 GEMMs on
the Triton kernels of ``codegen.kernels.quant_gemm``, with the reference semantics of
``dsl.quantize`` as the CPU path. Configs come through the one lookup chain
(``autotune.lookup``): override -> measured -> nearest -> shipped -> predicted -> the template's
shape-aware default, remembered per (kernel, token bucket, N, K, device)."""

from __future__ import annotations

import functools

import torch

from autotune.devices import Device, cpu_device, local_device
from autotune.lookup import DIRECT, KernelChoice, template_tune_command
from codegen.kernels import quant_gemm as K
from codegen.kernels import quant_moe as QM
from codegen.kernels.moe import token_bucket
from codegen.render import source_hash
from dsl import quantize as Q_REF
from dsl.errors import CodegenError, DSLError
from dsl.qtensor import QTensor
from dsl.quantize import fp8_matmul_reference, int8_matmul_reference, quant_matmul_reference  # noqa: F401


def quant_linear(x: torch.Tensor, qweight: QTensor, bias: torch.Tensor | None = None, *,
                 backend: str = "auto") -> torch.Tensor:
    """``x @ dequantize(qweight).T + bias``; "auto" runs the fused kernel for CUDA tensors and the
    reference (dequantize, then matmul) on CPU, "triton" forces the kernel (interpreter on CPU),
    "torch" the reference."""
    _check_backend(backend, "quant_linear")
    if backend == "triton" or (backend == "auto" and x.is_cuda):
        return quant_matmul(x, qweight, bias)
    return Q_REF.quant_matmul_reference(x, qweight, bias)


def _check_backend(backend: str, where: str) -> None:
    if backend not in ("auto", "triton", "torch"):
        raise DSLError(f"{where}: backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def _choice(kernel: K.KernelVariant, m: int, n: int, k: int, device: torch.device, config) -> KernelChoice:
    """The config to launch with: the caller's (checked), else the lookup chain for the tensors'
    device with the shape-aware :func:`default_config` last, remembered per (kernel, M bucket, N, K,
    device) so that a layer's repeated calls cost one dict lookup."""
    if config is not None:
        problem = kernel.problem(m, n, k)
        return KernelChoice(kernel.name, kernel.template, problem,
                            K.checked_config(kernel.template, config, problem, _kernel_device(device)),
                            "override", "explicit config given by the caller")
    key = (kernel, token_bucket(m), n, k, device)
    found = DIRECT.cached(key)
    if found is None:
        found = DIRECT.choose(key, kernel=kernel.name, template=kernel.template, source_hash=kernel.key_hash,
                              problem=kernel.problem(m, n, k), device=_kernel_device(device),
                              default=functools.partial(K.default_config, kernel.template),
                              tune_hint=template_tune_command(kernel.template, {"M": max(1, m), "N": n, "K": k},
                                                            kernel.options))
    return found

def invalidate_configs() -> None:
    """Forget the configs chosen so far (all directly launched kernels), e.g. after tuning in this
    process or after pointing ``KDSL_DB`` elsewhere; the next call at each shape looks them up again."""
    DIRECT.clear()

def _check_device(*tensors: torch.Tensor) -> torch.device:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise DSLError(f"quantized matmul: operands live on different devices {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cpu" and not K.interpreter_active():
        raise CodegenError(
            "the Triton kernels need a GPU, or Triton's interpreter for CPU tensors: set "
            "TRITON_INTERPRET=1 before triton is imported, or use the *_reference functions "
            "(the CPU path of runtime.nn.QuantLinear)"
        )
    return device

def _kernel_device(device: torch.device) -> Device:
    # Tuning records of the interpreter are keyed by this machine's CPU (see autotune.devices).
    return local_device() if device.type == "cuda" else cpu_device()

def _quant_call(x, qweight: QTensor, bias, allow_tf32: bool, where: str):
    """Checks, then (kernel, x as [M, K], device) of one quantized matmul."""
    Q_REF.check_quant_inputs(x, qweight, bias, where)
    device = _check_device(x, qweight.data, bias)
    act = "tf32" if x.dtype == torch.float32 and allow_tf32 else K._DTYPE_NAMES[x.dtype]
    kernel = K.quant_kernel(qweight.bits, qweight.group_size, qweight.symmetric, bias is not None, act)
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
    K.invoke_quant_gemm(kernel.module, kernel.rendered, ins + ([] if bias is None else [bias]), [out], None, cfg)
    return out.reshape(*x.shape[:-1], n)

def explain_quant_matmul(x, qweight: QTensor, bias=None, config=None, *, allow_tf32: bool = False) -> KernelChoice:
    """The config :func:`quant_matmul` runs with for these arguments and where it came from
    (override, measured, nearest, shipped, predicted or default), without running it."""
    kernel, x2, device = _quant_call(x, qweight, bias, allow_tf32, "explain_quant_matmul")
    (n, k), m = qweight.shape, x2.shape[0]
    return _choice(kernel, max(1, m), n, k, device, config)

def _scaled_call(template, dtype, a, a_scale, b, b_scale, bias, out_dtype, where):
    """Checks, then (kernel, a's scales, b's scales, device) of one int8/fp8 matmul."""
    Q_REF.check_scaled(a, b, dtype, where)
    if out_dtype not in Q_REF.ACT_DTYPES:
        raise DSLError(f"{where}: out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    m, n = a.shape[0], b.shape[0]
    sa, row_vec = Q_REF.scale_vector(a_scale, m, where, "a_scale")
    sb, col_vec = Q_REF.scale_vector(b_scale, n, where, "b_scale")
    Q_REF.check_bias(bias, n, where)
    device = _check_device(a, b, sa, sb, bias)
    kernel = K.scaled_kernel(template, row_vec, col_vec, bias is not None, K._DTYPE_NAMES[out_dtype])
    return kernel, sa, sb, device

def _scaled_matmul(template, dtype, a, a_scale, b, b_scale, bias, out_dtype, config, where):
    kernel, sa, sb, device = _scaled_call(template, dtype, a, a_scale, b, b_scale, bias, out_dtype, where)
    (m, k), n = a.shape, b.shape[0]
    if m == 0:
        return torch.empty(0, n, dtype=out_dtype, device=device)
    cfg = _choice(kernel, m, n, k, device, config).config
    out = torch.empty(m, n, dtype=out_dtype, device=device)
    K.invoke_scaled_gemm(kernel.module, kernel.rendered, [a, b, sa, sb] + ([] if bias is None else [bias]), [out],
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
    return _scaled_matmul("fp8_gemm", Q_REF.FP8_DTYPE, a, a_scale, b, b_scale, bias, out_dtype, config, "fp8_matmul")

def explain_fp8_matmul(a, a_scale, b, b_scale, bias=None, out_dtype=torch.float32, config=None) -> KernelChoice:
    """The config :func:`fp8_matmul` runs with for these arguments and where it came from."""
    return _explain_scaled("fp8_gemm", Q_REF.FP8_DTYPE, a, a_scale, b, b_scale, bias, out_dtype, config,
                           "explain_fp8_matmul")

def int8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias=None, config=None, *,
                backend: str = "auto", out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """W8A8 linear: quantize x per token on the fly, then the int8 GEMM. x [..., K] -> [..., N] in
    ``out_dtype`` (x's dtype by default). "auto" runs the kernel for CUDA tensors and the reference
    (the same quantization, matmul in fp32) on CPU; "triton" forces the kernel (interpreter on CPU)."""
    _check_backend(backend, "int8_linear")
    xq, xs = Q_REF.quantize_int8_per_token(x.reshape(-1, x.shape[-1]))
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if backend == "triton" or (backend == "auto" and x.is_cuda):
        y = int8_matmul(xq, xs, wq, w_scale, bias, out_dtype=out_dtype, config=config)
    else:
        y = Q_REF.int8_matmul_reference(xq, xs, wq, w_scale, bias, out_dtype=out_dtype)
    return y.reshape(*x.shape[:-1], wq.shape[0])


def demo_cases():
    """Runner-style cases for `kdsl demo`: (name, runner(backend, *args), args, kwargs, reference)."""
    from dsl.quantize import quantize_int8_per_channel, quantize_rtn

    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 256, generator=g)
    w = torch.randn(40, 256, generator=g) / 16
    b = torch.randn(40, generator=g)
    q4 = quantize_rtn(w, bits=4, group_size=128)
    q3 = quantize_rtn(w, bits=3, group_size=64, sym=False)
    w8, s8 = quantize_int8_per_channel(w)

    def dequant_ref(x, q, b):
        return x @ q.dequantize(torch.float32).T + b

    def int8_ref(x, wq, ws):  # the same per-token activation quantization, computed in fp32
        from dsl.quantize import quantize_int8_per_token

        aq, as_ = quantize_int8_per_token(x)
        return (aq.float() * as_[:, None]) @ (wq.float() * ws[:, None]).T

    def w_a16(be, x, q, b):
        return quant_linear(x, q, b, backend=be)

    def w8a8(be, x, wq, ws):
        return int8_linear(x, wq, ws, backend=be)

    w_a16.__kdsl_templates__ = "quant_gemm"
    w8a8.__kdsl_templates__ = "int8_gemm"
    return [
        ("w4a16 g128 gemm", w_a16, (x, q4, b), {}, dequant_ref),
        ("w3a16 g64 asym gemm", w_a16, (x, q3, b), {}, dequant_ref),
        ("w8a8 int8 gemm", w8a8, (x, w8, s8), {}, int8_ref),
    ]


# ---- quantized MoE experts -----------------------------------------------------------------------


def _expert_config(mode: str, weight, x, tokens: int, topk: int, device: torch.device, config) -> dict:
    """The lookup chain for one grouped GEMM of the experts (override checked against the space)."""
    shape = QM.problem_shape(mode, tokens, topk, weight, x.element_size())
    target = _kernel_device(device)
    if config is not None:
        return QM.checked_config(config, shape, target, mode)
    source = QM.quant_moe_source(mode, weight.bits, weight.group_size, weight.symmetric, x.dtype == torch.float32)
    problem = QM.tuning_problem(mode, tokens, shape["N"], shape["K"], shape["E"], topk, weight.bits,
                                weight.group_size, weight.symmetric, x.element_size())
    key = ("quant_moe_gemm", source, tuple(sorted(problem.items())), device)
    found = DIRECT.cached(key)
    if found is None:
        hint = template_tune_command("quant_moe_gemm", {k: problem[k] for k in ("M", "N", "K", "E", "topk")},
                                     {"mode": mode, "bits": weight.bits, "group_size": weight.group_size,
                                      "asym": not weight.symmetric,
                                      "dtype": {torch.float16: "f16", torch.bfloat16: "bf16"}.get(x.dtype, "f32")})
        found = DIRECT.choose(key, kernel=f"quant_moe_{mode}", template="quant_moe_gemm",
                              source_hash=source_hash(source), problem=problem, device=target,
                              default=lambda p, d: QM.default_config(dict(shape), d), tune_hint=hint)
    return found.config


def quant_moe_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up, down,
                      config: dict | None = None) -> torch.Tensor:
    """A quantized SwiGLU MoE's experts with the grouped Triton kernels: x [T, D], ids [T, k] (experts
    in [0, E)), weights [T, k]; gate_up [E] x [2H, D] (gate rows, then up), down [E] x [N, H] ->
    y [T, N] in x's dtype. ``config``: None (the lookup chain), one config for both GEMMs, or
    {"gate_up": ..., "down": ...}."""
    where = "quant_moe_experts"
    QM.check_inputs(x, ids, weights, gate_up, down, where)
    tensors = [x, ids, weights, gate_up.data, gate_up.scales, down.data, down.scales]
    device = _check_device(*tensors, gate_up.zeros, down.zeros)
    if device.type == "cpu" and torch.bfloat16 in (x.dtype, gate_up.scales.dtype, down.scales.dtype):
        raise DSLError(f"{where}: Triton's CPU interpreter computes bfloat16 wrongly; use float16/float32 "
                       "activations and scales on CPU or run on a GPU")
    tokens, topk = ids.shape
    if tokens == 0:
        return x.new_zeros(0, down.shape[0])
    cfg_gate_up, cfg_down = QM.split_configs(config)
    return QM.launch_experts(x, ids, weights, gate_up, down,
                             _expert_config("gate_up", gate_up, x, tokens, topk, device, cfg_gate_up),
                             _expert_config("down", down, x, tokens, topk, device, cfg_down))
