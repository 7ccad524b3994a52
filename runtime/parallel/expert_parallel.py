"""Expert-parallel MoE FFN on torch.distributed: all-to-all dispatch and combine, optionally with LLEP.

Experts are sharded evenly over the ranks of ``group``: rank r holds experts
[r*M, (r+1)*M) as ``w13 [M, 2*hidden, dim]`` (gate rows first, then up) and ``w2 [M, dim, hidden]``.
Each rank routes its own tokens; a forward

1. all-gathers the per-expert token counts of every rank (the global loads),
2. plans where each expert's tokens are computed: the native rank (standard EP) or, with LLEP, also
   helper ranks that receive a copy of the expert's weights (runtime.parallel.llep),
3. sends token rows to the computing ranks (all_to_all_single), computes the experts there with
   ``expert_fn`` (a grouped GEMM: rows sorted by expert plus per-expert counts), sends results back
   and combines them with the gate weights.

Everything is differentiable: the all-to-alls' backward is the reverse all-to-all, so gradients of
tokens return to their source rank and gradients of borrowed weights return to the native rank,
where autograd accumulates them into the local shard.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dsl.errors import TrainingError
from runtime.parallel import llep as llep_mod

ExpertFn = Callable[[torch.Tensor, list[int], torch.Tensor, torch.Tensor], torch.Tensor]


def swiglu_experts(x_sorted: torch.Tensor, counts: list[int], w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Reference grouped SwiGLU FFN: rows of ``x_sorted`` grouped by expert, ``counts[i]`` rows for w13[i]/w2[i].

    The signature of a grouped GEMM kernel, so kdsl's compiled grouped GEMM can replace it.
    """
    hidden = w2.shape[-1]
    outs, start = [], 0
    for i, n in enumerate(counts):
        if n:
            h = x_sorted[start:start + n] @ w13[i].t()
            outs.append((F.silu(h[:, :hidden]) * h[:, hidden:]) @ w2[i].t())
        start += n
    if not outs:
        return x_sorted.new_zeros(0, w2.shape[1])
    return torch.cat(outs)


