"""Load-balancing methods for MoE routers, as functions and as per-layer :class:`Balancer` objects.

An MoE layer computes router logits ``[T, E]`` and asks its balancer to route::

    balancer = make_balancer("global", num_experts=E, top_k=k)
    out = balancer.route(logits, seq_ids=seq_ids, training=self.training)
    # out.topk_ids [T, k], out.topk_weights [T, k] (differentiable), out.loss (scalar), out.counts [E]
    ...
    optimizer.step(); balancer.step()            # once per optimizer step, on every rank

Methods (PAPERS.md, "MoE load balancing"):

- ``none``: plain top-k.
- ``micro``: LBL = N_E * sum_i f_i P_i over the micro-batch.
- ``global``: f from per-expert counts all-reduced over the data-parallel group and accumulated over the
  gradient-accumulation steps since the last optimizer step; P stays local.
- ``seq``: LBL per sequence, averaged over sequences.
- ``aux_free``: a per-expert bias added to the scores for selection only, updated after each optimizer
  step by ``b += u * sign(mean(c) - c)`` on the step's global counts.
- ``bip``: a persistent dual price q per expert, refined by a few p/q iterations per batch; routing
  is the top-k of ``s - q``.

Every method can add a router z-loss (``z_loss_weight``). The per-layer top-k schedule
(progressive sparsification) is :class:`TopKSchedule`; pass its k to ``route(top_k=...)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
import torch.distributed as dist

from dsl.errors import TrainingError

SCORES = ("softmax", "sigmoid")


# ------------------------------------------------------------------------------------ primitives

def _dist_world(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over the process group (identity without one); ``t`` is not part of any autograd graph."""
    if _dist_world(group) > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def router_scores(logits: torch.Tensor, score: str = "softmax") -> torch.Tensor:
    """Per-token expert affinities in fp32 (or fp64 for fp64 logits): softmax over experts or sigmoids."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if score == "softmax":
        return torch.softmax(logits, dim=-1)
    if score == "sigmoid":
        return torch.sigmoid(logits)
    raise TrainingError(f"unknown router score '{score}'; valid: {', '.join(SCORES)}")


def route_topk(logits: torch.Tensor, top_k: int, *, score: str = "softmax", bias: torch.Tensor | None = None,
               normalize: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing. Returns (topk_ids [T,k] int64, topk_weights [T,k] fp32, probs [T,E] fp32).

    ``bias`` (per expert) shifts the selection only; gate weights are the unbiased scores of the
    selected experts, renormalised over them when ``normalize`` (default: for sigmoid scores).
    """
    if logits.dim() != 2:
        raise TrainingError(f"router logits must be [tokens, experts], got shape {tuple(logits.shape)}")
    probs = router_scores(logits, score)
    topk_ids, weights = select_topk(probs, top_k, score=score, bias=bias, normalize=normalize)
    return topk_ids, weights, probs


