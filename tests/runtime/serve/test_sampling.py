import pytest
import torch

from dsl.errors import ServingError
from runtime.serve.request import SamplingParams
from runtime.serve.sampling import sample_tokens


def test_greedy_takes_the_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 0.0]])
    assert sample_tokens(logits, [SamplingParams()] * 2, [0, 0]) == [1, 0]


def test_seeded_sampling_depends_only_on_seed_and_position():
    logits = torch.randn(1, 50)
    p = SamplingParams(temperature=1.0, seed=7)
    first = [sample_tokens(logits, [p], [i])[0] for i in range(20)]
    again = [sample_tokens(logits, [p], [i])[0] for i in range(20)]
    assert first == again
    # batched with someone else, same answer
    batch = torch.cat([torch.randn(1, 50), logits])
    assert [sample_tokens(batch, [SamplingParams(temperature=0.5), p], [3, i])[1] for i in range(20)] == first
    assert len(set(first)) > 1     # not stuck on one token


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = SamplingParams(temperature=1.0, top_p=0.7, seed=1)
    seen = {sample_tokens(logits, [p], [i])[0] for i in range(200)}
    assert seen == {0, 1}          # 0.5 + 0.3 reaches 0.7; the tail is cut


def test_low_temperature_approaches_greedy():
    logits = torch.tensor([[1.0, 2.0, 1.5]])
    p = SamplingParams(temperature=1e-3, seed=3)
    assert {sample_tokens(logits, [p], [i])[0] for i in range(30)} == {1}


def test_shape_mismatch_is_an_error():
    with pytest.raises(ServingError, match="must be"):
        sample_tokens(torch.zeros(2, 4), [SamplingParams()], [0])


@pytest.mark.parametrize("bad", [{"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_p": 1.5},
                                 {"seed": "x"}, {"stop_token_ids": (-1,)}, {"max_tokens": True}])
def test_sampling_params_validation(bad):
    with pytest.raises(ServingError):
        SamplingParams(**bad)
