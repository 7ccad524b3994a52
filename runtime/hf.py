"""Drop-in: replace the sparse MoE blocks of a Hugging Face ``transformers`` model with
``runtime.nn.MoE`` (kdsl's compiled routing + grouped GEMM kernels), weights copied, outputs unchanged.

Supported blocks (transformers 5 layout: a ``gate`` router with ``weight [E, dim]``, ``experts`` with
fused ``gate_up_proj [E, 2I, dim]`` (gate rows first) and ``down_proj [E, dim, I]``):

* Mixtral-style (``MixtralSparseMoeBlock`` and blocks built like it): softmax router, top-k,
  weights renormalised over the selected experts.
* Qwen2-MoE-style (``Qwen2MoeSparseMoeBlock``): softmax router, renormalised only when the config's
  ``norm_topk_prob`` is set, plus the shared expert (a dense SwiGLU MLP) scaled per token by
  ``sigmoid(shared_expert_gate(x))`` - reproduced exactly by ``MoE(shared_expert=I_shared,
  shared_gate=True)``.

What differs: Mixtral's training-time router jitter (``router_jitter_noise`` > 0) is not applied;
the router module is kept (sharing its weight with the MoE) only so that transformers' router-logit
recording (``output_router_logits=True``) still sees its output: it runs only when a hook listens.
"""

from __future__ import annotations

import torch
from torch import nn

from dsl.errors import KdslError

from .nn.moe import MoE


class HFMoEBlock(nn.Module):
    """kdsl's MoE in the place of a transformers sparse MoE block: forward(hidden_states) -> same."""

    def __init__(self, moe: MoE, gate: nn.Module | None = None, source: str = ""):
        super().__init__()
        self.moe = moe
        self.gate = gate          # the original router, weight shared with moe.router.weight
        self.source = source

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.gate is not None and (self.gate._forward_hooks or self.gate._forward_pre_hooks):
            self.gate(hidden_states.reshape(-1, hidden_states.shape[-1]))   # feeds router-logit recorders
        return self.moe(hidden_states)

    def extra_repr(self) -> str:
        return f"replaces={self.source}"


def _is_sparse_moe_block(module: nn.Module) -> bool:
    gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    return (gate is not None and experts is not None and isinstance(getattr(gate, "weight", None), torch.Tensor)
            and hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj"))


def convert_block(block: nn.Module, backend: str = "auto") -> HFMoEBlock:
    """An HFMoEBlock with the block's weights (copied; the router weight is shared)."""
    gate, experts = block.gate, block.experts
    act = getattr(experts, "act_fn", None)
    if act is not None and type(act).__name__ not in ("SiLU", "SiLUActivation"):
        raise KdslError(f"{type(block).__name__}: experts use {type(act).__name__}; kdsl's MoE implements SwiGLU "
                        "(silu) experts only")
    if getattr(experts, "has_bias", False) or getattr(experts, "gate_up_proj_bias", None) is not None:
        raise KdslError(f"{type(block).__name__}: experts with biases are not supported")
    w13, w2 = experts.gate_up_proj, experts.down_proj
    num_experts, two_i, dim = w13.shape
    if tuple(w2.shape) != (num_experts, dim, two_i // 2):
        raise KdslError(f"{type(block).__name__}: down_proj has shape {tuple(w2.shape)}, expected "
                        f"{(num_experts, dim, two_i // 2)} (transposed expert layouts are not supported)")
    top_k = getattr(gate, "top_k", None) or block.top_k
    renormalize = bool(getattr(gate, "norm_topk_prob", True))
    shared = getattr(block, "shared_expert", None)
    shared_gate = getattr(block, "shared_expert_gate", None)
    moe = MoE(dim, two_i // 2, num_experts, top_k, router="softmax", renormalize=renormalize,
              shared_expert=shared.gate_proj.out_features if shared is not None else False,
              shared_gate=shared_gate is not None, backend=backend, device=w13.device, dtype=w13.dtype)
    with torch.no_grad():
        moe.w13.copy_(w13)
        moe.w2.copy_(w2)
        if shared is not None:
            moe.shared_expert.gate_proj.weight.copy_(shared.gate_proj.weight)
            moe.shared_expert.up_proj.weight.copy_(shared.up_proj.weight)
            moe.shared_expert.down_proj.weight.copy_(shared.down_proj.weight)
            if shared_gate is not None:
                moe.shared_expert.gate.weight.copy_(shared_gate.weight)
    moe.router.weight = gate.weight
    return HFMoEBlock(moe, gate, type(block).__name__)


def replace_moe_blocks(model: nn.Module, backend: str = "auto") -> int:
    """Swap every sparse MoE block of ``model`` (in place) for kdsl's MoE; returns how many."""
    targets = [(name, module) for name, module in model.named_modules() if name and _is_sparse_moe_block(module)]
    for name, block in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, convert_block(block, backend))
    return len(targets)


__all__ = ["HFMoEBlock", "convert_block", "replace_moe_blocks"]