def moe_reference(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                  w2: torch.Tensor, expert_fn: ExpertFn = swiglu_experts) -> torch.Tensor:
    """Single-process MoE FFN with all experts local: y_t = sum_j w_tj * FFN_{e_tj}(x_t)."""
    num_tokens, k = topk_ids.shape
    flat_e = topk_ids.reshape(-1)
    order = torch.sort(flat_e, stable=True).indices
    tok = order // k
    counts = torch.bincount(flat_e, minlength=w13.shape[0]).tolist()
    y_sorted = expert_fn(x[tok], counts, w13, w2)
    weighted = y_sorted * topk_weights.reshape(-1)[order, None].to(y_sorted.dtype)
    return torch.zeros(num_tokens, w2.shape[1], dtype=y_sorted.dtype, device=x.device).index_add(0, tok, weighted)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single along dim 0 with uneven splits; its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, inp, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = inp.new_empty((sum(out_splits),) + tuple(inp.shape[1:]))
        dist.all_to_all_single(out, inp.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(inp: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    return _AllToAll.apply(inp, list(out_splits), list(in_splits), group)


@dataclasses.dataclass(frozen=True)
class LlepConfig:
    alpha: float = 1.0     # capacity factor: cap = alpha * total tokens / devices
    m: int = 1024          # minimum tokens per spilled chunk
    lam: float = 1.3       # imbalance (max/mean device load) below which plain EP is used


@dataclasses.dataclass
class DispatchStats:
    plan: llep_mod.LlepPlan
    tokens_computed: int          # token-expert rows this rank ran through experts
    weights_received: int         # experts borrowed from other ranks


def _gather_counts(local_counts: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    parts = [torch.empty_like(local_counts) for _ in range(world)]
    dist.all_gather(parts, local_counts, group=group)
    return torch.stack(parts)                               # [P, E]


def _transfer_weights(plan: llep_mod.LlepPlan, rank: int, w13: torch.Tensor, w2: torch.Tensor, group
                      ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Point-to-point copies of experts' weights to their helpers, as one differentiable all-to-all."""
    world, per = plan.num_devices, plan.experts_per_device
    if not plan.transfers:
        return {}
    numel13, numel2 = w13[0].numel(), w2[0].numel()
    each = numel13 + numel2
    outgoing = sorted((t for t in plan.transfers if t.src == rank), key=lambda t: (t.dst, t.expert))
    incoming = sorted((t for t in plan.transfers if t.dst == rank), key=lambda t: (t.src, t.expert))
    pieces = [torch.cat([w13[t.expert - rank * per].reshape(-1), w2[t.expert - rank * per].reshape(-1)])
              for t in outgoing]
    send = torch.cat(pieces) if pieces else w13.new_zeros(0)
    in_splits = [each * sum(1 for t in outgoing if t.dst == d) for d in range(world)]
    out_splits = [each * sum(1 for t in incoming if t.src == s) for s in range(world)]
    recv = all_to_all(send, out_splits, in_splits, group)
    borrowed = {}
    for i, t in enumerate(incoming):
        flat = recv[i * each:(i + 1) * each]
        borrowed[t.expert] = (flat[:numel13].view_as(w13[0]), flat[numel13:].view_as(w2[0]))
    return borrowed


def ep_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13_local: torch.Tensor,
           w2_local: torch.Tensor, *, num_experts: int, group=None, llep: LlepConfig | None = None,
           expert_fn: ExpertFn = swiglu_experts) -> tuple[torch.Tensor, DispatchStats]:
    """Expert-parallel MoE FFN of this rank's tokens ``x [T, dim]``; returns (y [T, dim], stats)."""
    if not dist.is_initialized():
        raise TrainingError("expert parallelism needs torch.distributed initialised (torchrun, or "
                            "runtime.parallel.local.run_local_group)")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    per = w13_local.shape[0]
    if per * world != num_experts:
        raise TrainingError(f"rank {rank} holds {per} experts; {world} ranks x {per} != num_experts={num_experts}")
    num_tokens, k = topk_ids.shape
    flat_e = topk_ids.reshape(-1)
    flat_w = topk_weights.reshape(-1)
    # Collectives run on x's device (gloo: CPU, NCCL: CUDA); planning runs on the host.
    count_matrix = _gather_counts(torch.bincount(flat_e, minlength=num_experts).to(torch.int64), group).cpu()
    local_counts = count_matrix[rank]                                        # [P, E] -> this rank's [E]
    loads = count_matrix.sum(0).tolist()
    if llep is None:
        plan = llep_mod.plain_ep_plan(loads, world)
    else:
        plan = llep_mod.plan(loads, world, alpha=llep.alpha, m=llep.m, lam=llep.lam)

    # This rank's assignments sorted by expert; expert e's occupy [base[e], base[e] + count[e]) and
    # positions offset[e] + j of that expert's global token order.
    order = torch.sort(flat_e, stable=True).indices
    base = [0] + torch.cumsum(local_counts, 0).tolist()
    offset = (torch.cumsum(count_matrix, 0) - count_matrix)[rank].tolist()
    pieces = []                                                              # (dest, expert, lo, hi)
    for e in range(num_experts):
        cnt = int(local_counts[e])
        if not cnt:
            continue
        lo_g, hi_g = offset[e], offset[e] + cnt
        for seg in plan.segments[e]:
            lo, hi = max(lo_g, seg.start), min(hi_g, seg.end)
            if lo < hi:
                pieces.append((seg.device, e, base[e] + lo - lo_g, base[e] + hi - lo_g))
    pieces.sort()
    send_counts = torch.zeros(world, num_experts, dtype=torch.int64)
    idx_parts = []
    for dest, e, lo, hi in pieces:
        send_counts[dest, e] += hi - lo
        idx_parts.append(order[lo:hi])
    send_idx = torch.cat(idx_parts) if idx_parts else order[:0]
    send_tok = send_idx // k

    send_counts = send_counts.to(x.device)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)            # row s: what source s sends
    send_counts, recv_counts = send_counts.cpu(), recv_counts.cpu()
    in_splits = send_counts.sum(1).tolist()
    out_splits = recv_counts.sum(1).tolist()
    recv_x = all_to_all(x[send_tok], out_splits, in_splits, group)

    borrowed = _transfer_weights(plan, rank, w13_local, w2_local, group)
    recv_e = torch.repeat_interleave(torch.arange(num_experts).repeat(world), recv_counts.reshape(-1)).to(x.device)
    group_order = torch.sort(recv_e, stable=True).indices
    per_expert = recv_counts.sum(0)
    present = [e for e in range(num_experts) if per_expert[e] > 0]
    for e in present:
        if e // per != rank and e not in borrowed:
            raise TrainingError(f"rank {rank} received tokens of expert {e} without its weights (plan mismatch)")
    if present:
        w13_used = torch.stack([w13_local[e - rank * per] if e // per == rank else borrowed[e][0] for e in present])
        w2_used = torch.stack([w2_local[e - rank * per] if e // per == rank else borrowed[e][1] for e in present])
        y_sorted = expert_fn(recv_x[group_order], [int(per_expert[e]) for e in present], w13_used, w2_used)
        y_recv = torch.empty_like(y_sorted).index_copy(0, group_order, y_sorted)
    else:
        y_recv = recv_x.new_zeros(0, w2_local.shape[1])
    y_send = all_to_all(y_recv, in_splits, out_splits, group)

    weighted = y_send * flat_w[send_idx, None].to(y_send.dtype)
    y = torch.zeros(num_tokens, w2_local.shape[1], dtype=y_send.dtype, device=x.device).index_add(0, send_tok, weighted)
    return y, DispatchStats(plan, int(per_expert.sum()), len(borrowed))


class ExpertParallelFFN(nn.Module):
    """This rank's shard of an MoE FFN's experts, run with :func:`ep_moe`."""

    def __init__(self, dim: int, hidden: int, num_experts: int, *, group=None, llep: LlepConfig | None = None,
                 expert_fn: ExpertFn = swiglu_experts, dtype=torch.float32):
        super().__init__()
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        if num_experts % world:
            raise TrainingError(f"{num_experts} experts cannot be sharded evenly over {world} expert-parallel ranks")
        per = num_experts // world
        self.num_experts, self.group, self.llep, self.expert_fn = num_experts, group, llep, expert_fn
        self.w13 = nn.Parameter(torch.empty(per, 2 * hidden, dim, dtype=dtype))
        self.w2 = nn.Parameter(torch.empty(per, dim, hidden, dtype=dtype))
        nn.init.normal_(self.w13, std=dim ** -0.5)
        nn.init.normal_(self.w2, std=hidden ** -0.5)
        self.last_stats: DispatchStats | None = None

    @torch.no_grad()
    def load_full(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Copy this rank's slice of full [E, ...] expert weights."""
        rank = dist.get_rank(self.group) if dist.is_initialized() else 0
        per = self.w13.shape[0]
        self.w13.copy_(w13[rank * per:(rank + 1) * per])
        self.w2.copy_(w2[rank * per:(rank + 1) * per])

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        y, self.last_stats = ep_moe(x, topk_ids, topk_weights, self.w13, self.w2, num_experts=self.num_experts,
                                    group=self.group, llep=self.llep, expert_fn=self.expert_fn)
        return y
