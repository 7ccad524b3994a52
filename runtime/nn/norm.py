"""RMSNorm as a module over the dsl ``rmsnorm`` primitive (one fused reduction kernel on GPU)."""

from __future__ import annotations

import threading

import torch
from torch import nn

import dsl
from dsl.errors import DSLError

from ..compiler import CompiledOp, compile

T = dsl.Tensor


@dsl.op
def rmsnorm_op(x: T["M", "D"], weight: T["D"], *, eps: float = 1e-6):
    return dsl.rmsnorm(x, weight, eps=eps)


_compiled: dict[str, CompiledOp] = {}
_lock = threading.Lock()


def _get(backend: str) -> CompiledOp:
    with _lock:
        if backend not in _compiled:
            _compiled[backend] = compile(rmsnorm_op, backend=backend)
        return _compiled[backend]


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2, last axis) + eps) * weight, for x of any leading shape. The weight
    (``weight`` [dim], initialised to ones) is cast to x's dtype, so mixed precision works."""

    def __init__(self, dim: int, eps: float = 1e-6, *, backend: str = "auto", device=None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise DSLError(f"RMSNorm: dim must be a positive int, got {dim!r}")
        if not eps > 0:
            raise DSLError(f"RMSNorm: eps must be positive, got {eps!r}")
        self.dim, self.eps, self.backend = dim, float(eps), backend
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise DSLError(f"RMSNorm({self.dim}): the last dim of x is {x.shape[-1]} (shape {list(x.shape)})")
        y = _get(self.backend)(x.reshape(-1, self.dim), self.weight.to(x.dtype), eps=self.eps)
        return y.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
