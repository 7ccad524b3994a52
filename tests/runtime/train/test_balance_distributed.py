"""Global-batch LBL over 2 gloo ranks x 2 accumulation steps equals one process; micro-batch LBL does not."""

from __future__ import annotations

import pytest
import torch

from runtime.parallel.local import run_local_group
from runtime.train.balance import make_balancer

E, K, DIM, TOKENS, WORLD, ACCUM = 8, 2, 12, 40, 2, 2


def _inputs():
    g = torch.Generator().manual_seed(0)
    router = torch.randn(E, DIM, generator=g, dtype=torch.float64)
    # Make the ranks' token distributions differ (as different documents do), so micro != global.
    xs = torch.randn(ACCUM, WORLD, TOKENS, DIM, generator=g, dtype=torch.float64)
    xs[:, 0] += 1.5 * router[0] / router[0].norm()
    xs[:, 1] += 1.5 * router[5] / router[5].norm()
    return router, xs


def _train_step(method: str, micro_batches, router, group_grads=None):
    """One optimizer step's worth of forward/backward over ``micro_batches``; returns (losses, grad, state)."""
    w = router.clone().requires_grad_(True)
    balancer = make_balancer(method, E, K, weight=1.0)
    losses = []
    for x in micro_batches:
        out = balancer.route(x @ w.t())
        (out.loss / len(micro_batches)).backward()
        losses.append(out.loss.detach())
    grad = w.grad if group_grads is None else group_grads(w.grad)
    state = {k: v.clone() for k, v in balancer.state_dict().items()}
    balancer.step()
    return torch.stack(losses), grad, state, balancer.state_dict()


def _rank_worker(rank, world, methods):
    import torch.distributed as dist

    router, xs = _inputs()

    def average(grad):
        dist.all_reduce(grad)
        return grad / world

    out = {}
    for method in methods:
        losses, grad, before, after = _train_step(method, [xs[k, rank] for k in range(ACCUM)], router, average)
        rank_losses = losses.clone()
        dist.all_reduce(losses)
        out[method] = {"loss": losses / world, "rank_loss": rank_losses, "grad": grad, "before": before,
                       "after": after}
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_local_group(_rank_worker, WORLD, ["global", "micro"])


def _single(method):
    router, xs = _inputs()
    return _train_step(method, [xs[k].reshape(WORLD * TOKENS, DIM) for k in range(ACCUM)], router)


def test_global_lbl_matches_one_process_over_concatenated_batch(ranks):
    losses, grad, before, _ = _single("global")
    for res in ranks:
        torch.testing.assert_close(res["global"]["loss"], losses, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res["global"]["grad"], grad, rtol=1e-12, atol=1e-12)
        # the accumulation buffer holds the global counts of both steps: T*k assignments per step and rank
        assert res["global"]["before"]["accumulated"].sum().item() == ACCUM * WORLD * TOKENS * K
        torch.testing.assert_close(res["global"]["before"]["accumulated"], before["accumulated"])
        assert res["global"]["after"]["accumulated"].abs().sum().item() == 0   # reset by step()
    # the ranks computed different local losses, yet their mean is the single-process loss
    assert not torch.allclose(ranks[0]["global"]["rank_loss"], ranks[1]["global"]["rank_loss"])


def test_micro_lbl_does_not_match_one_process(ranks):
    losses, grad, _, _ = _single("micro")
    res = ranks[0]["micro"]
    assert not torch.allclose(res["loss"], losses, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(res["grad"], grad, rtol=1e-6, atol=1e-9)
    # micro-batch LBL sees each rank's skew on its own, so it penalises more than the global loss
    assert (res["loss"] > losses).all()
