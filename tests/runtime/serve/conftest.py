"""A tiny MoE transformer shared by the engine and HTTP tests (built once per session)."""

import pytest
import torch


def tiny_config():
    from runtime.model import MoEConfig

    return MoEConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, num_experts=4, top_k=2,
                     expert_hidden=32, backend="torch")


def build_tiny_model():
    from runtime.model import MoETransformer

    torch.manual_seed(0)
    return MoETransformer(tiny_config()).eval()


@pytest.fixture(scope="session")
def tiny_model():
    return build_tiny_model()
