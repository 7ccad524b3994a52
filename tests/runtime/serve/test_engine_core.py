import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsl.errors import ServingError
from runtime.serve.block_manager import BlockManager
from runtime.serve.engine_core import EngineCore, FinishEvent, TokenEvent
from runtime.serve.request import SLO, Request, RequestState, SamplingParams
from runtime.serve.scheduler import SchedulerConfig, get_scheduler

STOP = 0


def expected_token(prompt: np.ndarray, position: int, length: int) -> int:
    """The fake model: a token that depends only on the prompt and the output position."""
    if position + 1 >= length:
        return STOP
    return 1 + (int(prompt.sum()) * 31 + position * 17) % 97


class FakeExecutor:
    """Deterministic 'model' that also checks every plan it gets against the engine's bookkeeping."""

    def __init__(self, blocks: BlockManager, lengths: dict[str, int]):
        self.blocks, self.lengths = blocks, lengths
        self.steps = 0

    def execute(self, plan):
        self.steps += 1
        bs = self.blocks.block_size
        for r in plan.decodes:
            assert r.state is RequestState.RUNNING and r.num_uncomputed_tokens == 1
            assert len(self.blocks.block_table(r.request_id)) * bs >= r.num_tokens
        for c in plan.prefills:
            r = c.request
            assert r.state is RequestState.RUNNING
            assert c.start == r.num_computed_tokens and 0 < c.num_tokens <= r.num_uncomputed_tokens
            assert len(self.blocks.block_table(r.request_id)) * bs >= c.start + c.num_tokens
        ids = [r.request_id for r in plan.sampling_requests()]
        assert len(ids) == len(set(ids))
        out = {r.request_id: expected_token(r.prompt_token_ids, r.num_output_tokens, self.lengths[r.request_id])
               for r in plan.sampling_requests()}
        return out, 0.01


def make_engine(policy, num_blocks, block_size, lengths, **cfg):
    blocks = BlockManager(num_blocks, block_size)
    executor = FakeExecutor(blocks, lengths)
    engine = EngineCore(get_scheduler(policy, SchedulerConfig(**cfg)), blocks, executor)
    return engine, blocks, executor


def reference_output(prompt, length, max_tokens):
    n = min(length, max_tokens)
    return [expected_token(np.asarray(prompt), i, length) for i in range(n)]


def test_single_request_runs_to_its_stop_token():
    engine, blocks, _ = make_engine("aggressive", 16, 4, {"a": 5})
    prompt = list(range(10))
    engine.add_request(Request("a", prompt, SamplingParams(max_tokens=20, stop_token_ids=(STOP,))))
    events = []
    while engine.has_unfinished:
        events += engine.step().events
    tokens = [e.token_id for e in events if isinstance(e, TokenEvent)]
    assert tokens == reference_output(prompt, 5, 20)
    assert [e.reason for e in events if isinstance(e, FinishEvent)] == ["stop"]
    assert blocks.num_free == 16


def test_max_tokens_finishes_with_length():
    engine, _, _ = make_engine("aggressive", 16, 4, {"a": 50})
    r = Request("a", [1, 2, 3], SamplingParams(max_tokens=4, stop_token_ids=(STOP,)))
    engine.add_request(r)
    while engine.has_unfinished:
        engine.step()
    assert r.finish_reason == "length" and r.num_output_tokens == 4 and r.state is RequestState.FINISHED
    assert len(r.token_times) == 4 and r.first_token_time == r.token_times[0] > r.arrival_time


def test_add_request_validation():
    engine, _, _ = make_engine("aggressive", 4, 4, {})
    engine.add_request(Request("a", [1], SamplingParams(max_tokens=2)))
    with pytest.raises(ServingError, match="already"):
        engine.add_request(Request("a", [1], SamplingParams(max_tokens=2)))
    with pytest.raises(ServingError, match="exceeds the context limit of 16"):
        engine.add_request(Request("b", list(range(10)), SamplingParams(max_tokens=7)))


