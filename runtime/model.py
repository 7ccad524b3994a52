"""``runtime.model``: the MoE transformer of the training stack, assembled from kdsl's modules.

Each block is pre-norm: x + Attention(RMSNorm(x)), then x + MoE(RMSNorm(x)) (routed SwiGLU experts,
optionally a shared expert). Token embedding and the LM head may share one matrix.

Two entry points share one signature, ``forward(tokens, positions=None, kv_cache=None) -> logits``:
training and full-sequence evaluation pass tokens only; serving passes the positions of the new
tokens and ``kv_cache``, a sequence with one :class:`runtime.nn.attention.KVCache` per layer.
After a forward, :meth:`MoETransformer.balance_loss` sums the layers' balancing losses and
:meth:`MoETransformer.layer_loads` gives the tokens routed to each expert per layer, [L, E].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from dsl.errors import TrainingError

from .nn.attention import Attention, KVCache
from .nn.moe import BALANCE_METHODS, MoE
from .nn.norm import RMSNorm
from .ops import route as moe_route
from .ops.dense import linear


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Model shape plus the training defaults that belong to a preset (sequence length, batch, lr)."""

    vocab_size: int = 4096
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 128
    shared_expert_hidden: int = 0        # 0: no shared expert
    router: str = "softmax"
    renormalize: bool = True
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    seq_len: int = 128
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    backend: str = "auto"

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "num_experts", "top_k", "expert_hidden",
                     "seq_len", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TrainingError(f"model config: {name} must be a positive int, got {value!r}")
        if self.dim % self.n_heads:
            raise TrainingError(f"model config: dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.top_k > self.num_experts:
            raise TrainingError(f"model config: top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.shared_expert_hidden < 0:
            raise TrainingError(f"model config: shared_expert_hidden must be >= 0, got {self.shared_expert_hidden}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MoEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainingError(f"model config has unknown field(s) {', '.join(unknown)}")
        return cls(**data)


PRESETS: dict[str, MoEConfig] = {
    # Minutes on 2 CPU cores; vocabulary of `kdsl data prepare`'s tokenizer.
    "tiny": MoEConfig(),
    # One GPU, tens of minutes: fine-grained experts with a shared expert (DeepSeek-MoE shape).
    "small": MoEConfig(dim=512, n_layers=8, n_heads=8, num_experts=16, top_k=2, expert_hidden=512,
                       shared_expert_hidden=512, seq_len=512, batch_size=32, lr=1e-3, warmup_steps=200),
    # One H100/H200, the scale of the balancing papers' smallest runs (~1B total parameters).
    "base": MoEConfig(dim=1024, n_layers=16, n_heads=16, n_kv_heads=4, num_experts=64, top_k=6,
                      expert_hidden=512, shared_expert_hidden=1024, seq_len=1024, batch_size=64, lr=6e-4,
                      warmup_steps=1000, tie_embeddings=False),
}


def get_preset(name: str, **overrides) -> MoEConfig:
    if name not in PRESETS:
        raise TrainingError(f"unknown preset '{name}'; valid: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides) if overrides else PRESETS[name]


class Block(nn.Module):
    def __init__(self, config: MoEConfig, balance: str, balance_options: dict | None):
        super().__init__()
        c = config
        self.attn_norm = RMSNorm(c.dim, c.norm_eps, backend=c.backend)
        self.attn = Attention(c.dim, c.n_heads, c.n_kv_heads, rope_theta=c.rope_theta, backend=c.backend)
        self.moe_norm = RMSNorm(c.dim, c.norm_eps, backend=c.backend)
        self.moe = MoE(c.dim, c.expert_hidden, c.num_experts, c.top_k, router=c.router, balance=balance,
                       shared_expert=c.shared_expert_hidden or False, renormalize=c.renormalize,
                       backend=c.backend, balance_options=balance_options)
        self.top_k: int | None = None        # per-layer override (top-k schedule)
        self.capture_routing = False
        self.last_topk_ids: torch.Tensor | None = None

    def forward(self, x, positions=None, kv_cache=None):
        x = x + self.attn(self.attn_norm(x), positions, kv_cache)
        h = self.moe_norm(x)
        if self.capture_routing:
            self.last_topk_ids = self._routing(h)
        return x + self.moe(h, top_k=self.top_k)

    @torch.no_grad()
    def _routing(self, h: torch.Tensor) -> torch.Tensor:
        # nn.MoE keeps only per-expert counts; the expert-by-domain matrix needs each token's
        # experts, so repeat its (cheap) routing decision here with the balancer's current bias.
        from .train.balance import router_scores

        moe, k = self.moe, self.top_k or self.moe.top_k
        h2 = h.reshape(-1, moe.dim)
        logits = h2 @ moe.router.weight.T
        bias = moe.balancer.selection_bias(router_scores(logits, moe.router_kind), k, False)
        bias = None if bias is None else bias.to(device=h.device, dtype=torch.float32).contiguous()
        _, ids = moe_route(logits, k, bias=bias, backend=moe.backend, **moe._statics())
        return ids.long()


class MoETransformer(nn.Module):
    """Decoder-only MoE language model; ``balance``: one of runtime.nn.moe.BALANCE_METHODS."""

    def __init__(self, config: MoEConfig, *, balance: str = "none", balance_options: dict | None = None):
        super().__init__()
        if balance not in BALANCE_METHODS:
            raise TrainingError(f"unknown balance method '{balance}'; valid: {', '.join(BALANCE_METHODS)}")
        self.config, self.balance = config, balance
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(Block(c, balance, balance_options) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps, backend=c.backend)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.dim, c.vocab_size, bias=False)
        with torch.no_grad():
            self.embed.weight.normal_(std=c.dim ** -0.5 if c.tie_embeddings else 0.02)
            if self.lm_head is not None:
                self.lm_head.weight.normal_(std=c.dim ** -0.5)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                kv_cache: Sequence[KVCache] | None = None) -> torch.Tensor:
        if tokens.dim() != 2:
            raise TrainingError(f"MoETransformer: tokens must be [B, S], got {list(tokens.shape)}")
        if kv_cache is not None and len(kv_cache) != len(self.layers):
            raise TrainingError(f"MoETransformer: kv_cache has {len(kv_cache)} layer caches for "
                                f"{len(self.layers)} layers")
        x = self.run_layers(self.embed(tokens), positions, kv_cache, 0, len(self.layers))
        return self.logits(x)

    # -- staged forward (layered prefill runs a prompt through a few layers per engine step) ------
    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, S] token ids -> [B, S, dim] hidden states entering layer 0."""
        return self.embed(tokens)

    def run_layers(self, x: torch.Tensor, positions: torch.Tensor | None, kv_cache: Sequence[KVCache] | None,
                   start: int, stop: int) -> torch.Tensor:
        """Hidden states through layers ``[start, stop)``; ``kv_cache`` holds one cache per layer of
        the whole model."""
        for i in range(start, stop):
            x = self.layers[i](x, positions, None if kv_cache is None else kv_cache[i])
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states after the last layer -> [B, S, vocab] logits."""
        x = self.norm(x)
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        b, s, d = x.shape
        return linear(x.reshape(b * s, d), head.to(x.dtype), backend=self.config.backend).view(b, s, -1)

    # -- after a forward ---------------------------------------------------------------------------
    def balance_loss(self) -> torch.Tensor:
        """Sum over layers of the balancing loss (+ z-loss) of the last forward."""
        return sum((layer.moe.balance_loss for layer in self.layers), torch.zeros(()))

    def layer_loads(self) -> torch.Tensor:
        """[L, E] int64: tokens routed to each expert in each layer by the last forward."""
        return torch.stack([layer.moe.last_load.cpu() for layer in self.layers])

    def layer_routing(self) -> list[torch.Tensor]:
        """Each layer's [T, k] expert ids of the last forward (only with :meth:`capture_routing`)."""
        ids = [layer.last_topk_ids for layer in self.layers]
        if any(i is None for i in ids):
            raise TrainingError("no routing captured: call model.capture_routing(True) before the forward")
        return ids

    # -- balancing state and controls --------------------------------------------------------------
    def capture_routing(self, on: bool) -> None:
        for layer in self.layers:
            layer.capture_routing, layer.last_topk_ids = on, None

    def set_top_k(self, ks: Sequence[int | None]) -> None:
        for layer, k in zip(self.layers, ks, strict=True):
            layer.top_k = k

    def balancer_step(self) -> None:
        """After each optimizer step: the balancers' per-step updates (aux-free bias, global buffer)."""
        for layer in self.layers:
            layer.moe.step()

    def balancer_state(self) -> dict[str, torch.Tensor]:
        return {f"layers.{i}.{k}": v for i, layer in enumerate(self.layers)
                for k, v in layer.moe.balancer.state_dict().items()}

    def load_balancer_state(self, state: dict[str, torch.Tensor]) -> None:
        for i, layer in enumerate(self.layers):
            prefix = f"layers.{i}."
            layer.moe.balancer.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                                                if k.startswith(prefix)})

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


__all__ = ["MoEConfig", "MoETransformer", "PRESETS", "get_preset"]
