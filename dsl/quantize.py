"""Quantizers: weights to packed QTensors (round-to-nearest, GPTQ-style), activations to int8/fp8.

Conventions
- Symmetric codes follow MARLIN: ``q = clamp(round(w / s) + 2**(b-1), 0, 2**b - 1)`` with
  ``s = max|w| / (2**(b-1) - 1)`` per group, so every weight of the group is inside the code
  range and the code ``0`` (value ``-2**(b-1) * s``) is the only level never produced by rounding.
- Asymmetric codes: ``s = (max - min) / (2**b - 1)`` and an integer zero point
  ``z = round(-min / s)``, with the range widened to contain 0 so that ``z`` is a valid code.
- A group is ``group_size`` consecutive input features (columns) of one output row; -1 = the row.
- ``clip_search=True`` shrinks each group's range by the factor (from a small grid) that minimises
  the group's squared error: it trades a little clipping of outliers for finer steps, which pays
  off on heavy-tailed weights.
"""

from __future__ import annotations

import math

import torch

from dsl.errors import DSLError
from dsl.qtensor import PER_CHANNEL, QTensor, check_format

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
INT8_MAX = 127
_MIN_SCALE = 1e-10  # all-zero groups: any positive scale reproduces them exactly
_CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(10))  # 1.00 .. 0.55


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``20 log10(||ref|| / ||ref - out||)`` (inf if equal)."""
    if ref.shape != out.shape:
        raise DSLError(f"sqnr_db: shapes differ, {list(ref.shape)} vs {list(out.shape)}")
    ref64, out64 = ref.double(), out.double()
    noise = torch.linalg.vector_norm(ref64 - out64).item()
    signal = torch.linalg.vector_norm(ref64).item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 20.0 * math.log10(signal / noise)


# ---- group-wise weight quantization -------------------------------------------------------------


def _check_weight(w: torch.Tensor, where: str) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.dtype.is_floating_point:
        got = f"{w.dtype} {list(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise DSLError(f"{where}: expected a 2-D floating-point weight [N, K], got {got}")
    if not torch.isfinite(w).all():
        raise DSLError(f"{where}: the weight contains NaN or Inf")


def _params(lo: torch.Tensor, hi: torch.Tensor, bits: int, sym: bool):
    """Scale and (float) zero point per group from the group's range [lo, hi]."""
    if sym:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = (amax / ((1 << (bits - 1)) - 1)).clamp_min(_MIN_SCALE)
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale = ((hi - lo) / ((1 << bits) - 1)).clamp_min(_MIN_SCALE)
        zero = (-lo / scale).round().clamp(0, (1 << bits) - 1)
    return scale, zero


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return (torch.round(w / scale) + zero).clamp(0, (1 << bits) - 1)


def _group_params(wg: torch.Tensor, bits: int, sym: bool, clip_search: bool):
    """wg: [N, G, gs] float32 -> scale, zero [N, G] (zero integral, stored as float)."""
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    if not clip_search:
        return _params(lo, hi, bits, sym)
    best_err = best_scale = best_zero = None
    for ratio in _CLIP_RATIOS:
        scale, zero = _params(lo * ratio, hi * ratio, bits, sym)
        deq = (_codes(wg, scale[..., None], zero[..., None], bits) - zero[..., None]) * scale[..., None]
        err = (deq - wg).square().sum(dim=-1)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _to_qtensor(codes, scale, zero, bits, group_size, sym, scale_dtype) -> QTensor:
    """codes [N, K], scale/zero [N, G] -> QTensor (scales stored [G, N])."""
    scales = scale.t().contiguous().to(scale_dtype)
    zeros = None if sym else zero.t().contiguous().to(torch.uint8)
    return QTensor.pack(codes.to(torch.int32), scales, zeros, bits=bits, group_size=group_size, symmetric=sym)


def _check_scale_dtype(scale_dtype):
    if scale_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise DSLError(f"quantize: scale_dtype must be float32, float16 or bfloat16, got {scale_dtype}")


