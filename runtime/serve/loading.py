"""Load a model to serve: a training run directory of ``kdsl train`` or a random preset model.

A run directory holds ``checkpoint.json`` (names the live ``ckpt_*.safetensors``, its sha256 and the
model config) and its training config, whose ``data_dir`` has the corpus' ``tokenizer.json``
(a ``tokenizer.json`` next to the checkpoint wins). Only the ``model.*`` tensors are read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from dsl.errors import KdslError, ServingError


class HFTokenizer:
    """``encode(str) -> list[int]``, ``decode(ids) -> str`` over a HuggingFace ``tokenizers`` file."""

    def __init__(self, path: str | Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ServingError("the `tokenizers` package is needed for text prompts: pip install tokenizers") from None
        self.path = Path(path)
        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids))


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255: lets a random-init model take text prompts."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        # Ids past the byte range (a random model emits them) show as <id> rather than vanish.
        out, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append(f"<{i}>")
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


def _find_tokenizer(run_dir: Path, record: dict):
    candidates = [run_dir / "tokenizer.json"]
    data_dir = (record.get("train_config") or {}).get("data_dir")
    if data_dir:
        candidates.append(Path(data_dir) / "tokenizer.json")
    else:
        try:
            from runtime.train.data import default_data_dir
            candidates.append(Path(default_data_dir()) / "tokenizer.json")
        except ImportError:
            pass
    for path in candidates:
        if path.is_file():
            return HFTokenizer(path)
    return None


def load_checkpoint(run_dir: str | Path, *, backend: str = "auto"):
    """(model, tokenizer or None, model name) from a ``kdsl train`` run directory."""
    from runtime.model import MoEConfig, MoETransformer

    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoint.json"
    if not ckpt.is_file():
        raise ServingError(f"{run_dir} is not a training run directory (no checkpoint.json); "
                           "use --preset tiny --random-init for a random model")
    try:
        record = json.loads(ckpt.read_text())
        tensor_file = run_dir / record["tensors"]
        config_dict = dict(record["model_config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ServingError(f"corrupt checkpoint {ckpt}: {exc}") from None
    if not tensor_file.is_file():
        raise ServingError(f"checkpoint {ckpt} names {tensor_file.name}, which is missing")
    digest = hashlib.sha256(tensor_file.read_bytes()).hexdigest()
    if record.get("sha256") and digest != record["sha256"]:
        raise ServingError(f"checkpoint {tensor_file} does not match the sha256 in {ckpt.name}")
    config_dict["backend"] = backend
    config = MoEConfig.from_dict(config_dict)
    from safetensors.torch import load_file

    tensors = load_file(str(tensor_file))
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    # The balancer's state takes part in routing at inference too (aux-free's selection bias), so the
    # model is rebuilt with the method it was trained with and that state restored.
    balance = str((record.get("train_config") or {}).get("balance", "none"))
    try:
        model = MoETransformer(config, balance=balance)
    except KdslError as exc:
        raise ServingError(f"checkpoint {ckpt}: {exc}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_embeddings)]
    if missing or unexpected:
        raise ServingError(f"checkpoint {tensor_file} does not fit its model config: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    balancer = {k[len("balance."):]: v for k, v in tensors.items() if k.startswith("balance.")}
    if balancer:
        model.load_balancer_state(balancer)
    return model.eval(), _find_tokenizer(run_dir, record), f"{run_dir.name}-step{record.get('step', 0)}"


def random_model(preset: str = "tiny", *, seed: int = 0, backend: str = "auto", **overrides):
    """(model, byte tokenizer, name): a randomly initialised preset model (for trying the server)."""
    from runtime.model import MoETransformer, get_preset

    config = get_preset(preset, backend=backend, **overrides)
    torch.manual_seed(seed)
    tokenizer = ByteTokenizer() if config.vocab_size >= 256 else None
    return MoETransformer(config).eval(), tokenizer, f"{preset}-random"


def quantize_for_serving(model, quant: str | None) -> dict:
    """Apply ``--quant`` (``w4``/``w8``, round-to-nearest, group-wise) and say what happened.

    Linear layers called as modules become QuantLinear and the routed experts of every MoE layer
    become packed QuantExperts (both dequantize inside their GEMM's K loop on a GPU): ``packed``.
    Weights the model's fused ops read as tensors (attention's qkv/o projections, the shared
    expert's gate/up/down) cannot take a QuantLinear; they are rounded to the int4/int8 grid and
    stored dequantized (``simulated``), so answers carry their quantization error while their memory
    stays that of the float model. Embeddings, norms and routers stay in float.
    """
    if quant in (None, "", "none"):
        return {"packed": 0, "simulated": 0}
    bits = {"w4": 4, "w8": 8}.get(quant)
    if bits is None:
        raise ServingError(f"unknown --quant '{quant}'; valid: none, w4, w8")
    import math

    from torch import nn

    from runtime.nn.moe import MoE
    from runtime.nn.quant_linear import quantize_model
    from dsl.quantize import quantize_rtn

    def group_for(k: int) -> int:
        return 128 if k % 128 == 0 else (64 if k % 64 == 0 else 32 if k % 32 == 0 else k)

    simulated = packed_experts = 0
    # Routers and the shared expert's score gate stay exact: they decide where tokens go.
    fused_names = ("qkv", "o_proj", "gate_proj", "up_proj", "down_proj")
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, MoE) and module.quantized_experts is None:
                module.quantize_experts(bits=bits, group_size=group_for(math.gcd(module.dim, module.hidden)))
                packed_experts += 1
                continue
            leaf = name.rsplit(".", 1)[-1]
            if not (isinstance(module, nn.Linear) and leaf in fused_names):
                continue
            w = module.weight.data
            q = quantize_rtn(w.float(), bits=bits, group_size=group_for(w.shape[-1]))
            w.copy_(q.dequantize().to(w.dtype))
            simulated += 1
    read_as_tensor = (*fused_names, "router", "gate")
    fused = {n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in read_as_tensor}
    skip = ("lm_head", *fused)
    packed = 0
    if any(isinstance(m, nn.Linear) and n not in fused and n != "lm_head" for n, m in model.named_modules()):
        packed = len(quantize_model(model, bits=bits, group_size=128, skip=skip))
    return {"packed": packed + packed_experts, "simulated": simulated}


__all__ = ["ByteTokenizer", "HFTokenizer", "load_checkpoint", "quantize_for_serving", "random_model"]
