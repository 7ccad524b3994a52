import collections

import numpy as np
import pytest

from dsl.errors import ServingError
from runtime.serve.block_manager import BlockManager
from runtime.serve.request import Request, RequestState, SamplingParams
from runtime.serve.scheduler import (
    SCHEDULERS,
    PastFutureScheduler,
    SchedulerConfig,
    get_scheduler,
    peak_future_tokens,
    sample_final_lengths,
)


def req(rid, n_prompt, max_tokens=16):
    return Request(rid, np.arange(n_prompt) + 1000 * len(rid), SamplingParams(max_tokens=max_tokens))


def admit_into(blocks, running, r, now=0.0):
    """Put r into the running batch as if admitted earlier (its prompt fully computed)."""
    blocks.allocate(r)
    r.num_computed_tokens = r.num_tokens
    r.transition(RequestState.RUNNING, now)
    r.append_token(1, now)
    running.append(r)


def one_step(policy, waiting, running, blocks, **cfg):
    sched = get_scheduler(policy, SchedulerConfig(**cfg)) if isinstance(policy, str) else policy
    return sched.schedule(collections.deque(waiting), running, blocks)


def test_registry():
    assert set(SCHEDULERS) == {"aggressive", "conservative", "past-future", "layered-prefill"}
    assert get_scheduler("Past_Future").name == "past-future"
    with pytest.raises(ServingError, match="unknown scheduler 'fifo'.*aggressive"):
        get_scheduler("fifo")


def test_aggressive_admits_up_to_99_percent():
    blocks = BlockManager(100, 1)             # block size 1: tokens = blocks
    running = []
    admit_into(blocks, running, req("old", 59))   # 60 tokens in the cache (59 + 1 output)
    waiting = collections.deque([req("fits", 39), req("next", 1)])
    sched = get_scheduler("aggressive")
    plan = sched.schedule(waiting, running, blocks)
    # 60 + 39 = 99 <= 99 admitted; then 99 + 1 (+1 decode slot) > 99: refused, stays waiting.
    assert [c.request.request_id for c in plan.prefills] == ["fits"]
    assert [r.request_id for r in waiting] == ["next"]


def test_aggressive_refuses_over_99_percent():
    blocks = BlockManager(100, 1)
    running = []
    admit_into(blocks, running, req("old", 59))
    plan = one_step("aggressive", [req("big", 40)], running, blocks)
    assert plan.prefills == []


def test_conservative_reserves_prompt_plus_max_tokens():
    blocks = BlockManager(100, 1)
    running = []
    admit_into(blocks, running, req("old", 10, max_tokens=40))          # reserves 50
    plan = one_step("conservative", [req("ok", 20, max_tokens=30)], running, blocks)   # 50 + 50 = 100
    assert len(plan.prefills) == 1
    blocks2, running2 = BlockManager(100, 1), []
    admit_into(blocks2, running2, req("old", 10, max_tokens=40))
    plan = one_step("conservative", [req("no", 20, max_tokens=31)], running2, blocks2)  # 101 > 100
    assert plan.prefills == []


def test_sample_final_lengths_by_hand():
    hist = np.array([100, 200, 300, 400])
    d, mx = np.array([150]), np.array([1000])
    # candidates: [150, 200, 300, 400, 1000]; u picks a position along 4 intervals
    got = [int(sample_final_lengths(hist, d, mx, np.array([[u]]))[0, 0]) for u in (0.0, 0.5, 0.625, 0.875)]
    assert got == [151, 300, 350, 700]       # u=0 gives d itself, clipped to d + 1
    # nothing recorded above d: between d and max_tokens
    assert int(sample_final_lengths(hist, np.array([450]), mx, np.array([[0.5]]))[0, 0]) == 725
    # never beyond max_tokens even when history holds longer answers
    assert int(sample_final_lengths(hist, np.array([0]), np.array([250]), np.array([[0.99]]))[0, 0]) == 250


def test_peak_future_formula_by_hand():
    # sorted by remaining: (r=50, len=20), (5, 10), (1, 30)
    # j=0: 50*1 + 20 = 70; j=1: 5*2 + 30 = 40; j=2: 1*3 + 60 = 63
    assert peak_future_tokens(np.array([10, 20, 30]), np.array([5, 50, 1])) == 70
    assert peak_future_tokens(np.array([100, 1]), np.array([1, 1])) == 2 + 101   # both alive at the end
    assert peak_future_tokens(np.array([]), np.array([])) == 0


def test_past_future_history_and_samplings():
    pf = PastFutureScheduler()
    assert len(pf.history) == 500 and set(pf.history) == {512} and pf.history.maxlen == 1000
    assert [pf.num_samplings(b) for b in (0, 1, 40, 50, 67, 100, 201)] == [5, 5, 5, 5, 3, 3, 1]
    r = req("done", 4)
    r.output_token_ids = [1] * 77
    pf.on_finished(r)
    assert pf.history[-1] == 77


