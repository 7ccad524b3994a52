"""Balance and specialisation metrics of MoE routing.

- MaxVio of a load vector c (tokens per expert): (max_i c_i - mean c) / mean c. 0 is perfect balance,
  E - 1 is everything on one expert. Per layer from [L, E] counts; a batch's MaxVio_batch is the mean
  over layers (PAPERS.md). MaxVio_global is the same on counts summed over a whole evaluation set.
- AvgMaxVio / SupMaxVio: mean and max of MaxVio_batch over training steps (BIP paper).
- Expert-by-domain load: counts [L, D, E] of token-to-expert assignments by the token's domain.
- Specialisation score: the mutual information I(expert; domain) in bits, per layer, averaged over
  layers: sum_d p(d) KL(p(e|d) || p(e)), where p(e|d) is the domain's load share and p(e) the
  marginal load share. 0 when every domain uses the experts in the same proportions (no
  specialisation), at most min(log2 D, log2 E). Also reported: ``max_share``, the mean over layers
  and domains of the largest share any single expert takes of a domain's assignments.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from dsl.errors import TrainingError


def max_vio(counts: torch.Tensor) -> torch.Tensor:
    """MaxVio along the last (expert) dim: [E] -> scalar, [L, E] -> [L]."""
    c = counts.to(torch.float64)
    mean = c.mean(-1)
    return (c.amax(-1) - mean) / mean.clamp_min(1e-12)


def max_vio_batch(layer_counts: torch.Tensor) -> float:
    """MaxVio_batch: per-layer MaxVio of one batch's [L, E] counts, averaged over layers."""
    if layer_counts.dim() == 1:
        layer_counts = layer_counts[None]
    return float(max_vio(layer_counts).mean())


@dataclasses.dataclass
class MaxVioTracker:
    """Collects MaxVio_batch over training steps; reports AvgMaxVio and SupMaxVio."""

    history: list[float] = dataclasses.field(default_factory=list)
    per_layer_last: list[float] = dataclasses.field(default_factory=list)

    def update(self, layer_counts: torch.Tensor) -> float:
        layer_counts = layer_counts if layer_counts.dim() == 2 else layer_counts[None]
        per_layer = max_vio(layer_counts)
        self.per_layer_last = [float(v) for v in per_layer]
        value = float(per_layer.mean())
        self.history.append(value)
        return value

    @property
    def avg(self) -> float:
        return sum(self.history) / len(self.history) if self.history else math.nan

    @property
    def sup(self) -> float:
        return max(self.history) if self.history else math.nan

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = [float(v) for v in state["history"]]


class DomainLoad:
    """Expert-by-domain load matrix [L, D, E] accumulated over batches (e.g. a held-out pass)."""

    def __init__(self, num_layers: int, num_domains: int, num_experts: int):
        self.counts = torch.zeros(num_layers, num_domains, num_experts, dtype=torch.float64)

    def add(self, layer: int, topk_ids: torch.Tensor, token_domains: torch.Tensor) -> None:
        """``topk_ids`` [T, k]; ``token_domains`` [T] (the domain of each token's sequence)."""
        _, num_domains, num_experts = self.counts.shape
        if token_domains.shape[0] != topk_ids.shape[0]:
            raise TrainingError(f"token_domains has {token_domains.shape[0]} entries for {topk_ids.shape[0]} tokens")
        k = topk_ids.shape[1]
        flat = token_domains.reshape(-1, 1).expand(-1, k).reshape(-1).cpu() * num_experts + topk_ids.reshape(-1).cpu()
        self.counts[layer] += torch.bincount(flat, minlength=num_domains * num_experts).view(
            num_domains, num_experts).to(torch.float64)

    def layer_counts(self) -> torch.Tensor:
        """[L, E]: summed over domains (what MaxVio_global is computed from)."""
        return self.counts.sum(1)

    def max_vio_global(self) -> float:
        return max_vio_batch(self.layer_counts())

    def shares(self) -> torch.Tensor:
        """p(e | d) per layer: [L, D, E], rows summing to 1 (0 rows for unseen domains)."""
        return self.counts / self.counts.sum(-1, keepdim=True).clamp_min(1e-12)

    def specialisation(self) -> dict[str, float]:
        return specialisation(self.counts)


def specialisation(counts: torch.Tensor) -> dict[str, float]:
    """Mutual information I(expert; domain) in bits (mean over layers) and the mean max expert share."""
    c = counts.to(torch.float64)
    if c.dim() == 2:
        c = c[None]
    total = c.sum((1, 2), keepdim=True).clamp_min(1e-12)
    joint = c / total                                     # p(d, e)
    p_d = joint.sum(2, keepdim=True)
    p_e = joint.sum(1, keepdim=True)
    ratio = joint / (p_d * p_e).clamp_min(1e-300)
    terms = torch.where(joint > 0, joint * torch.log2(ratio.clamp_min(1e-300)), torch.zeros_like(joint))
    mi = terms.sum((1, 2))
    seen = c.sum(2) > 0                                   # [L, D]
    shares = c / c.sum(2, keepdim=True).clamp_min(1e-12)
    max_share = (shares.amax(2) * seen).sum() / seen.sum().clamp_min(1)
    return {"mutual_info_bits": float(mi.mean()), "max_share": float(max_share)}
