"""Loading what `kdsl serve` serves: a training run directory, --quant, and the CLI's errors."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from dsl.errors import ServingError
from runtime.serve.engine import Engine
from runtime.serve.loading import ByteTokenizer, load_checkpoint, quantize_for_serving
from runtime.serve.request import SamplingParams


def write_run_dir(path, model, balance="none"):
    # The layout of runtime.train.trainer: checkpoint.json names the tensors file and its sha256.
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"balance.{k}": v.contiguous() for k, v in model.balancer_state().items()})
    tensors["optim.0.exp_avg"] = torch.zeros(2)          # non-model tensors are ignored
    save_file(tensors, str(path / "ckpt_0000005.safetensors"))
    digest = hashlib.sha256((path / "ckpt_0000005.safetensors").read_bytes()).hexdigest()
    (path / "checkpoint.json").write_text(json.dumps({
        "format": 1, "step": 5, "tensors": "ckpt_0000005.safetensors", "sha256": digest,
        "train_config": {"data_dir": str(path / "no-data"), "balance": balance},
        "model_config": model.config.to_dict()}))


def test_load_checkpoint_serves_the_same_answers(tiny_model, tmp_path):
    write_run_dir(tmp_path, tiny_model)
    model, tokenizer, name = load_checkpoint(tmp_path, backend="torch")
    assert tokenizer is None and name == f"{tmp_path.name}-step5"
    params = SamplingParams(max_tokens=3)
    want = Engine(tiny_model, num_blocks=16, block_size=4).generate([[1, 2, 3]], params)[0].token_ids
    assert Engine(model, num_blocks=16, block_size=4).generate([[1, 2, 3]], params)[0].token_ids == want

    summary = quantize_for_serving(model, "w4")
    assert summary["packed"] >= len(model.layers) and model.layers[0].moe.w13 is None
    assert model.layers[0].moe.quantized_experts.gate_up[0].bits == 4
    assert len(Engine(model, num_blocks=16, block_size=4).generate([[1, 2, 3]], params)[0].token_ids) == 3
    with pytest.raises(ServingError, match="--quant"):
        quantize_for_serving(model, "w3")


def test_aux_free_bias_is_restored_and_steers_routing(tiny_model, tmp_path):
    from runtime.model import MoETransformer

    torch.manual_seed(0)
    trained = MoETransformer(tiny_model.config, balance="aux_free").eval()
    for layer in trained.layers:   # a strong learned bias towards expert 3
        layer.moe.balancer.load_state_dict({**layer.moe.balancer.state_dict(),
                                            "bias": torch.tensor([0.0, 0.0, 0.0, 5.0])})
    write_run_dir(tmp_path, trained, balance="aux_free")
    model, _, _ = load_checkpoint(tmp_path, backend="torch")
    assert model.balance == "aux_free"
    tokens = torch.arange(12).view(1, 12)
    torch.testing.assert_close(model(tokens), trained(tokens))
    assert model.layer_loads()[:, 3].tolist() == [12, 12]      # every token picks the biased expert


def test_bad_checkpoints(tiny_model, tmp_path):
    with pytest.raises(ServingError, match="checkpoint.json"):
        load_checkpoint(tmp_path)
    write_run_dir(tmp_path, tiny_model)
    (tmp_path / "ckpt_0000005.safetensors").write_bytes(b"garbage")
    with pytest.raises(ServingError, match="sha256"):
        load_checkpoint(tmp_path)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("héllo")) == "héllo"
    assert tok.decode([104, 1000, 105]) == "h<1000>i"


def test_cli_needs_a_checkpoint_or_random_init():
    from runtime.cli import main

    assert main(["serve"]) == 2
    assert main(["serve", "x", "--random-init"]) == 2