@pytest.mark.parametrize("capacity,admitted", [(300, True), (288, False)])
def test_past_future_admission_threshold(capacity, admitted):
    pf = PastFutureScheduler()
    pf.history.clear()
    pf.history.extend([100] * 10)            # every draw is 100
    blocks = BlockManager(capacity, 1)
    running = [req("old", 50, max_tokens=500)]
    blocks.allocate(running[0])
    running[0].transition(RequestState.RUNNING, 0.0)
    running[0].num_computed_tokens = 10      # mid-prefill, nothing generated: draws 100
    # batch: (len 50, r 100), candidate (len 30, r 100): need = max(100 + 50, 200 + 80) = 280
    waiting = collections.deque([req("new", 30, max_tokens=500)])
    plan = pf.schedule(waiting, running, blocks)
    assert (len(running) == 2) is admitted   # 280 < 0.97 * capacity ?
    assert any(c.request.request_id == "new" for c in plan.prefills) is admitted


def test_empty_batch_always_takes_its_head():
    pf = PastFutureScheduler()
    blocks = BlockManager(100, 1)
    # alone it needs 60 + 512 sampled tokens > 97, but nothing else runs: admitted anyway
    plan = pf.schedule(collections.deque([req("alone", 60, max_tokens=40)]), [], blocks)
    assert len(plan.prefills) == 1


def test_chunked_prefill_respects_budget_and_decodes_first():
    blocks = BlockManager(100, 4)
    running = []
    admit_into(blocks, running, req("dec", 5))
    waiting = collections.deque([req("long", 20)])
    sched = get_scheduler("aggressive", SchedulerConfig(max_tokens_per_step=8))
    plan = sched.schedule(waiting, running, blocks)
    assert [r.request_id for r in plan.decodes] == ["dec"]
    assert [(c.start, c.num_tokens, c.samples) for c in plan.prefills] == [(0, 7, False)]
    assert plan.num_tokens == 8
    long = running[1]
    long.num_computed_tokens = 7            # what the engine does after the step
    running[0].num_computed_tokens += 1
    running[0].append_token(3, 0.0)
    plan = sched.schedule(waiting, running, blocks)
    assert [(c.start, c.num_tokens) for c in plan.prefills] == [(7, 7)]


def test_preempts_newest_when_decode_needs_memory():
    blocks = BlockManager(3, 2)
    running = []
    a, b = req("a", 1), req("b", 1)
    admit_into(blocks, running, a, now=0.0)     # 2 tokens: one full block
    admit_into(blocks, running, b, now=1.0)
    for r in (a, b):                            # both at a block boundary: each needs a new block
        r.num_computed_tokens = r.num_tokens
        r.append_token(2, 0.0)
    waiting = collections.deque([req("c", 1)])
    plan = get_scheduler("aggressive").schedule(waiting, running, blocks)
    assert [r.request_id for r in plan.decodes] == ["a"]
    assert [r.request_id for r in plan.preempted] == ["b"]
    assert b.state is RequestState.PREEMPTED and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert waiting[0] is b                     # back at the front, before c
    assert not blocks.holds("b")
    blocks.check_invariants()


def test_a_request_preempts_itself_when_alone():
    blocks = BlockManager(1, 2)
    running = []
    a = req("a", 1)
    admit_into(blocks, running, a)
    a.num_computed_tokens = a.num_tokens
    a.append_token(2, 0.0)
    waiting = collections.deque()
    plan = get_scheduler("aggressive").schedule(waiting, running, blocks)
    assert plan.decodes == [] and plan.preempted == [a] and list(waiting) == [a]


def test_max_running_caps_the_batch():
    blocks = BlockManager(1000, 1)
    waiting = collections.deque(req(f"r{i}", 3) for i in range(5))
    running = []
    plan = get_scheduler("aggressive", SchedulerConfig(max_running=2)).schedule(waiting, running, blocks)
    assert len(running) == 2 and len(plan.prefills) == 2 and len(waiting) == 3


def test_layered_prefill_advances_one_group_per_step():
    blocks = BlockManager(1000, 4)
    running = []
    admit_into(blocks, running, req("dec", 3))
    sched = get_scheduler("layered-prefill", SchedulerConfig(num_layer_groups=4, max_tokens_per_step=64))
    waiting = collections.deque([req("p", 40)])
    groups = []
    for _ in range(4):
        plan = sched.schedule(waiting, running, blocks)
        assert [r.request_id for r in plan.decodes] == ["dec"]   # decodes never stall
        (chunk,) = plan.prefills
        assert (chunk.start, chunk.num_tokens, chunk.num_layer_groups) == (0, 40, 4)
        groups.append((chunk.layer_group, chunk.samples))
        # engine bookkeeping
        running[0].num_computed_tokens += 1
        running[0].append_token(1, 0.0)
        if chunk.finishes_forward:
            chunk.request.num_computed_tokens += chunk.num_tokens
            chunk.request.layer_groups_done = 0
        else:
            chunk.request.layer_groups_done += 1
    assert groups == [(0, False), (1, False), (2, False), (3, True)]


def test_layered_prefill_charges_a_group_share_of_the_budget():
    blocks = BlockManager(1000, 4)
    sched = get_scheduler("layered-prefill", SchedulerConfig(num_layer_groups=4, max_tokens_per_step=15))
    waiting = collections.deque([req("a", 40), req("b", 40)])   # each costs ceil(40 / 4) = 10
    plan = sched.schedule(waiting, [], blocks)
    assert [c.request.request_id for c in plan.prefills] == ["a"]
    assert [r.request_id for r in waiting] == ["b"]
