"""Quantized linear algebra as ready ops: packed-weight GEMMs on the Triton kernels, with the
reference semantics as the CPU path."""

from __future__ import annotations

import torch

from codegen.kernels import quant_gemm as Q
from dsl.qtensor import QTensor


def quant_linear(x: torch.Tensor, qweight: QTensor, bias: torch.Tensor | None = None, *,
                 backend: str = "auto") -> torch.Tensor:
    """``x @ dequantize(qweight).T + bias``; "auto" runs the fused kernel for CUDA tensors and the
    reference (dequantize, then matmul) on CPU, "triton" forces the kernel (interpreter on CPU)."""
    if backend == "triton" or (backend == "auto" and x.is_cuda):
        return Q.quant_matmul(x, qweight, bias)
    return Q.quant_matmul_reference(x, qweight, bias)


def int8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias=None, *,
                backend: str = "auto", out_dtype=torch.float32) -> torch.Tensor:
    """Dynamic per-token int8 activations x int8 per-channel weights, scales in the epilogue."""
    from runtime.quantize import quantize_int8_per_token

    a_q, a_scale = quantize_int8_per_token(x)
    if backend == "triton" or (backend == "auto" and x.is_cuda):
        return Q.int8_matmul(a_q, a_scale, w_q, w_scale, bias, out_dtype)
    return Q.int8_matmul_reference(a_q, a_scale, w_q, w_scale, bias, out_dtype)


def demo_cases():
    """Runner-style cases for `kdsl demo`: (name, runner(backend, *args), args, kwargs, reference)."""
    from runtime.quantize import quantize_int8_per_channel, quantize_rtn

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
        from runtime.quantize import quantize_int8_per_token

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
