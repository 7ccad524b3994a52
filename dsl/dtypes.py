"""Element types of kdsl tensors and their PyTorch / Triton spellings."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class DType:
    name: str
    torch_dtype: torch.dtype
    triton: str          # the tl type used in generated code
    is_float: bool
    bits: int

    def __repr__(self) -> str:
        return f"dsl.{self.name}"

    @property
    def torch(self) -> torch.dtype:
        return self.torch_dtype

    @property
    def itemsize(self) -> int:
        return max(1, self.bits // 8)


f64 = DType("f64", torch.float64, "tl.float64", True, 64)
f32 = DType("f32", torch.float32, "tl.float32", True, 32)
f16 = DType("f16", torch.float16, "tl.float16", True, 16)
bf16 = DType("bf16", torch.bfloat16, "tl.bfloat16", True, 16)
f8e4m3 = DType("f8e4m3", torch.float8_e4m3fn, "tl.float8e4nv", True, 8)
i8 = DType("i8", torch.int8, "tl.int8", False, 8)
i32 = DType("i32", torch.int32, "tl.int32", False, 32)
i64 = DType("i64", torch.int64, "tl.int64", False, 64)
bool_ = DType("bool", torch.bool, "tl.int1", False, 1)

ALL = {d.name: d for d in (f64, f32, f16, bf16, f8e4m3, i8, i32, i64, bool_)}
_BY_TORCH = {d.torch_dtype: d for d in ALL.values()}


def from_torch(dtype: torch.dtype) -> DType | None:
    return _BY_TORCH.get(dtype)


def compute_type(dtype: DType) -> DType:
    """The type kernels compute in: fp32 for floats narrower than 32 bits (bf16 is wrong on the
    interpreter and low-precision math is what fast kernels avoid anyway), the type itself else."""
    if dtype.is_float and dtype.bits < 32:
        return f32
    return dtype
