"""runtime.model: the MoE transformer on the torch backend (shapes, gradients, balancing hooks, KV cache)."""

import pytest
import torch

from dsl.errors import TrainingError
from runtime.model import PRESETS, MoEConfig, MoETransformer, get_preset
from runtime.nn.attention import ContiguousKVCache

SMALL = dict(vocab_size=64, dim=32, n_layers=2, n_heads=2, num_experts=4, top_k=2, expert_hidden=32,
             seq_len=16, batch_size=4, backend="torch")


def make(balance="none", **kw):
    torch.manual_seed(0)
    return MoETransformer(MoEConfig(**{**SMALL, **kw}), balance=balance, balance_options=None)


def test_forward_backward_shapes_and_loads():
    model = make("micro")
    tokens = torch.randint(0, 64, (3, 10))
    logits = model(tokens)
    assert logits.shape == (3, 10, 64)
    loads = model.layer_loads()
    assert loads.shape == (2, 4) and loads.sum(1).tolist() == [3 * 10 * 2] * 2
    loss = logits.logsumexp(-1).mean() + model.balance_loss()
    assert model.balance_loss().item() > 0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
    assert model.layers[0].moe.router.weight.grad.abs().sum() > 0


def test_tied_and_untied_embeddings_and_shared_expert():
    tied, untied = make(), make(tie_embeddings=False, shared_expert_hidden=16)
    assert tied.lm_head is None and untied.lm_head is not None
    assert untied.layers[0].moe.shared_expert is not None
    assert untied.num_parameters() > tied.num_parameters()
    assert untied(torch.randint(0, 64, (2, 5))).shape == (2, 5, 64)


def test_top_k_override_and_routing_capture():
    model = make()
    model.set_top_k([4, 1])
    model.capture_routing(True)
    model(torch.randint(0, 64, (2, 8)))
    assert model.layer_loads().sum(1).tolist() == [16 * 4, 16 * 1]
    ids = model.layer_routing()
    assert ids[0].shape == (16, 4) and ids[1].shape == (16, 1)
    model.capture_routing(False)
    with pytest.raises(TrainingError, match="no routing captured"):
        model.layer_routing()


def test_kv_cache_path_matches_full_forward():
    model = make().eval()
    tokens = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        full = model(tokens)
        caches = [ContiguousKVCache(2, 16, 2, 16) for _ in range(2)]
        prefill = model(tokens[:, :5], kv_cache=caches)
        decoded = [model(tokens[:, i:i + 1], positions=torch.full((2, 1), i), kv_cache=caches) for i in range(5, 9)]
    torch.testing.assert_close(torch.cat([prefill, *decoded], 1), full, atol=1e-4, rtol=1e-4)
    with pytest.raises(TrainingError, match="layer caches"):
        model(tokens, kv_cache=caches[:1])


def test_bad_config_preset_and_balance():
    with pytest.raises(TrainingError, match="unknown preset 'huge'"):
        get_preset("huge")
    with pytest.raises(TrainingError, match="unknown balance method 'magic'"):
        make("magic")
    with pytest.raises(TrainingError, match="not divisible by n_heads"):
        MoEConfig(dim=30, n_heads=4)
    with pytest.raises(TrainingError, match="top_k"):
        MoEConfig(num_experts=2, top_k=3)
    assert {"tiny", "small", "base"} <= set(PRESETS) and PRESETS["tiny"].vocab_size == 4096


def test_balancer_state_roundtrip():
    model = make("aux_free")
    model(torch.randint(0, 64, (2, 8)))
    model.balancer_step()
    state = model.balancer_state()
    assert set(state) == {"layers.0.bias", "layers.0.pending", "layers.1.bias", "layers.1.pending"}
    assert state["layers.0.bias"].abs().sum() > 0
    other = make("aux_free")
    other.load_balancer_state(state)
    assert torch.equal(other.balancer_state()["layers.1.bias"], state["layers.1.bias"])
