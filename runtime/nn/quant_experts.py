"""Quantized routed experts for ``runtime.nn.MoE`` (inference).

Each expert's gate/up matrix (``w13[e]``, [2*hidden, dim]) and down matrix (``w2[e]``, [dim, hidden])
is quantized as a :class:`QuantLinear` with the options of ``QuantLinear.from_linear`` (bits, group
size, RTN or GPTQ calibrated on the expert's own tokens, sym/asym). The packed tensors of all experts
are then stacked into one set of buffers per matrix (``w13_qweight`` [E, words, 2H], ``w13_scales``,
``w13_zeros``; the same for ``w2``): those buffers are the module's storage and its state dict, and
each expert's QuantLinear (``gate_up[e]``, ``down[e]``) reads views into them.

Forward, on CUDA tensors (or with ``backend="triton"``): two expert-sorted grouped GEMMs with the
dequantization in their K loop (codegen/kernels/quant_moe.py): gate/up with SwiGLU in its epilogue,
down with the routing weight in its epilogue and a fixed-order combine over a token's k slots, so
a layer is a few launches whatever the number of experts. On CPU (and with ``backend="torch"``):
tokens sorted by expert once, each expert that received tokens runs its two QuantLinear layers on
its rows (dequantize then matmul, or torch's int4 kernel for bf16), and the weighted sum over the k
slots is accumulated in fp32 in slot order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from codegen.kernels.quant_moe import StackedQTensor, check_experts, check_inputs, expert_loop
from dsl.errors import DSLError

from ..ops.quant import quant_moe_experts
from .quant_linear import BACKENDS, QuantLinear

_PARTS = ("qweight", "scales", "zeros")


class QuantExperts(nn.Module):
    """``num_experts`` SwiGLU experts with quantized weights; call as ``(x [T, dim], ids [T, k],
    weights [T, k]) -> y [T, dim]``. ``backend``: "auto" (grouped Triton kernels for CUDA tensors,
    the per-expert torch path on CPU), "triton" or "torch"; ``config``: a kernel config for the
    grouped GEMMs (see codegen.kernels.quant_moe.quant_moe_experts; None: the default)."""

    def __init__(self, gate_up: list[QuantLinear], down: list[QuantLinear], *, backend: str = "auto"):
        super().__init__()
        if len(gate_up) != len(down) or not gate_up:
            raise DSLError("QuantExperts needs one gate/up and one down layer per expert")
        if backend not in BACKENDS:
            raise DSLError(f"QuantExperts: backend must be one of {BACKENDS}, got {backend!r}")
        if any(layer.bias is not None for layer in (*gate_up, *down)):
            raise DSLError("QuantExperts: expert layers have no bias (the grouped kernels add none)")
        w13 = StackedQTensor.stack([layer.weight_q for layer in gate_up], "the gate/up layers")
        w2 = StackedQTensor.stack([layer.weight_q for layer in down], "the down layers")
        check_experts(w13, w2, "QuantExperts")
        if w2.shape[0] != w13.shape[1]:
            raise DSLError(f"QuantExperts: the down layers [{w2.shape[0]}, {w2.shape[1]}] must map back to "
                           f"the gate/up layers' {w13.shape[1]} input features")
        for prefix, stacked in (("w13", w13), ("w2", w2)):
            for part, tensor in zip(_PARTS, (stacked.data, stacked.scales, stacked.zeros)):
                self.register_buffer(f"{prefix}_{part}", tensor)
        # A plain list, not a ModuleList: the layers' tensors are views of the buffers above, which
        # alone are moved, cast and saved (no second copy in memory or in the state dict). The layers
        # are this module's torch path (its triton path is the grouped kernels), whatever device.
        self.gate_up, self.down = list(gate_up), list(down)
        for layer in (*self.gate_up, *self.down):
            layer.backend = "torch"
        self.num_experts = len(gate_up)
        self.dim, self.hidden = w13.shape[1], w2.shape[1]
        self.backend = backend
        self.config: dict | None = None
        self._link()

    @classmethod
    def from_weights(cls, w13: torch.Tensor, w2: torch.Tensor, *, calib: list[torch.Tensor | None] | None = None,
                     backend: str = "auto", **options) -> "QuantExperts":
        """Quantize stacked expert weights (w13 [E, 2H, D], w2 [E, D, H]) with QuantLinear.from_linear's
        ``options``. For GPTQ, ``calib[e]`` holds the activations routed to expert e ([n, D]); its
        down matrix is calibrated on its own inputs, silu(gate) * up of those activations."""
        gate_up, down = [], []
        for e in range(w13.shape[0]):
            x_e = None if calib is None else calib[e]
            h_e = None
            if x_e is not None:
                with torch.no_grad():
                    g, u = F.linear(x_e.float(), w13[e].float()).chunk(2, dim=-1)
                    h_e = F.silu(g) * u
            gate_up.append(QuantLinear.from_linear(_linear(w13[e]), calib=x_e, **options))
            down.append(QuantLinear.from_linear(_linear(w2[e]), calib=h_e, **options))
        return cls(gate_up, down, backend=backend)

    def stacked(self) -> tuple[StackedQTensor, StackedQTensor]:
        """(gate/up, down) weights of all experts as StackedQTensors over this module's buffers."""
        first_up, first_down = self.gate_up[0], self.down[0]
        return tuple(
            StackedQTensor(getattr(self, f"{prefix}_qweight"), getattr(self, f"{prefix}_scales"),
                           getattr(self, f"{prefix}_zeros"), layer.bits, layer.group_size,
                           (layer.out_features, layer.in_features), layer.sym)
            for prefix, layer in (("w13", first_up), ("w2", first_down))
        )

    def _link(self) -> None:
        """Point every expert's QuantLinear at its slice of the stacked buffers."""
        w13, w2 = self.stacked()
        for e in range(self.num_experts):
            self.gate_up[e].set_qweight(w13.expert(e))
            self.down[e].set_qweight(w2.expert(e))

    def _apply(self, fn, recurse=True):
        # .to() / .half() replace the buffers; the experts' views must follow them.
        out = super()._apply(fn, recurse)
        self._link()
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._link()  # load_state_dict(assign=True) replaces the buffers instead of copying into them

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton" or (self.backend == "auto" and x.is_cuda):
            return quant_moe_experts(x, ids, weights, *self.stacked(), config=self.config)
        check_inputs(x, ids, weights, *self.stacked(), "QuantExperts")
        return expert_loop(x, ids, weights, self.num_experts, self.dim, self._expert)

    def _expert(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up[e](rows).chunk(2, dim=-1)
        return self.down[e](F.silu(gate) * up)

    def extra_repr(self) -> str:
        layer = self.gate_up[0]
        gs = "per-channel" if layer.group_size == -1 else layer.group_size
        return (f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, "
                f"bits={layer.bits}, group_size={gs}, sym={layer.sym}, backend={self.backend}")


def _linear(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight.detach())
    return lin
