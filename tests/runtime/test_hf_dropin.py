"""runtime.hf.replace_moe_blocks on small random Mixtral and Qwen2-MoE models (no downloads)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from runtime.hf import HFMoEBlock, replace_moe_blocks  # noqa: E402


def _inputs(vocab):
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(0))


def _randomize(model):
    # Qwen2-MoE initialises its router to zeros; random weights make the routing non-trivial.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_mixtral_outputs_unchanged():
    cfg = transformers.MixtralConfig(vocab_size=97, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                     num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    _randomize(model)
    ids = _inputs(cfg.vocab_size)
    with torch.no_grad():
        want = model(ids, output_router_logits=True)
    assert replace_moe_blocks(model, backend="torch") == 2
    assert sum(isinstance(m, HFMoEBlock) for m in model.modules()) == 2
    with torch.no_grad():
        got = model(ids, output_router_logits=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    for a, b in zip(got.router_logits, want.router_logits):   # still recorded through the kept router
        torch.testing.assert_close(a, b)


def test_qwen2_moe_shared_expert_outputs_unchanged_and_trainable():
    cfg = transformers.Qwen2MoeConfig(vocab_size=97, hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                                      shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, num_experts=8, num_experts_per_tok=3,
                                      norm_topk_prob=False, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.Qwen2MoeForCausalLM(cfg).eval()
    _randomize(model)
    ids = _inputs(cfg.vocab_size)
    with torch.no_grad():
        want = model(ids).logits
    assert replace_moe_blocks(model, backend="torch") == 2
    block = next(m for m in model.modules() if isinstance(m, HFMoEBlock))
    assert block.moe.shared_expert is not None and block.moe.shared_expert.gate is not None
    assert not block.moe.renormalize
    out = model(ids).logits
    torch.testing.assert_close(out.detach(), want, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert block.moe.w13.grad is not None and block.moe.router.weight.grad is not None
