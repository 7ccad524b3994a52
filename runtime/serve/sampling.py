"""Token sampling from logits: greedy, temperature, top-p, per-request seeds.

A seeded request draws its token at output position i from a generator seeded by (seed, i), so its
answer does not depend on which other requests share the batch, nor on being preempted and
recomputed: the same seed always gives the same text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dsl.errors import ServingError
from runtime.serve.request import SamplingParams

_POSITION_MIX = 1_000_003   # spreads (seed, position) pairs over distinct generator seeds


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches ``top_p``."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = torch.where(mass_before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum()


def sample_tokens(logits: torch.Tensor, params: Sequence[SamplingParams], positions: Sequence[int],
                  generator: torch.Generator | None = None) -> list[int]:
    """One token per row of ``logits`` [n, vocab]; ``positions[i]`` is the output index being drawn
    for row i (used with a request's seed). Unseeded rows use ``generator`` (or torch's default)."""
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(positions):
        raise ServingError(f"logits {tuple(logits.shape)} must be [n, vocab] with n = {len(params)} params/positions")
    logits = logits.float()
    tokens: list[int] = []
    greedy = torch.argmax(logits, dim=-1).tolist()
    for row, (p, pos) in enumerate(zip(params, positions)):
        if p.greedy:
            tokens.append(int(greedy[row]))
            continue
        probs = _top_p_filter(torch.softmax(logits[row] / p.temperature, dim=-1), p.top_p)
        gen = generator
        if p.seed is not None:
            gen = torch.Generator(device=logits.device)
            gen.manual_seed((p.seed * _POSITION_MIX + pos) % (1 << 63))
        tokens.append(int(torch.multinomial(probs, 1, generator=gen).item()))
    return tokens
