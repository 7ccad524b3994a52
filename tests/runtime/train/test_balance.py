"""Routing, the balancing methods and their state, the top-k schedule."""

from __future__ import annotations

import pytest
import torch

from dsl.errors import TrainingError
from runtime.train import balance as B
from runtime.train.metrics import max_vio


def _skewed_logits(n=512, e=8, seed=0, hot=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, e, generator=g) + torch.tensor([hot, 1.0] + [0.0] * (e - 2))


def test_route_topk_bias_changes_selection_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], requires_grad=True)
    bias = torch.tensor([-10.0, 0.0, 0.0, 5.0])
    ids, w, probs = B.route_topk(logits, 2, score="softmax", bias=bias)
    assert set(ids[0].tolist()) == {1, 3}
    torch.testing.assert_close(w[0], probs[0, ids[0]])          # unbiased, not renormalised for softmax
    w.sum().backward()
    assert logits.grad.abs().sum() > 0


def test_route_topk_sigmoid_renormalises_over_selected():
    logits = torch.tensor([[0.5, -0.2, 1.5, 0.1]])
    ids, w, probs = B.route_topk(logits, 2, score="sigmoid", bias=torch.tensor([0.0, 0.0, -3.0, 0.0]))
    assert set(ids[0].tolist()) == {0, 3}
    torch.testing.assert_close(w.sum(-1), torch.ones(1))
    torch.testing.assert_close(w[0] / w[0].sum(), probs[0, ids[0]] / probs[0, ids[0]].sum())


def test_lbl_is_one_at_uniform_and_larger_when_skewed():
    e, k = 4, 1
    probs = torch.full((8, e), 0.25)
    ids = torch.arange(8).remainder(e)[:, None]
    assert B.micro_lbl(probs, ids).item() == pytest.approx(1.0)
    skew = torch.softmax(_skewed_logits(256, e), -1)
    assert B.micro_lbl(skew, skew.topk(k).indices).item() > 1.5


def test_sequence_lbl_averages_per_sequence_losses():
    probs = torch.softmax(_skewed_logits(64, 8), -1)
    ids = probs.topk(2).indices
    seq = torch.arange(64) // 16
    expected = torch.stack([B.micro_lbl(probs[seq == s], ids[seq == s]) for s in range(4)]).mean()
    torch.testing.assert_close(B.sequence_lbl(probs, ids, seq), expected)
    bal = B.make_balancer("seq", 8, 2, weight=1.0)
    with pytest.raises(TrainingError, match="seq_ids"):
        bal.route(torch.log(probs))
    torch.testing.assert_close(bal.route(torch.log(probs), seq_ids=seq).loss, expected)


def test_z_loss_added_with_its_weight():
    logits = _skewed_logits(32, 4)
    out = B.make_balancer("none", 4, 1, z_loss_weight=0.5).route(logits)
    torch.testing.assert_close(out.loss, 0.5 * torch.logsumexp(logits, -1).square().mean())
    assert B.make_balancer("none", 4, 1).route(logits).loss.item() == 0.0


def test_aux_free_update_moves_bias_against_load():
    bias = torch.zeros(4)
    new = B.aux_free_update(bias, torch.tensor([10, 4, 3, 3]), rate=1e-3)
    assert new.tolist() == pytest.approx([-1e-3, 1e-3, 1e-3, 1e-3])
    bal = B.make_balancer("aux_free", 8, 2, update_rate=0.05)
    logits = _skewed_logits()
    first = max_vio(bal.route(logits).counts).item()
    for _ in range(40):
        bal.route(logits)
        bal.step()
    assert bal.bias[0] < 0 and bal.bias[0] == bal.bias.min()       # the hot expert is pushed down
    assert max_vio(bal.route(logits, training=False).counts).item() < first / 3
    assert bal.route(logits).loss.item() == 0.0                     # no auxiliary loss by default


def test_bip_balances_skewed_scores_within_a_few_iterations():
    logits = _skewed_logits(512, 8, hot=3.0)
    plain = max_vio(B.route_topk(logits, 2)[0].flatten().bincount(minlength=8)).item()
    bal = B.make_balancer("bip", 8, 2, iterations=4)
    out = bal.route(logits)
    balanced = max_vio(out.counts).item()
    assert plain > 2.0 and balanced < 0.1
    assert bal.q[0] == bal.q.max() and bal.q[0] > 0                 # the hot expert gets the highest price
    torch.testing.assert_close(out.topk_weights, out.probs.gather(1, out.topk_ids))   # gates from s


def test_state_dict_round_trip_and_mismatch():
    bal = B.make_balancer("aux_free", 8, 2, update_rate=0.1)
    bal.route(_skewed_logits())
    bal.step()
    other = B.make_balancer("aux_free", 8, 2)
    other.load_state_dict(bal.state_dict())
    torch.testing.assert_close(other.bias, bal.bias)
    with pytest.raises(TrainingError, match="keys"):
        B.make_balancer("bip", 8, 2).load_state_dict(bal.state_dict())
    with pytest.raises(TrainingError, match="shape"):
        B.make_balancer("aux_free", 4, 2).load_state_dict(bal.state_dict())


def test_unknown_method_and_option_are_clear_errors():
    with pytest.raises(TrainingError, match="valid: none, micro, global, aux_free, bip, seq"):
        B.make_balancer("switch", 8, 2)
    with pytest.raises(TrainingError, match="no option"):
        B.make_balancer("micro", 8, 2, update_rate=1.0)
    with pytest.raises(TrainingError, match="top_k"):
        B.make_balancer("micro", 4, 5)


def test_global_balancer_accumulates_until_step_without_a_process_group():
    bal = B.make_balancer("global", 8, 2, weight=1.0)
    a, b = _skewed_logits(64, seed=1), _skewed_logits(64, seed=2)
    bal.route(a)
    out = bal.route(b)
    both = torch.cat([a, b])
    counts = B.route_topk(both, 2)[0].flatten().bincount(minlength=8)
    torch.testing.assert_close(out.loss, B.lbl_from_counts(torch.softmax(b, -1), counts).float())
    bal.step()
    assert bal.accumulated.sum() == 0


def test_topk_schedule_lower_layers_start_denser_and_reach_target():
    sched = B.TopKSchedule(target_k=1, num_layers=4, start_k=4, decay_fraction=0.5)
    assert [sched(layer, 0, 100) for layer in range(4)] == [4, 3, 2, 1]
    assert all(sched(layer, 50, 100) == 1 for layer in range(4))
    ks = [sched(0, step, 100) for step in range(0, 60, 5)]
    assert ks == sorted(ks, reverse=True)
    assert B.TopKSchedule(2, 3)(1, 0, 10) == 2
    with pytest.raises(TrainingError):
        B.TopKSchedule(target_k=4, num_layers=2, start_k=2)
