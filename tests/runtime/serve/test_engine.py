"""The real engine on a tiny model: answers match a plain full-sequence greedy loop, preemption and
cancellation leave outputs and KV bookkeeping intact."""


import pytest
import torch

from dsl.errors import ServingError
from runtime.serve.engine import Engine
from runtime.serve.request import SamplingParams

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4, 4], [9, 8, 7, 6, 5, 4, 3, 2, 1, 2, 3, 4, 5]]


def reference_greedy(model, prompt, n):
    """No KV cache at all: rerun the whole sequence for each new token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_greedy_matches_full_sequence_reference(tiny_model):
    engine = Engine(tiny_model, scheduler="past-future", num_blocks=32, block_size=4)
    outs = engine.generate(PROMPTS[:2], SamplingParams(max_tokens=4))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == reference_greedy(tiny_model, prompt, 4)
        assert out.finish_reason == "length"
    assert engine.blocks.num_used_blocks == 0
    engine.blocks.check_invariants()


@pytest.mark.parametrize("scheduler", ["aggressive", "layered-prefill"])
def test_memory_pressure_preempts_and_keeps_outputs(tiny_model, scheduler):
    params = [SamplingParams(max_tokens=6), SamplingParams(max_tokens=6, temperature=0.8, seed=3),
              SamplingParams(max_tokens=5), SamplingParams(max_tokens=6, temperature=1.0, top_p=0.9, seed=7)]
    roomy = Engine(tiny_model, scheduler=scheduler, num_blocks=64, block_size=4)
    want = roomy.generate(PROMPTS, params)
    # 6 blocks of 4 tokens hold one long request at a time: the others get preempted and recomputed.
    tight = Engine(tiny_model, scheduler=scheduler, num_blocks=6, block_size=4, max_tokens_per_step=8)
    got = tight.generate(PROMPTS, params)
    assert tight.core.num_preemptions > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert all(o.finish_reason == "length" for o in got)
    assert tight.blocks.num_used_blocks == 0
    tight.blocks.check_invariants()


def test_layered_prefill_runs_one_layer_group_per_step(tiny_model):
    # The 2-layer model in 2 groups: a 13-token prompt goes through layer 0 in one step and layer 1
    # in the next, while the request already decoding runs both layers every step.
    seen: list[tuple[int, int]] = []
    hooks = [layer.register_forward_hook(lambda mod, args, out, i=i: seen.append((i, args[0].shape[1])))
             for i, layer in enumerate(tiny_model.layers)]
    try:
        engine = Engine(tiny_model, scheduler="layered-prefill", num_blocks=32, block_size=4, num_layer_groups=2)
        first = engine.submit(PROMPTS[0], SamplingParams(max_tokens=6), loop=None)
        for _ in range(2):                  # prompt 0 prefills (2 groups), then decodes
            engine.step()
        long = engine.submit(PROMPTS[3], SamplingParams(max_tokens=3), loop=None)
        per_step = []
        for _ in range(2):
            seen.clear()
            engine.step()
            per_step.append(sorted(seen))
        assert per_step == [[(0, 1), (0, 13), (1, 1)], [(0, 1), (1, 1), (1, 13)]]
        assert len(long.request.output_token_ids) == 1     # sampled after the last group
        engine.run_until_idle()
    finally:
        for h in hooks:
            h.remove()
    assert first.request.output_token_ids == reference_greedy(tiny_model, PROMPTS[0], 6)
    assert long.request.output_token_ids == reference_greedy(tiny_model, PROMPTS[3], 3)
    assert engine.blocks.num_used_blocks == 0 and not engine.executor._partial


def test_stop_tokens_and_prefix_sharing(tiny_model):
    engine = Engine(tiny_model, scheduler="conservative", num_blocks=32, block_size=4)
    first = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=4))[0]
    stop = first.token_ids[1]
    again = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=4, stop_token_ids=(stop,)))[0]
    assert again.token_ids == first.token_ids[:first.token_ids.index(stop) + 1]
    assert again.finish_reason == "stop"
    assert engine.blocks.num_cache_hit_blocks > 0   # the second run reused the prompt's blocks


def test_background_loop_cancel_frees_blocks(tiny_model):
    engine = Engine(tiny_model, num_blocks=32, block_size=4, max_model_len=64)
    engine.start()
    try:
        stream = engine.submit(PROMPTS[3], SamplingParams(max_tokens=40))
        first = next(iter(stream))
        assert first.index == 0
        assert engine.cancel(stream.request_id)
        events = list(stream)
        assert events[-1].reason == "cancelled"
        assert engine.blocks.num_used_blocks == 0
        assert engine.generate([PROMPTS[0]], SamplingParams(max_tokens=2))[0].finish_reason == "length"
    finally:
        engine.shutdown(drain=False)
    with pytest.raises(ServingError, match="shutting down"):
        engine.submit([1, 2], SamplingParams(max_tokens=1))


def test_bad_requests_are_serving_errors(tiny_model):
    engine = Engine(tiny_model, num_blocks=8, block_size=4)
    with pytest.raises(ServingError, match="context limit"):
        engine.submit(list(range(30)), SamplingParams(max_tokens=8))
    with pytest.raises(ServingError, match="vocabulary"):
        engine.submit([1, 999], SamplingParams(max_tokens=1))
    with pytest.raises(ServingError, match="tokenizer"):
        engine.submit("hello", SamplingParams(max_tokens=1))