def test_cancel_returns_blocks_to_idle():
    lengths = {f"r{i}": 30 for i in range(3)}
    engine, blocks, _ = make_engine("aggressive", 64, 4, lengths)
    idle = blocks.num_free
    reqs = [Request(f"r{i}", list(range(i, i + 9)), SamplingParams(max_tokens=30, stop_token_ids=(STOP,)))
            for i in range(3)]
    for r in reqs:
        engine.add_request(r)
    for _ in range(4):
        engine.step()
    assert blocks.num_free < idle
    assert engine.cancel("r1") and not engine.cancel("r1") and not engine.cancel("nope")
    assert reqs[1].state is RequestState.CANCELLED and reqs[1].finish_reason == "cancelled"
    assert engine.cancel("r0") and engine.cancel("r2")
    assert blocks.num_free == idle and not engine.has_unfinished
    blocks.check_invariants()


def test_abort_missed_drops_late_requests_and_frees_their_blocks():
    # Each step takes 0.01 s. With a 16-token budget and 12-token prompts one request prefills per
    # step, so under a TTFT limit of 0.025 s the fourth request in the queue can no longer make it.
    lengths = {f"r{i}": 6 for i in range(6)}
    blocks = BlockManager(64, 4)
    engine = EngineCore(get_scheduler("aggressive", SchedulerConfig(max_tokens_per_step=16)), blocks,
                        FakeExecutor(blocks, lengths), abort_missed=SLO(ttft_s=0.025, max_gap_s=1.0))
    seen = []
    engine.on_finish.append(lambda r: seen.append((r.request_id, r.finish_reason)))
    reqs = [Request(f"r{i}", list(range(i, i + 12)), SamplingParams(max_tokens=6, stop_token_ids=(STOP,)))
            for i in range(6)]
    for r in reqs:
        engine.add_request(r)
    events = []
    while engine.has_unfinished:
        events += engine.step().events
        blocks.check_invariants()
    slo = {e.request_id for e in events if isinstance(e, FinishEvent) and e.reason == "slo"}
    assert slo and len(slo) < 6 and engine.num_slo_aborts == len(slo)
    for r in reqs:
        if r.request_id in slo:    # dropped before its first token: it holds nothing
            assert r.state is RequestState.CANCELLED and r.finish_reason == "slo" and not r.output_token_ids
        else:                      # the rest ran to their end, unchanged
            assert r.output_token_ids == reference_output(r.prompt_token_ids, 6, 6)
    assert sorted(seen) == sorted((r.request_id, r.finish_reason) for r in reqs)
    assert blocks.num_free == blocks.num_blocks


def test_abort_missed_drops_a_request_stalled_past_the_gap_limit():
    blocks = BlockManager(64, 4)
    engine = EngineCore(get_scheduler("aggressive"), blocks, FakeExecutor(blocks, {"a": 50}),
                        abort_missed=SLO(ttft_s=10.0, max_gap_s=0.5))
    req = Request("a", [1, 2, 3], SamplingParams(max_tokens=50, stop_token_ids=(STOP,)))
    engine.add_request(req)
    engine.step()
    engine.step()
    assert req.num_output_tokens == 2 and blocks.num_free < blocks.num_blocks
    engine.advance_to(engine.now() + 0.6)      # e.g. preempted and waiting for memory
    result = engine.step()
    assert [(e.request_id, e.reason) for e in result.events] == [("a", "slo")]
    assert result.plan.is_empty and not engine.has_unfinished and blocks.num_free == blocks.num_blocks


def test_slo_rejects_non_positive_limits():
    with pytest.raises(ServingError, match="max_gap_s"):
        SLO(10.0, 0)


def test_executor_must_answer_exactly_the_sampling_requests():
    class Wrong:
        def execute(self, plan):
            return {"ghost": 1}, 0.0
    engine = EngineCore(get_scheduler("aggressive"), BlockManager(8, 4), Wrong())
    engine.add_request(Request("a", [1, 2], SamplingParams(max_tokens=3)))
    with pytest.raises(ServingError, match="wrong requests"):
        engine.step()


def test_virtual_clock_advances_by_step_time():
    engine, _, _ = make_engine("aggressive", 8, 4, {"a": 3})
    engine.add_request(Request("a", [1, 2], SamplingParams(max_tokens=3, stop_token_ids=(STOP,))))
    engine.step()
    assert engine.now() == pytest.approx(0.01)
    engine.advance_to(5.0)
    assert engine.now() == 5.0
    real = EngineCore(get_scheduler("aggressive"), BlockManager(8, 4), FakeExecutor(None, {}), clock=lambda: 1.0)
    with pytest.raises(ServingError, match="virtual clock"):
        real.advance_to(3.0)


