"""Expert parallelism on 2 gloo ranks equals one process, with and without LLEP, balanced and skewed."""

from __future__ import annotations

import pytest
import torch

from runtime.parallel.expert_parallel import LlepConfig, ep_moe, moe_reference
from runtime.parallel.local import run_local_group

E, K, DIM, HIDDEN, T_PER_RANK, WORLD = 8, 2, 16, 24, 96, 2


def _problem(skew: float | None, seed: int = 0):
    """Full weights, tokens of both ranks, and routing; ``skew`` = share of assignments sent to expert 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(WORLD * T_PER_RANK, DIM, generator=g, dtype=torch.float64)
    w13 = torch.randn(E, 2 * HIDDEN, DIM, generator=g, dtype=torch.float64) / DIM ** 0.5
    w2 = torch.randn(E, DIM, HIDDEN, generator=g, dtype=torch.float64) / HIDDEN ** 0.5
    logits = torch.randn(WORLD * T_PER_RANK, E, generator=g, dtype=torch.float64)
    if skew is not None:
        # expert 0 is every token's first choice with probability 2*skew (k=2 -> skew of all assignments)
        hot = torch.rand(WORLD * T_PER_RANK, generator=g) < 2 * skew
        logits[hot, 0] += 50.0
    weights, ids = torch.softmax(logits, -1).topk(K, -1)
    return x, ids, weights, w13, w2


def _upstream(seed: int = 1):
    """A fixed cotangent for y, so the backward is checked on more than a sum."""
    return torch.randn(WORLD * T_PER_RANK, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _ep_worker(rank, world, cases):
    out = {}
    for name, (skew, use_llep) in cases.items():
        x, ids, weights, w13, w2 = _problem(skew)
        sl = slice(rank * T_PER_RANK, (rank + 1) * T_PER_RANK)
        per = E // world
        x = x[sl].clone().requires_grad_(True)
        weights = weights[sl].clone().requires_grad_(True)
        w13_l = w13[rank * per:(rank + 1) * per].clone().requires_grad_(True)
        w2_l = w2[rank * per:(rank + 1) * per].clone().requires_grad_(True)
        cfg = LlepConfig(alpha=1.0, m=16, lam=1.3) if use_llep else None
        y, stats = ep_moe(x, ids[sl], weights, w13_l, w2_l, num_experts=E, llep=cfg)
        (y * _upstream()[sl]).sum().backward()
        out[name] = {"y": y.detach(), "gx": x.grad, "gw": weights.grad, "g13": w13_l.grad, "g2": w2_l.grad,
                     "plan": stats.plan, "borrowed": stats.weights_received}
    return out


CASES = {"ep_balanced": (None, False), "ep_skew90": (0.9, False),
         "llep_balanced": (None, True), "llep_skew90": (0.9, True), "llep_skew50": (0.5, True)}


@pytest.fixture(scope="module")
def ep_results():
    return run_local_group(_ep_worker, WORLD, CASES)


@pytest.mark.parametrize("case", list(CASES))
def test_ep_equals_single_process(ep_results, case):
    skew, _ = CASES[case]
    x, ids, weights, w13, w2 = _problem(skew)
    x.requires_grad_(True)
    weights.requires_grad_(True)
    w13.requires_grad_(True)
    w2.requires_grad_(True)
    y = moe_reference(x, ids, weights, w13, w2)
    (y * _upstream()).sum().backward()
    per = E // WORLD
    for rank, res in enumerate(ep_results):
        sl = slice(rank * T_PER_RANK, (rank + 1) * T_PER_RANK)
        r = res[case]
        torch.testing.assert_close(r["y"], y.detach()[sl], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r["gx"], x.grad[sl], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r["gw"], weights.grad[sl], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r["g13"], w13.grad[rank * per:(rank + 1) * per], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r["g2"], w2.grad[rank * per:(rank + 1) * per], rtol=1e-12, atol=1e-12)


def test_llep_spills_under_skew_and_keeps_devices_under_cap(ep_results):
    plan = ep_results[0]["llep_skew90"]["plan"]
    assert plan.spilled and plan.transfers
    assert max(plan.device_loads) <= plan.cap
    assert ep_results[1]["llep_skew90"]["borrowed"] >= 1     # rank 1 computed some of expert 0 with a copy
    plain = ep_results[0]["ep_skew90"]["plan"]
    assert not plain.spilled and max(plain.device_loads) > plan.cap
    assert not ep_results[0]["llep_balanced"]["plan"].spilled or max(
        ep_results[0]["llep_balanced"]["plan"].device_loads) <= ep_results[0]["llep_balanced"]["plan"].cap
