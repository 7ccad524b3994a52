"""``runtime.nn.MoE``: a routed SwiGLU mixture-of-experts layer on kdsl's compiled MoE op, with the
load-balancing methods of runtime.train.balance, an optional shared expert and an expert-parallel
interface.

Parameters (DESIGN.md): ``router.weight [E, dim]``, ``w13 [E, 2*hidden, dim]`` (gate rows first,
then up), ``w2 [E, dim, hidden]``. After a forward: ``balance_loss`` (a scalar tensor, 0 for methods
without a loss) and ``last_load`` (tokens routed to each expert, int64 [E]).

Expert parallelism: ``local_experts`` names the (global) experts whose weights this module holds
(all of them by default). ``set_expert_parallel(hook, local_experts)`` installs the dispatch/combine
hook that training code fills with its all-to-all: ``hook(x [T, dim], ids [T, k] (global, int64),
weights [T, k], w13_local, w2_local) -> y [T, dim]``; ``use_expert_parallel(group, llep)`` installs
runtime.parallel.expert_parallel's all-to-all (and LLEP) with kdsl's grouped GEMMs as the expert
function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import dsl
from dsl.errors import DSLError

from ..ops import moe_ops
from ..ops.moe_ops import compiled

T = dsl.Tensor
BALANCE_METHODS = ("none", "micro", "global", "aux_free", "bip", "seq")

ExpertParallelHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dsl.op
def shared_swiglu_op(x: T["T", "D"], w_gate: T["H", "D"], w_up: T["H", "D"], w_down: T["D", "H"]):
    # silu fuses into the first GEMM's epilogue, the product into the second's.
    return (dsl.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


@dsl.op
def shared_swiglu_gated_op(x: T["T", "D"], w_gate: T["H", "D"], w_up: T["H", "D"], w_down: T["D", "H"],
                           w_score: T[1, "D"]):
    # Qwen2-MoE's shared expert: its output scaled by sigmoid(x . w_score) per token.
    return dsl.sigmoid(x @ w_score.T) * ((dsl.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T)


class SharedExpert(nn.Module):
    """A dense SwiGLU FFN that every token passes through, optionally gated per token."""

    def __init__(self, dim: int, hidden: int, *, gated: bool = False, backend: str = "auto", **factory):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False, **factory)
        self.up_proj = nn.Linear(dim, hidden, bias=False, **factory)
        self.down_proj = nn.Linear(hidden, dim, bias=False, **factory)
        self.gate = nn.Linear(dim, 1, bias=False, **factory) if gated else None
        self.backend = backend

    def forward(self, x2: torch.Tensor) -> torch.Tensor:
        w = (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
        if self.gate is None:
            return compiled(shared_swiglu_op, self.backend)(x2, *w)
        return compiled(shared_swiglu_gated_op, self.backend)(x2, *w, self.gate.weight)


class MoE(nn.Module):
    """Routed SwiGLU experts: y = sum over the top-k experts of gate weight * FFN_e(x) (+ shared).

    router: "softmax" or "sigmoid" scores. balance: "none" | "micro" | "global" | "aux_free" | "bip" |
    "seq" (runtime.train.balance; options through ``balance_options``, e.g. {"weight": 1e-2}).
    renormalize: divide the selected gate weights by their sum (Mixtral, DeepSeek-V3: yes;
    Qwen2-MoE: no). n_groups/topk_groups/group_score: grouped top-k (dsl.moe.route).
    shared_expert: False, True (hidden size = ``hidden``) or an int hidden size; shared_gate adds
    the per-token sigmoid gate of Qwen2-MoE's shared expert.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, *, router: str = "softmax",
                 balance: str = "none", shared_expert: bool | int = False, shared_gate: bool = False,
                 n_groups: int = 1, topk_groups: int = 1, group_score: str = "max", renormalize: bool = True,
                 backend: str = "auto", balance_options: dict | None = None, device=None, dtype=None):
        super().__init__()
        if router not in ("softmax", "sigmoid"):
            raise DSLError(f"MoE router must be 'softmax' or 'sigmoid', got {router!r}")
        if balance not in BALANCE_METHODS:
            raise DSLError(f"MoE balance must be one of {', '.join(BALANCE_METHODS)}, got {balance!r}")
        if not 1 <= top_k <= num_experts:
            raise DSLError(f"MoE top_k must be in 1..{num_experts} (the number of experts), got {top_k}")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.hidden, self.num_experts, self.top_k = dim, hidden, num_experts, top_k
        self.router_kind, self.renormalize, self.backend = router, renormalize, backend
        self.n_groups, self.topk_groups, self.group_score = n_groups, topk_groups, group_score
        self.router = nn.Linear(dim, num_experts, bias=False, **factory)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim, **factory))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden, **factory))
        with torch.no_grad():
            self.w13.normal_(std=dim ** -0.5)
            self.w2.normal_(std=hidden ** -0.5)
        if shared_expert:
            shared_hidden = hidden if shared_expert is True else int(shared_expert)
            self.shared_expert = SharedExpert(dim, shared_hidden, gated=shared_gate, backend=backend, **factory)
        else:
            self.shared_expert = None
        from ..train.balance import Balancer, make_balancer

        self.balance_method = balance
        self.balancer = make_balancer(balance, num_experts, top_k, score=router, normalize=renormalize,
                                      **(balance_options or {}))
        self._needs_bias = type(self.balancer).selection_bias is not Balancer.selection_bias
        self.balance_loss = torch.zeros(())
        self.last_load = torch.zeros(num_experts, dtype=torch.int64)
        self.local_experts = range(num_experts)
        self.expert_parallel: ExpertParallelHook | None = None
        self.quantized_experts = None      # QuantExperts after quantize_experts()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden={self.hidden}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"router={self.router_kind}, balance={self.balance_method}, backend={self.backend}")

    # -- expert parallelism ----------------------------------------------------------------------
    def set_expert_parallel(self, hook: ExpertParallelHook | None, local_experts: range | None = None) -> None:
        """Install (or with None remove) the dispatch/combine hook. ``local_experts``: the global
        expert ids whose weights ``w13``/``w2`` hold, in order (they must have that many rows)."""
        local = local_experts if local_experts is not None else range(self.num_experts)
        if hook is not None and self.w13.shape[0] != len(local):
            raise DSLError(f"MoE holds {self.w13.shape[0]} experts' weights but local_experts has {len(local)}; "
                           "shard w13/w2 first (use_expert_parallel does)")
        self.expert_parallel, self.local_experts = hook, local

    def use_expert_parallel(self, group=None, llep=None) -> None:
        """Shard the experts evenly over ``group`` (torch.distributed) and route tokens with
        runtime.parallel.expert_parallel's all-to-all (LLEP when ``llep`` is an LlepConfig)."""
        import torch.distributed as dist

        from ..parallel.expert_parallel import ep_moe

        world = dist.get_world_size(group) if dist.is_initialized() else 1
        rank = dist.get_rank(group) if dist.is_initialized() else 0
        if self.num_experts % world:
            raise DSLError(f"{self.num_experts} experts do not shard evenly over {world} ranks")
        per = self.num_experts // world
        local = range(rank * per, (rank + 1) * per)
        with torch.no_grad():
            self.w13 = nn.Parameter(self.w13[local.start:local.stop].clone())
            self.w2 = nn.Parameter(self.w2[local.start:local.stop].clone())
        expert_fn = moe_ops.grouped_swiglu_expert_fn(self.backend)
        num_experts = self.num_experts

        def hook(x, ids, weights, w13, w2):
            return ep_moe(x, ids, weights, w13, w2, num_experts=num_experts, group=group, llep=llep,
                          expert_fn=expert_fn)[0]

        self.set_expert_parallel(hook, local)

    # -- quantized experts (inference) --------------------------------------------------------------
    @torch.no_grad()
    def quantize_experts(self, bits: int = 4, group_size: int = 128, method: str = "rtn", sym: bool = True,
                         calib: torch.Tensor | None = None, **options) -> None:
        """Replace ``w13``/``w2`` by packed quantized experts (runtime.nn.quant_experts.QuantExperts),
        with QuantLinear.from_linear's options. GPTQ (``method="gptq"``) needs ``calib``, this layer's
        input activations [..., dim]: each expert is calibrated on the tokens the router sends it
        (all of them when it gets fewer than 16). Inference only: the float weights are dropped."""
        from .quant_experts import QuantExperts

        if self.expert_parallel is not None:
            raise DSLError("quantize_experts: the experts are sharded for expert parallelism; quantize "
                           "before calling use_expert_parallel")
        if self.quantized_experts is not None:
            raise DSLError("quantize_experts: the experts are already quantized")
        per_expert = None
        if method == "gptq":
            if calib is None:
                raise DSLError("quantize_experts(method='gptq') needs calib, activations [..., dim]")
            x2 = calib.reshape(-1, self.dim)
            _, ids = moe_ops.route(x2 @ self.router.weight.T, self.top_k, backend=self.backend,
                                   **self._statics())
            ids = ids.long()
            per_expert = []
            for e in range(self.num_experts):
                rows = (ids == e).any(dim=-1)
                per_expert.append(x2[rows] if int(rows.sum()) >= 16 else x2)
        self.quantized_experts = QuantExperts.from_weights(self.w13, self.w2, calib=per_expert, bits=bits,
                                                           group_size=group_size, method=method, sym=sym,
                                                           backend=self.backend, **options)
        self.w13 = None
        self.w2 = None

    # -- forward ---------------------------------------------------------------------------------
    def _statics(self):
        return dict(router=self.router_kind, renormalize=self.renormalize, n_groups=self.n_groups,
                    topk_groups=self.topk_groups, group_score=self.group_score)

    def forward(self, x: torch.Tensor, *, top_k: int | None = None) -> torch.Tensor:
        """y of x's shape ([..., dim]); ``top_k`` overrides the layer's k (per-layer schedules)."""
        from ..train.balance import expert_counts, router_scores, z_loss

        if x.shape[-1] != self.dim:
            raise DSLError(f"MoE expects inputs [..., {self.dim}], got {tuple(x.shape)}")
        k = top_k or self.top_k
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.dim)
        bias = None
        if self._needs_bias:
            with torch.no_grad():
                probs0 = router_scores(x2 @ self.router.weight.T, self.router_kind)
            bias = self.balancer.selection_bias(probs0, k, self.training)
            bias = None if bias is None else bias.to(device=x.device, dtype=torch.float32).contiguous()
        if self.quantized_experts is not None:
            if torch.is_grad_enabled() and self.training:
                raise DSLError("MoE with quantized experts is for inference: call model.eval() or run "
                               "under torch.no_grad()")
            logits = x2 @ self.router.weight.T
            weights, ids = moe_ops.route(logits, k, bias=bias, backend=self.backend, **self._statics())
            y = self.quantized_experts(x2, ids.long(), weights)
        elif self.expert_parallel is None:
            y, logits, ids = moe_ops.moe(x2, self.router.weight, self.w13, self.w2, k, bias=bias,
                                         backend=self.backend, return_routing=True, **self._statics())
        else:
            logits = x2 @ self.router.weight.T
            weights, ids = moe_ops.route(logits, k, bias=bias, backend=self.backend, **self._statics())
            y = self.expert_parallel(x2, ids.long(), weights, self.w13, self.w2)
        counts = expert_counts(ids.long(), self.num_experts)
        probs = router_scores(logits, self.router_kind)
        seq_ids = None
        if x.dim() >= 3:   # [..., S, dim]: every run of S tokens is one sequence
            seq_ids = torch.arange(x2.shape[0] // x.shape[-2], device=x.device).repeat_interleave(x.shape[-2])
        loss = self.balancer.balance_loss(probs, ids.long(), counts, seq_ids, self.training)
        loss = probs.new_zeros(()) if loss is None else loss
        if self.balancer.z_loss_weight:
            loss = loss + self.balancer.z_loss_weight * z_loss(logits)
        self.balancer.last_counts = counts.detach().cpu()
        self.balance_loss = loss
        self.last_load = counts.detach()
        if self.shared_expert is not None:
            y = y + self.shared_expert(x2)
        return y.reshape(*lead, self.dim)

    def step(self) -> None:
        """After each optimizer step: update the balancer's state (aux-free bias, global counts)."""
        self.balancer.step()

    def max_violation(self) -> float:
        """MaxVio of the last forward: (max load - mean load) / mean load."""
        load = self.last_load.float()
        mean = load.mean().item()
        return (load.max().item() - mean) / mean if mean > 0 else 0.0


__all__ = ["MoE", "SharedExpert", "BALANCE_METHODS", "shared_swiglu_op", "shared_swiglu_gated_op"]