def test_forced_memory_pressure_preempts_and_outputs_are_unchanged():
    # 12 requests into a cache that holds ~2 of them at full length: preemption must happen.
    n = 12
    lengths = {f"r{i}": 20 + i for i in range(n)}
    engine, blocks, _ = make_engine("aggressive", 14, 4, lengths, max_tokens_per_step=16)
    reqs = [Request(f"r{i}", list(range(i, i + 6)), SamplingParams(max_tokens=40, stop_token_ids=(STOP,)))
            for i in range(n)]
    for r in reqs:
        engine.add_request(r)
    while engine.has_unfinished:
        engine.step()
        blocks.check_invariants()
    assert engine.num_preemptions > 0
    for r in reqs:
        assert r.output_token_ids == reference_output(r.prompt_token_ids, lengths[r.request_id], 40)
    assert blocks.num_free == blocks.num_blocks


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=st.sampled_from(["aggressive", "conservative", "past-future", "layered-prefill"]),
       block_size=st.sampled_from([1, 2, 4]),
       budget=st.integers(2, 24),
       specs=st.lists(st.tuples(st.integers(0, 6),        # arrival step
                                st.integers(1, 14),       # prompt length
                                st.integers(1, 12),       # output length until the stop token
                                st.integers(1, 12),       # max_tokens
                                st.integers(0, 3),        # prompt family (shared prefixes)
                                st.booleans()),           # cancel it midway
                      min_size=1, max_size=10))
def test_no_request_lost_or_duplicated(policy, block_size, budget, specs):
    # A tiny cache: the longest request just fits, so preemption and queueing are frequent.
    longest = max(p + m for _, p, _, m, _, _ in specs)
    num_blocks = -(-longest // block_size) + 1
    lengths = {f"r{i}": out for i, (_, _, out, _, _, _) in enumerate(specs)}
    engine, blocks, _ = make_engine(policy, num_blocks, block_size, lengths, max_tokens_per_step=budget,
                                    num_layer_groups=3)
    reqs = {}
    arrivals = sorted(range(len(specs)), key=lambda i: specs[i][0])
    seen: dict[str, list[int]] = {}
    finishes: dict[str, int] = {}
    step, k = 0, 0
    while k < len(arrivals) or engine.has_unfinished:
        while k < len(arrivals) and specs[arrivals[k]][0] <= step:
            i = arrivals[k]
            _, p, out, mx, family, _ = specs[i]
            prompt = [family] * (p // 2) + list(range(100 + i, 100 + i + p - p // 2))
            r = Request(f"r{i}", prompt, SamplingParams(max_tokens=mx, stop_token_ids=(STOP,)))
            reqs[r.request_id] = r
            engine.add_request(r)
            k += 1
        if engine.has_unfinished:
            result = engine.step()
            for e in result.events:
                if isinstance(e, TokenEvent):
                    assert e.index == len(seen.setdefault(e.request_id, []))
                    seen[e.request_id].append(e.token_id)
                else:
                    finishes[e.request_id] = finishes.get(e.request_id, 0) + 1
            blocks.check_invariants()
            for rid, r in reqs.items():
                _, _, _, _, _, cancel = specs[int(rid[1:])]
                if cancel and r.state is RequestState.RUNNING and r.num_output_tokens >= 1:
                    assert engine.cancel(rid)
        step += 1
        assert step < 5000, "engine made no progress"
    for rid, r in reqs.items():
        _, _, out, mx, _, _ = specs[int(rid[1:])]
        ref = reference_output(r.prompt_token_ids, out, mx)
        assert seen.get(rid, []) == r.output_token_ids      # streamed tokens == final output
        if r.state is RequestState.CANCELLED:
            assert r.output_token_ids == ref[:r.num_output_tokens] and rid not in finishes
        else:
            assert r.state is RequestState.FINISHED and finishes[rid] == 1
            assert r.output_token_ids == ref
    assert blocks.num_free == blocks.num_blocks and not engine.running and not engine.waiting
