"""The model executor: runs an engine step's plan through a real model over a paged KV cache.

The KV memory is one pair of tensors per layer, [num_blocks, block_size, H_kv, D], shaped from the
block manager's geometry; the block manager decides which blocks a request owns, the executor only
reads its block tables. A step

1. performs the plan's block copies (copy-on-write after a fork),
2. runs all decodes as one batch (one new token each, positions = tokens already cached),
3. runs prefill chunks, batching chunks of equal length together (the attention kernel takes one
   query length per call; equal lengths are common under a token budget, and unequal ones simply
   run as separate calls),
4. samples the next token of every request whose forward reached its last token.

A model is anything with ``forward(tokens [B, S], positions [B, S], kv_cache=[one KVCache per
layer]) -> logits [B, S, vocab]`` plus the geometry (``n_layers``, ``n_kv_heads``, ``head_dim``)
either as attributes of ``model.config`` or passed explicitly.

Layered prefill: a chunk that runs layer group g of G goes through that group's layers only
(``model.embed_tokens`` / ``run_layers`` / ``logits``); its hidden states wait here for the next
step's group, so a long prompt costs each step a share of the layers and decodes keep their pace. A
model without the staged methods computes the chunk in full when its last group comes (same tokens,
no latency benefit).
"""

from __future__ import annotations

import collections
import dataclasses
import time

import torch

from dsl.errors import ServingError
from runtime.nn.attention import write_paged
from runtime.serve.block_manager import BlockManager
from runtime.serve.request import Request, RequestState
from runtime.serve.sampling import sample_tokens
from runtime.serve.scheduler import PrefillChunk, StepPlan