def quantize_rtn(
    w: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    *,
    clip_search: bool = False,
    scale_dtype: torch.dtype = torch.float32,
) -> QTensor:
    """Round-to-nearest group-wise quantization of a weight ``[N, K]``."""
    _check_weight(w, "quantize_rtn")
    check_format(bits, group_size, tuple(w.shape))
    _check_scale_dtype(scale_dtype)
    n, k = w.shape
    gs = k if group_size == PER_CHANNEL else group_size
    wg = w.detach().to(torch.float32).reshape(n, k // gs, gs)
    scale, zero = _group_params(wg, bits, sym, clip_search)
    # Quantize with the scale as it will be stored, so that dequantize() reproduces the rounding.
    scale = scale.to(scale_dtype).to(torch.float32).clamp_min(_MIN_SCALE)
    codes = _codes(wg, scale[..., None], zero[..., None], bits).reshape(n, k)
    return _to_qtensor(codes, scale, zero, bits, group_size, sym, scale_dtype)


class HessianAccumulator:
    """Running ``H = 2 X^T X / n`` over batches of activations, without keeping the batches."""

    def __init__(self, k: int, device=None):
        self.k = k
        self.sum = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.k:
            raise DSLError(f"HessianAccumulator: activations have {x.shape[-1]} features, expected {self.k}")
        x = x.detach().reshape(-1, self.k).to(torch.float64)
        self.sum += x.t() @ x
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.rows == 0:
            raise DSLError("HessianAccumulator: no calibration rows were seen (did the layer run?)")
        return (2.0 / self.rows) * self.sum


def hessian_from_activations(calib: torch.Tensor, k: int) -> torch.Tensor:
    """``H = 2 X^T X / n`` over calibration rows ``X [n, K]`` (any leading dims), float64 for the solve."""
    if not isinstance(calib, torch.Tensor) or calib.dim() == 0 or calib.shape[-1] != k:
        got = list(calib.shape) if isinstance(calib, torch.Tensor) else type(calib).__name__
        raise DSLError(f"quantize_gptq: calibration activations must end in K={k} features, got {got}")
    acc = HessianAccumulator(k, device=calib.device)
    acc.add(calib)
    return acc.hessian()


def quantize_gptq(
    w: torch.Tensor,
    calib: torch.Tensor | None,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    clip_search: bool = False,
    scale_dtype: torch.dtype = torch.float32,
    hessian: torch.Tensor | None = None,
) -> QTensor:
    """Error-compensating quantization (GPTQ-style) of ``w [N, K]`` given activations ``calib [..., K]``
    (or a precomputed ``hessian`` [K, K], e.g. accumulated by :class:`HessianAccumulator`).

    Columns are quantized left to right; each column's rounding error, weighted by the inverse
    Hessian of the layer's squared output error (``H = 2 X^T X / n``), is pushed onto the columns
    not yet quantized, so later columns absorb what earlier ones lost. Using the upper Cholesky
    factor ``U`` of ``H^-1`` makes each step a rank-1 update; updates to columns past the current
    block are applied in one matrix product per block. A group's scale is chosen when the
    algorithm reaches its first column, from the weights as updated so far.
    """
    _check_weight(w, "quantize_gptq")
    check_format(bits, group_size, tuple(w.shape))
    _check_scale_dtype(scale_dtype)
    if not 0.0 <= damp < 1.0:
        raise DSLError(
            f"quantize_gptq: damp={damp} must be in [0, 1) (a fraction of the mean Hessian diagonal)"
        )
    n, k = w.shape
    if hessian is not None:
        if tuple(hessian.shape) != (k, k):
            raise DSLError(f"quantize_gptq: hessian must be [{k}, {k}], got {list(hessian.shape)}")
        h = hessian.detach().to(torch.float64).clone()
    elif calib is not None:
        h = hessian_from_activations(calib, k)
    else:
        raise DSLError("quantize_gptq: give calibration activations (calib=[..., K]) or a hessian")
    weight = w.detach().to(torch.float64).clone()
    # Inputs that never fire carry no information: zero their weights, make H invertible there.
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    weight[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype, device=h.device)
    try:
        chol = torch.linalg.cholesky(h)
        u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    except RuntimeError as exc:  # torch.linalg.LinAlgError derives from RuntimeError
        raise DSLError(
            f"quantize_gptq: the damped Hessian is not positive definite ({exc}); "
            f"raise damp (now {damp}) or give more calibration rows"
        ) from exc

    gs = k if group_size == PER_CHANNEL else group_size
    groups = k // gs
    # Blocks hold whole groups, so a group's scale is computed from fully updated columns.
    block = gs * max(1, block_size // gs) if group_size != PER_CHANNEL else block_size
    codes = torch.zeros(n, k, dtype=torch.float64, device=w.device)
    scale = torch.empty(n, groups, dtype=torch.float64, device=w.device)
    zero = torch.empty(n, groups, dtype=torch.float64, device=w.device)
    if group_size == PER_CHANNEL:
        s, z = _group_params(weight.float().unsqueeze(1), bits, sym, clip_search)
        scale[:, 0] = s[:, 0].to(scale_dtype).double().clamp_min(_MIN_SCALE)
        zero[:, 0] = z[:, 0].double()

    for start in range(0, k, block):
        stop = min(start + block, k)
        w_blk = weight[:, start:stop].clone()
        err_blk = torch.zeros_like(w_blk)
        u_blk = u[start:stop, start:stop]
        for j in range(stop - start):
            col = start + j
            g = col // gs
            if group_size != PER_CHANNEL and col % gs == 0:
                s, z = _group_params(w_blk[:, j : j + gs].float().unsqueeze(1), bits, sym, clip_search)
                scale[:, g] = s[:, 0].to(scale_dtype).double().clamp_min(_MIN_SCALE)
                zero[:, g] = z[:, 0].double()
            column = w_blk[:, j]
            q = _codes(column, scale[:, g], zero[:, g], bits)
            codes[:, col] = q
            err = (column - (q - zero[:, g]) * scale[:, g]) / u_blk[j, j]
            w_blk[:, j:] -= err.unsqueeze(1) * u_blk[j, j:].unsqueeze(0)
            err_blk[:, j] = err
        weight[:, stop:] -= err_blk @ u[start:stop, stop:]

    return _to_qtensor(codes, scale.float(), zero.float(), bits, group_size, sym, scale_dtype)


def quantize_weight(
    w: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    method: str = "rtn",
    calib: torch.Tensor | None = None,
    **kwargs,
) -> QTensor:
    """Dispatch on ``method``: "rtn" or "gptq" (which needs ``calib``)."""
    if method == "rtn":
        return quantize_rtn(w, bits, group_size, sym, **kwargs)
    if method == "gptq":
        if calib is None and kwargs.get("hessian") is None:
            raise DSLError("quantize: method='gptq' needs calibration activations (calib=[..., K])")
        return quantize_gptq(w, calib, bits, group_size, sym, **kwargs)
    raise DSLError(f"quantize: unknown method {method!r}; choose 'rtn' or 'gptq'")


# ---- int8 and fp8 (weights and activations) ---------------------------------------------------


def quantize_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per row (token): ``x ~ q * scale[..., None]``; q in [-127, 127]."""
    if not x.dtype.is_floating_point:
        raise DSLError(f"quantize_int8_per_token: expected floating-point activations, got {x.dtype}")
    xf = x.detach().to(torch.float32)
    scale = (xf.abs().amax(dim=-1) / INT8_MAX).clamp_min(_MIN_SCALE)
    q = torch.round(xf / scale.unsqueeze(-1)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel of a weight ``[N, K]``: ``w ~ q * scale[:, None]``."""
    _check_weight(w, "quantize_int8_per_channel")
    return quantize_int8_per_token(w)


def quantize_fp8(t: torch.Tensor, granularity: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 e4m3 with a float32 scale so that ``t ~ q.float() * scale``.

    granularity "tensor": one scale (0-d tensor); "row": one scale per row of a 2-D tensor
    (per output channel of a weight [N, K], per token of activations [M, K]).
    """
    if not t.dtype.is_floating_point or t.dtype == FP8_DTYPE:
        raise DSLError(f"quantize_fp8: expected a float16/bfloat16/float32 tensor, got {t.dtype}")
    tf = t.detach().to(torch.float32)
    if granularity == "tensor":
        scale = (tf.abs().amax() / FP8_MAX).clamp_min(_MIN_SCALE)
        q = (tf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    elif granularity == "row":
        if t.dim() != 2:
            raise DSLError(f"quantize_fp8: per-row scales need a 2-D tensor, got shape {list(t.shape)}")
        scale = (tf.abs().amax(dim=1) / FP8_MAX).clamp_min(_MIN_SCALE)
        q = (tf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    else:
        raise DSLError(f"quantize_fp8: granularity must be 'tensor' or 'row', got {granularity!r}")
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8` in float32."""
    s = scale.to(torch.float32)
    return q.to(torch.float32) * (s if s.dim() == 0 else s.view(-1, *([1] * (q.dim() - 1))))


# ---- reference semantics of the quantized GEMMs (what codegen's kernels compute) -----------------

ACT_DTYPES = (torch.float16, torch.float32, torch.bfloat16)
FP8_DTYPE = torch.float8_e4m3fn


def check_bias(bias, n: int, where: str):
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n or not bias.dtype.is_floating_point):
        raise DSLError(
            f"{where}: bias must be a floating-point vector of {n} elements, got "
            f"{bias.dtype} {list(bias.shape)}"
        )

def check_quant_inputs(x: torch.Tensor, qweight: QTensor, bias, where: str):
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
    check_bias(bias, qweight.out_features, where)

def quant_matmul_reference(
    x: torch.Tensor, qweight: QTensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """What the kernel computes: dequantize in float32, round the weight to x's dtype, accumulate
    in float32, add the bias, return x's dtype."""
    check_quant_inputs(x, qweight, bias, "quant_matmul_reference")
    w = qweight.dequantize_kn(torch.float32).to(x.dtype).to(torch.float32)
    y = x.to(torch.float32) @ w
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)

def scale_vector(scale, length: int, where: str, what: str) -> tuple[torch.Tensor, bool]:
    """A scale given as a 0-d/1-element tensor (per tensor) or a vector of ``length``."""
    if not isinstance(scale, torch.Tensor) or not scale.dtype.is_floating_point:
        raise DSLError(f"{where}: {what} must be a floating-point tensor")
    if scale.numel() == 1 and length != 1:
        return scale.reshape(1).to(torch.float32), False
    if scale.numel() == length:
        return scale.reshape(length).to(torch.float32), True
    raise DSLError(f"{where}: {what} must hold 1 or {length} values, got shape {list(scale.shape)}")

def check_scaled(a, b, dtype, where):
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
    check_scaled(a, b, torch.int8, "int8_matmul_reference")
    return _scaled_reference(a, a_scale, b, b_scale, bias, out_dtype)

def fp8_matmul_reference(a, a_scale, b, b_scale, bias=None, out_dtype=torch.float32):
    """The same with fp8 e4m3 operands."""
    check_scaled(a, b, FP8_DTYPE, "fp8_matmul_reference")
    return _scaled_reference(a, a_scale, b, b_scale, bias, out_dtype)
