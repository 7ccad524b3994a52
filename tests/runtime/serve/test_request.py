import numpy as np
import pytest

from dsl.errors import ServingError
from runtime.serve.request import Request, RequestState, SamplingParams


def test_life_cycle_and_timestamps():
    r = Request("a", [5, 6, 7], SamplingParams(max_tokens=3, stop_token_ids=(9,)), arrival_time=1.0)
    assert r.state is RequestState.WAITING and r.num_tokens == 3
    r.transition(RequestState.RUNNING, 2.0)
    assert r.admitted_time == 2.0
    r.num_computed_tokens = 3
    assert r.append_token(4, 2.5) is None and r.first_token_time == 2.5
    assert r.in_decode
    r.transition(RequestState.PREEMPTED, 3.0)
    assert r.num_computed_tokens == 0 and r.num_preemptions == 1 and r.output_token_ids == [4]
    assert r.token_ids(2, 4).tolist() == [7, 4]
    r.transition(RequestState.RUNNING, 3.5)
    assert r.append_token(9, 4.0) == "stop"
    r.transition(RequestState.FINISHED, 4.0)
    assert r.finish_time == 4.0 and r.token_times == [2.5, 4.0]
    with pytest.raises(ServingError, match="cannot go from finished to running"):
        r.transition(RequestState.RUNNING, 5.0)


def test_length_limit_and_cancel():
    r = Request("b", [1], SamplingParams(max_tokens=2))
    r.transition(RequestState.RUNNING, 0.0)
    assert r.append_token(3, 0.1) is None and r.append_token(3, 0.2) == "length"
    w = Request("c", [1])
    w.transition(RequestState.CANCELLED, 1.0)
    assert w.finish_reason == "cancelled" and w.is_done
    with pytest.raises(ServingError):
        Request("d", [1]).transition(RequestState.PREEMPTED, 0.0)


@pytest.mark.parametrize("prompt", [[], [[1, 2]], [-1], ["a"]])
def test_bad_prompts(prompt):
    with pytest.raises(ServingError, match="prompt|token ids"):
        Request("x", prompt)


def test_prompt_is_read_only():
    r = Request("x", np.arange(4))
    with pytest.raises(ValueError):
        r.prompt_token_ids[0] = 9
    with pytest.raises(ServingError, match="request id"):
        Request("", [1])