@dataclasses.dataclass(frozen=True)
class KVGeometry:
    n_layers: int
    n_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, model) -> KVGeometry:
        config = getattr(model, "config", None)
        if config is None:
            raise ServingError("the model has no .config; pass the KV geometry (n_layers, n_kv_heads, "
                               "head_dim) to ModelExecutor explicitly")
        n_heads = config.n_heads
        n_kv = getattr(config, "n_kv_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or config.dim // n_heads
        return cls(int(config.n_layers), int(n_kv), int(head_dim))


class _LayerCache:
    """One layer's view of the shared paged memory for one forward call (the KVCache protocol)."""

    __slots__ = ("k_cache", "v_cache", "block_table", "seq_lens")

    def __init__(self, k_cache, v_cache, block_table, seq_lens):
        self.k_cache, self.v_cache = k_cache, v_cache
        self.block_table, self.seq_lens = block_table, seq_lens

    def write(self, k, v, positions) -> None:
        write_paged(self.k_cache, self.v_cache, self.block_table, k, v, positions)
        self.seq_lens = torch.maximum(self.seq_lens, (positions.max(dim=1).values + 1).to(torch.int32))


class ModelExecutor:
    """Implements ``runtime.serve.engine_core.Executor`` with a model and per-layer KV tensors."""

    def __init__(self, model, block_manager: BlockManager, *, geometry: KVGeometry | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0):
        self.model = model
        self.blocks = block_manager
        self.geometry = geometry or KVGeometry.of(model)
        self.device = torch.device(device)
        self.dtype = dtype
        g = self.geometry
        shape = (block_manager.num_blocks, block_manager.block_size, g.n_kv_heads, g.head_dim)
        self.k_caches = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(g.n_layers)]
        self.v_caches = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(g.n_layers)]
        # Unseeded sampling draws from one generator so a server run is reproducible from its seed.
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.num_forward_calls = 0
        self.staged = all(callable(getattr(model, m, None)) for m in ("embed_tokens", "run_layers", "logits"))
        # Layered prefill in flight: request id -> (request, hidden states [1, S, dim] after its last group).
        self._partial: dict[str, tuple[Request, torch.Tensor]] = {}

    @property
    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_caches + self.v_caches)

    # --- the step ----------------------------------------------------------------------------
    def execute(self, plan: StepPlan) -> tuple[dict[str, int], float]:
        start = time.perf_counter()
        with torch.no_grad():   # inference_mode tensors break the MoE op's identity cache
            self.copy_blocks(plan.block_copies)
            last_logits: dict[str, torch.Tensor] = {}
            if plan.decodes:
                reqs = plan.decodes
                starts = [r.num_computed_tokens for r in reqs]
                tokens = [r.token_ids(s, s + 1) for r, s in zip(reqs, starts)]
                logits = self._forward(reqs, starts, tokens, 1)
                for i, r in enumerate(reqs):
                    last_logits[r.request_id] = logits[i, -1]
            # Chunks run together when they share a length (and, layered, a layer group).
            batches: dict[tuple, list[PrefillChunk]] = collections.defaultdict(list)
            for chunk in plan.prefills:
                if self.staged and chunk.layer_group is not None:
                    batches[(chunk.num_tokens, chunk.layer_group, chunk.num_layer_groups)].append(chunk)
                elif chunk.finishes_forward:
                    batches[(chunk.num_tokens, None, 1)].append(chunk)
            self._drop_stale_partials()
            for (length, group, groups), chunks in batches.items():
                if group is None:
                    logits = self._forward([c.request for c in chunks], [c.start for c in chunks],
                                           [c.request.token_ids(c.start, c.start + length) for c in chunks], length)
                else:
                    logits = self._forward_layer_group(chunks, length, group, groups)
                if logits is None:
                    continue
                for i, c in enumerate(chunks):
                    if c.samples:
                        last_logits[c.request.request_id] = logits[i, -1]
            samplers = plan.sampling_requests()
            out: dict[str, int] = {}
            if samplers:
                rows = torch.stack([last_logits[r.request_id] for r in samplers])
                picked = sample_tokens(rows, [r.sampling for r in samplers],
                                       [r.num_output_tokens for r in samplers], self.generator)
                out = {r.request_id: t for r, t in zip(samplers, picked)}
        return out, time.perf_counter() - start

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], dtype=torch.long, device=self.device)
        dst = torch.tensor([d for _, d in copies], dtype=torch.long, device=self.device)
        for cache in self.k_caches + self.v_caches:
            cache.index_copy_(0, dst, cache.index_select(0, src))

    def _forward(self, reqs: list[Request], starts: list[int], tokens: list, length: int) -> torch.Tensor:
        """Run ``length`` new tokens of each request (which has ``starts[i]`` tokens cached)."""
        ids, positions, caches = self._inputs(reqs, starts, tokens, length)
        self.num_forward_calls += 1
        return self.model(ids, positions, caches)

    def _forward_layer_group(self, chunks: list[PrefillChunk], length: int, group: int,
                             groups: int) -> torch.Tensor | None:
        """Layers of ``group`` (of ``groups`` contiguous groups) for each chunk's tokens; the logits
        after the last group, else None (the hidden states wait in ``_partial``)."""
        reqs = [c.request for c in chunks]
        ids, positions, caches = self._inputs(reqs, [c.start for c in chunks],
                                              [r.token_ids(c.start, c.start + length) for r, c in zip(reqs, chunks)],
                                              length)
        if group == 0:
            x = self.model.embed_tokens(ids)
        else:
            missing = [r.request_id for r in reqs if r.request_id not in self._partial]
            if missing:
                raise ServingError(f"layered prefill: no hidden states kept for {missing[:5]} before layer "
                                   f"group {group}")
            x = torch.cat([self._partial.pop(r.request_id)[1] for r in reqs])
        n = self.geometry.n_layers
        x = self.model.run_layers(x, positions, caches, group * n // groups, (group + 1) * n // groups)
        self.num_forward_calls += 1
        if group == groups - 1:
            return self.model.logits(x)
        for i, r in enumerate(reqs):
            self._partial[r.request_id] = (r, x[i:i + 1])
        return None

    def _drop_stale_partials(self) -> None:
        # A request cancelled or preempted mid-prefill restarts from group 0 (or never returns).
        for rid, (req, _) in list(self._partial.items()):
            if req.state is not RequestState.RUNNING or req.layer_groups_done == 0:
                del self._partial[rid]

    def _inputs(self, reqs: list[Request], starts: list[int], tokens: list, length: int):
        """Token ids, positions and per-layer paged caches for ``length`` new tokens of each request."""
        tables = [self.blocks.block_table(r.request_id) for r in reqs]
        width = max(len(t) for t in tables)
        for r, s, t in zip(reqs, starts, tables):
            if len(t) * self.blocks.block_size < s + length:
                raise ServingError(f"request {r.request_id}: {len(t)} KV blocks cannot hold "
                                   f"{s + length} tokens")
        # Padding slots point at block 0; attention never reads past a sequence's length.
        table = torch.zeros((len(reqs), width), dtype=torch.int32)
        for i, t in enumerate(tables):
            table[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
        table = table.to(self.device)
        seq_lens = torch.tensor(starts, dtype=torch.int32, device=self.device)
        ids = torch.as_tensor(torch.tensor([list(map(int, t)) for t in tokens], dtype=torch.long),
                              device=self.device)
        positions = seq_lens.long()[:, None] + torch.arange(length, device=self.device)[None, :]
        caches = [_LayerCache(k, v, table, seq_lens) for k, v in zip(self.k_caches, self.v_caches)]
        return ids, positions, caches


__all__ = ["KVGeometry", "ModelExecutor"]
