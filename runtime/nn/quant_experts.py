"""Quantized routed experts for ``runtime.nn.MoE`` (inference).

Each expert's gate/up matrix (``w13[e]``, [2*hidden, dim]) and down matrix (``w2[e]``, [dim, hidden])
becomes a :class:`QuantLinear` with the options of ``QuantLinear.from_linear`` (bits, group size,
RTN or GPTQ, sym/asym). Tokens are sorted by expert once; every expert that received tokens runs its
two quantized GEMMs on its rows, so on a GPU each GEMM is the quant_gemm kernel with dequantization in
its K loop (split-K for the few rows a decode step gives an expert), and the packed weights are all
that is kept in memory. The weighted sum over a token's k experts is accumulated in fp32 in a fixed
order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsl.errors import DSLError

from .quant_linear import QuantLinear


class QuantExperts(nn.Module):
    """``num_experts`` SwiGLU experts with quantized weights; call as ``(x [T, dim], ids [T, k],
    weights [T, k]) -> y [T, dim]``."""

    def __init__(self, gate_up: list[QuantLinear], down: list[QuantLinear]):
        super().__init__()
        if len(gate_up) != len(down) or not gate_up:
            raise DSLError("QuantExperts needs one gate/up and one down layer per expert")
        self.gate_up = nn.ModuleList(gate_up)
        self.down = nn.ModuleList(down)
        self.num_experts = len(gate_up)
        self.hidden = gate_up[0].out_features // 2

    @classmethod
    def from_weights(cls, w13: torch.Tensor, w2: torch.Tensor, *,
                     calib: list[torch.Tensor | None] | None = None, **options) -> "QuantExperts":
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
        return cls(gate_up, down)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        tokens, k = ids.shape
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        rows = order // k                           # the token of each sorted (token, slot) pair
        out = torch.zeros(tokens * k, x.shape[-1], dtype=torch.float32, device=x.device)
        start = 0
        for e, n in enumerate(counts):
            if n:
                pick = order[start:start + n]
                gate, up = self.gate_up[e](x[rows[start:start + n]]).chunk(2, dim=-1)
                out[pick] = self.down[e](F.silu(gate) * up).float()
            start += n
        out = out.view(tokens, k, x.shape[-1]) * weights.to(torch.float32).unsqueeze(-1)
        return out.sum(dim=1).to(x.dtype)


def _linear(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight.detach())
    return lin