def select_topk(probs: torch.Tensor, top_k: int, *, score: str = "softmax", bias: torch.Tensor | None = None,
                normalize: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection half of :func:`route_topk`, on scores already computed."""
    num_experts = probs.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise TrainingError(f"top_k={top_k} must be in 1..{num_experts} (the number of experts)")
    select = probs.detach()
    if bias is not None:
        select = select + bias.to(select.dtype)
    topk_ids = torch.topk(select, top_k, dim=-1).indices
    weights = probs.gather(1, topk_ids)
    if normalize if normalize is not None else score == "sigmoid":
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
    return topk_ids, weights


def expert_counts(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Token-to-expert assignments per expert, int64 [E]."""
    return torch.bincount(topk_ids.reshape(-1), minlength=num_experts)


def _normalised(probs: torch.Tensor) -> torch.Tensor:
    # P_i is a share of routing mass; sigmoid scores do not sum to 1 per token, so normalise them.
    return probs / probs.sum(-1, keepdim=True).clamp_min(1e-20)


def lbl_from_counts(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """N_E * sum_i f_i * P_i with f from ``counts`` (no gradient) and P the local mean routing share."""
    num_experts = probs.shape[1]
    counts = counts.to(probs.dtype)
    f = counts / counts.sum().clamp_min(1.0)
    p = _normalised(probs).mean(0)
    return num_experts * torch.dot(f, p)


def micro_lbl(probs: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Micro-batch LBL: f and P both over the tokens of this call."""
    return lbl_from_counts(probs, expert_counts(topk_ids, probs.shape[1]))


def sequence_ids(batch_size: int, seq_len: int, device=None) -> torch.Tensor:
    """The sequence index of each token of a flattened [batch_size, seq_len] batch (for ``seq``)."""
    return torch.arange(batch_size, device=device).repeat_interleave(seq_len)


def sequence_lbl(probs: torch.Tensor, topk_ids: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    """Sequence-wise LBL (DeepSeek-V3): the LBL of each sequence, averaged over sequences."""
    num_tokens, num_experts = probs.shape
    if seq_ids.shape != (num_tokens,):
        raise TrainingError(f"seq_ids must have one entry per token ({num_tokens}), got {tuple(seq_ids.shape)}")
    _, inverse = torch.unique(seq_ids, return_inverse=True)
    num_seqs = int(inverse.max()) + 1
    k = topk_ids.shape[1]
    tokens_per_seq = torch.bincount(inverse, minlength=num_seqs).to(probs.dtype)
    counts = torch.zeros(num_seqs, num_experts, dtype=probs.dtype, device=probs.device)
    counts.index_put_((inverse.repeat_interleave(k), topk_ids.reshape(-1)),
                      torch.ones(num_tokens * k, dtype=probs.dtype, device=probs.device), accumulate=True)
    f = counts / (tokens_per_seq[:, None] * k)
    p = torch.zeros(num_seqs, num_experts, dtype=probs.dtype, device=probs.device)
    p = p.index_add(0, inverse, _normalised(probs)) / tokens_per_seq[:, None]
    return num_experts * (f * p).sum(1).mean()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2; keeps logits small."""
    return torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).square().mean()


def aux_free_update(bias: torch.Tensor, counts: torch.Tensor, rate: float = 1e-3) -> torch.Tensor:
    """DeepSeek's bias rule: b_i += u * sign(mean(c) - c_i); underloaded experts gain, overloaded lose."""
    counts = counts.to(torch.float64)
    return bias + rate * torch.sign(counts.mean() - counts).to(bias.dtype)


def _kth_largest(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """The k-th largest value along ``dim`` (1-based); -inf where the dimension has fewer than k entries."""
    n = x.shape[dim]
    if k > n:
        shape = list(x.shape)
        shape.pop(dim)
        return torch.full(shape, -math.inf, dtype=x.dtype, device=x.device)
    return torch.topk(x, k, dim=dim).values.select(dim, k - 1)


def bip_prices(scores: torch.Tensor, q: torch.Tensor, top_k: int, iterations: int = 4,
               capacity: int | None = None) -> torch.Tensor:
    """Dual prices of the balanced assignment LP, refined from ``q`` by ``iterations`` p/q sweeps.

    p_i = max(0, (k+1)-th largest_j (s_ij - q_j)) is the price of token i's (k+1)-th choice;
    q_j = max(0, (c+1)-th largest_i (s_ij - p_i)) with capacity c = ceil(k n / m) is the lowest price
    at which at most c tokens still prefer expert j. Route by top-k of (s - q).
    """
    n, m = scores.shape
    s = scores.detach().to(torch.float64)
    q = q.to(torch.float64)
    cap = capacity if capacity is not None else math.ceil(top_k * n / m)
    for _ in range(iterations):
        p = _kth_largest(s - q, top_k + 1, dim=1).clamp_min(0.0) if top_k < m else torch.zeros(n, dtype=s.dtype, device=s.device)
        q = _kth_largest(s - p[:, None], cap + 1, dim=0).clamp_min(0.0)
    return q


# --------------------------------------------------------------------------------- per-layer top-k

@dataclasses.dataclass(frozen=True)
class TopKSchedule:
    """Progressive sparsification (Sigma-MoE-Tiny): lower layers start with more active experts.

    Layer l of L starts at ``start_k`` scaled linearly from ``start_k`` (layer 0) down to ``target_k``
    (the last layer), and every layer's k decays linearly to ``target_k`` by ``decay_fraction`` of
    training. The published schedule is not fully specified; this one has the stated shape.
    """

    target_k: int
    num_layers: int
    start_k: int | None = None      # None: no schedule, every layer uses target_k
    decay_fraction: float = 0.5

    def __post_init__(self):
        if self.target_k < 1 or self.num_layers < 1:
            raise TrainingError(f"top-k schedule needs target_k >= 1 and num_layers >= 1, got "
                                f"{self.target_k}, {self.num_layers}")
        if self.start_k is not None and self.start_k < self.target_k:
            raise TrainingError(f"top-k schedule start_k={self.start_k} must be >= target_k={self.target_k}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise TrainingError(f"top-k schedule decay_fraction must be in (0, 1], got {self.decay_fraction}")

    def initial_k(self, layer: int) -> int:
        if self.start_k is None or self.num_layers == 1:
            return self.start_k or self.target_k
        depth = layer / (self.num_layers - 1)
        return self.target_k + round((self.start_k - self.target_k) * (1.0 - depth))

    def __call__(self, layer: int, step: int, total_steps: int) -> int:
        if not 0 <= layer < self.num_layers:
            raise TrainingError(f"layer {layer} out of range for a {self.num_layers}-layer schedule")
        extra = self.initial_k(layer) - self.target_k
        if extra <= 0:
            return self.target_k
        horizon = max(1.0, self.decay_fraction * max(total_steps, 1))
        remaining = max(0.0, 1.0 - step / horizon)
        return self.target_k + math.ceil(extra * remaining)


# --------------------------------------------------------------------------------------- balancers

@dataclasses.dataclass
class RouteOutput:
    topk_ids: torch.Tensor       # [T, k] int64
    topk_weights: torch.Tensor   # [T, k] fp32 (fp64 for fp64 logits), differentiable w.r.t. the logits
    probs: torch.Tensor          # [T, E] fp32 router scores
    loss: torch.Tensor           # scalar: weighted balance loss + z-loss (0 when none)
    counts: torch.Tensor         # [E] int64 local token-to-expert assignments of this call


class Balancer:
    """Routing plus a balancing method for one MoE layer; holds that layer's balancing state.

    ``group`` is the data-parallel process group whose tokens form the global batch (None: the
    default group when torch.distributed is initialised, else this process alone).
    """

    name = "none"
    options: tuple[str, ...] = ()

    def __init__(self, num_experts: int, top_k: int, *, score: str = "softmax", normalize: bool | None = None,
                 z_loss_weight: float = 0.0, group=None):
        if num_experts < 1 or not 1 <= top_k <= num_experts:
            raise TrainingError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
        if score not in SCORES:
            raise TrainingError(f"unknown router score '{score}'; valid: {', '.join(SCORES)}")
        self.num_experts, self.top_k, self.score, self.normalize = num_experts, top_k, score, normalize
        self.z_loss_weight, self.group = z_loss_weight, group
        self.last_counts = torch.zeros(num_experts, dtype=torch.int64)

    # -- hooks for subclasses ------------------------------------------------------------------
    def selection_bias(self, probs: torch.Tensor, k: int, training: bool) -> torch.Tensor | None:
        return None

    def balance_loss(self, probs, topk_ids, counts, seq_ids, training) -> torch.Tensor | None:
        return None

    # -- public ----------------------------------------------------------------------------------
    def route(self, logits: torch.Tensor, *, top_k: int | None = None, seq_ids: torch.Tensor | None = None,
              training: bool = True) -> RouteOutput:
        k = top_k or self.top_k
        if logits.dim() != 2 or logits.shape[1] != self.num_experts:
            raise TrainingError(f"router logits must be [tokens, {self.num_experts}], got {tuple(logits.shape)}")
        probs = router_scores(logits, self.score)
        bias = self.selection_bias(probs, k, training)
        topk_ids, weights = select_topk(probs, k, score=self.score, bias=bias, normalize=self.normalize)
        counts = expert_counts(topk_ids, self.num_experts)
        loss = self.balance_loss(probs, topk_ids, counts, seq_ids, training)
        loss = probs.new_zeros(()) if loss is None else loss
        if self.z_loss_weight:
            loss = loss + self.z_loss_weight * z_loss(logits)
        self.last_counts = counts.detach().cpu()
        return RouteOutput(topk_ids, weights, probs, loss, counts)

    def step(self) -> None:
        """Call once after each optimizer step (on every rank, in the same order)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise TrainingError(f"balancer '{self.name}' state has keys {sorted(state)}, expected {sorted(expected)} "
                                "(was the checkpoint saved with another --balance method?)")
        for key, value in state.items():
            mine = getattr(self, key)
            if tuple(value.shape) != tuple(mine.shape):
                raise TrainingError(f"balancer '{self.name}' state '{key}' has shape {tuple(value.shape)}, "
                                    f"expected {tuple(mine.shape)}")
            setattr(self, key, value.detach().to(mine.dtype).clone())

    def __repr__(self) -> str:
        opts = ", ".join(f"{o}={getattr(self, o)!r}" for o in self.options)
        return f"{type(self).__name__}(E={self.num_experts}, k={self.top_k}, score={self.score}{', ' if opts else ''}{opts})"


class NoBalance(Balancer):
    name = "none"


class MicroLBL(Balancer):
    name = "micro"
    options = ("weight",)

    def __init__(self, num_experts, top_k, *, weight: float = 1e-2, **kw):
        super().__init__(num_experts, top_k, **kw)
        self.weight = weight

    def balance_loss(self, probs, topk_ids, counts, seq_ids, training):
        return self.weight * lbl_from_counts(probs, counts)


class GlobalLBL(Balancer):
    """LBL with f over the global batch: all-reduced counts, accumulated until :meth:`step`.

    At accumulation step j the counts of steps 1..j are used, so the summed gradients over the
    steps and ranks equal those of one process running the concatenated micro-batches. Each
    forward in training mode adds to the buffer, so recomputation (activation checkpointing) must
    use ``training=False`` or it double counts.
    """

    name = "global"
    options = ("weight",)

    def __init__(self, num_experts, top_k, *, weight: float = 1e-2, **kw):
        super().__init__(num_experts, top_k, **kw)
        self.weight = weight
        self.accumulated = torch.zeros(num_experts, dtype=torch.float64)

    def balance_loss(self, probs, topk_ids, counts, seq_ids, training):
        if not training:
            return self.weight * lbl_from_counts(probs, counts)
        global_counts = all_reduce_sum(counts.to(torch.float64), self.group)
        self.accumulated = self.accumulated.to(global_counts.device) + global_counts
        return self.weight * lbl_from_counts(probs, self.accumulated)

    def step(self) -> None:
        self.accumulated = torch.zeros_like(self.accumulated)

    def state_dict(self):
        return {"accumulated": self.accumulated.cpu()}


class SequenceLBL(Balancer):
    name = "seq"
    options = ("weight",)

    def __init__(self, num_experts, top_k, *, weight: float = 1e-2, **kw):
        super().__init__(num_experts, top_k, **kw)
        self.weight = weight

    def balance_loss(self, probs, topk_ids, counts, seq_ids, training):
        if seq_ids is None:
            raise TrainingError("balance method 'seq' needs seq_ids (the sequence of each token) in route()")
        return self.weight * sequence_lbl(probs, topk_ids, seq_ids.to(probs.device))


class AuxFreeBias(Balancer):
    """Auxiliary-loss-free balancing: a selection bias per expert, updated once per optimizer step."""

    name = "aux_free"
    options = ("update_rate", "seq_weight")

    def __init__(self, num_experts, top_k, *, update_rate: float = 1e-3, seq_weight: float = 0.0, **kw):
        super().__init__(num_experts, top_k, **kw)
        self.update_rate, self.seq_weight = update_rate, seq_weight
        self.bias = torch.zeros(num_experts, dtype=torch.float32)
        self.pending = torch.zeros(num_experts, dtype=torch.float64)   # local counts since the last step

    def selection_bias(self, probs, k, training):
        return self.bias.to(probs.device)

    def balance_loss(self, probs, topk_ids, counts, seq_ids, training):
        if training:
            self.pending = self.pending.to(counts.device) + counts.to(torch.float64)
        if self.seq_weight and seq_ids is not None:
            return self.seq_weight * sequence_lbl(probs, topk_ids, seq_ids.to(probs.device))
        return None

    def step(self) -> None:
        counts = all_reduce_sum(self.pending, self.group)
        if counts.sum() > 0:
            self.bias = aux_free_update(self.bias.to(counts.device), counts, self.update_rate).cpu()
        self.pending = torch.zeros_like(self.pending)

    def state_dict(self):
        return {"bias": self.bias.cpu(), "pending": self.pending.cpu()}


class BIPBalancer(Balancer):
    """Balance by integer programming (Sun 2025, reconstructed): route by top-k of (s - q).

    In training, each call refines the layer's price vector q with ``iterations`` p/q sweeps over
    this batch's scores before routing; across data-parallel ranks q is averaged so all ranks keep
    one q (the sweeps themselves see the local tokens).
    """

    name = "bip"
    options = ("iterations",)

    def __init__(self, num_experts, top_k, *, iterations: int = 4, **kw):
        super().__init__(num_experts, top_k, **kw)
        if iterations < 1:
            raise TrainingError(f"bip needs iterations >= 1, got {iterations}")
        self.iterations = iterations
        self.q = torch.zeros(num_experts, dtype=torch.float64)

    def selection_bias(self, probs, k, training):
        if training:
            q = bip_prices(probs.detach(), self.q.to(probs.device), k, self.iterations)
            world = _dist_world(self.group)
            if world > 1:
                q = all_reduce_sum(q, self.group) / world
            self.q = q.cpu()
        return -self.q.to(device=probs.device, dtype=probs.dtype)

    def state_dict(self):
        return {"q": self.q.cpu()}


BALANCERS: dict[str, type[Balancer]] = {cls.name: cls for cls in
                                        (NoBalance, MicroLBL, GlobalLBL, AuxFreeBias, BIPBalancer, SequenceLBL)}


def make_balancer(name: str, num_experts: int, top_k: int, **options) -> Balancer:
    """The balancer for ``name`` (one of BALANCERS); unknown names or options raise TrainingError."""
    cls = BALANCERS.get(name)
    if cls is None:
        raise TrainingError(f"unknown balance method '{name}'; valid: {', '.join(BALANCERS)}")
    allowed = set(cls.options) | {"score", "normalize", "z_loss_weight", "group"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TrainingError(f"balance method '{name}' has no option(s) {', '.join(unknown)}; "
                            f"valid: {', '.join(sorted(allowed))}")
    return cls(num_experts, top_k, **options)
