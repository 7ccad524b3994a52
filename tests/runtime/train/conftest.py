"""Shared by the trainer tests: a small synthetic two-domain corpus and a tiny model shape."""

import pytest

from runtime.train.data import build_corpus
from runtime.train.sources import Document

MODEL = dict(vocab_size=320, dim=32, n_layers=2, n_heads=2, num_experts=4, top_k=2, expert_hidden=32,
             lr=1e-2, warmup_steps=2, backend="torch")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    # Two domains with distinct, highly repetitive text: an easy language to learn in a few steps.
    code = [Document(f"c{i}", "def f(x):\n    return x + 1\n" * 40 + f"# {i}\n") for i in range(12)]
    prose = [Document(f"p{i}", "The cat sat on the mat and looked at the dog. " * 40) for i in range(12)]
    out = tmp_path_factory.mktemp("corpus")
    build_corpus({"code": code, "prose": prose}, out, vocab_size=300, heldout_fraction=0.2)
    return out


@pytest.fixture(scope="module")
def config(corpus):
    """``config(**changes)``: a TrainConfig of the tiny model on the synthetic corpus."""
    from runtime.train.trainer import TrainConfig

    def make(**kw):
        base = dict(preset="tiny", balance="micro", steps=6, seed=1, batch_size=4, seq_len=16, eval_windows=4,
                    data_dir=str(corpus), model_overrides=dict(MODEL))
        return TrainConfig(**{**base, **kw})

    return make
