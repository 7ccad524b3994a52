"""Dense compiled ops: linear layers with fused epilogues, normalisation, softmax."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import dsl

from ..compiler import compile

T = dsl.Tensor


@dsl.op
def linear_op(x: T["M", "K"], w: T["N", "K"], b: T["N"], *, activation: str = "none"):
    y = x @ w.T + b
    if activation == "gelu":
        return dsl.gelu(y)
    if activation == "silu":
        return dsl.silu(y)
    if activation == "relu":
        return dsl.relu(y)
    if activation != "none":
        raise dsl.DSLError(f"unknown activation '{activation}' (none, gelu, silu, relu)", op="linear_op")
    return y


@dsl.op
def linear_nobias_op(x: T["M", "K"], w: T["N", "K"]):
    return x @ w.T


@dsl.op
def residual_rmsnorm_op(x: T["M", "D"], r: T["M", "D"], w: T["D"], *, eps: float = 1e-6):
    return dsl.rmsnorm(x + r, w, eps=eps)


@dsl.op
def softmax_op(x: T["M", "N"], *, scale: float = 1.0):
    return dsl.softmax(x * scale, axis=-1)


_compiled: dict[tuple, object] = {}


def _get(op, backend):
    key = (op.name, backend)
    if key not in _compiled:
        _compiled[key] = compile(op, backend=backend)
    return _compiled[key]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           activation: str = "none", backend: str = "auto") -> torch.Tensor:
    """y = activation(x @ weight.T + bias) for x of any leading shape."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if bias is None:
        if activation != "none":
            bias = x.new_zeros(weight.shape[0])
        else:
            return _get(linear_nobias_op, backend)(x2, weight).reshape(*lead, weight.shape[0])
    y = _get(linear_op, backend)(x2, weight, bias, activation=activation)
    return y.reshape(*lead, weight.shape[0])


def demo_cases():
    """(name, op, args, independent reference) at small shapes, for `kdsl demo`."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731

    @dsl.op
    def gelu_mlp_epilogue(x: T["M", "K"], w: T["N", "K"], b: T["N"], res: T["M", "N"]):
        return dsl.gelu(x @ w.T + b) * 0.5 + res

    x, w, b, res = r(45, 70), r(37, 70), r(37), r(45, 37)
    d = r(33, 96)
    return [
        ("gemm+gelu+residual", gelu_mlp_epilogue, (x, w, b, res), {},
         lambda x, w, b, res: F.gelu(x @ w.T + b) * 0.5 + res),
        ("linear+silu", linear_op, (x, w, b), {"activation": "silu"},
         lambda x, w, b, activation: F.silu(x @ w.T + b)),
        ("residual+rmsnorm", residual_rmsnorm_op, (d, r(33, 96), r(96)), {"eps": 1e-5},
         lambda x, res, w, eps: F.rms_norm(x + res, (96,), w, eps)),
        ("softmax", softmax_op, (d,), {"scale": 0.125}, lambda x, scale: torch.softmax(x * scale, -1)),
    ]
