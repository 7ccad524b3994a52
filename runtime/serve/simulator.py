"""GPU-scale serving simulator: the real scheduler, block manager and engine loop, with the model
replaced by a step-time model of one GPU.

Step time (per layer, then summed; a roofline per layer so a compute-bound prefill group and a
memory-bound decode layer are not averaged away):

    time_layer = max(gemm_flops / (peak[compute dtype] * eff_c) + attn_flops / (peak[bf16] * eff_c),
                     bytes / (bandwidth * eff_m))
    step = sum(time_layer) + LM head (same roofline) + per-step overhead

* FLOPs: 2 x tokens x active parameters (attention projections, top-k experts, shared expert,
  router) + 4 x heads x head_dim x attended (query, key) pairs.
* Bytes: each weight read once per step: attention projections, the shared expert, and every
  *active* expert of the layer; with T tokens routed top-k of E uniformly, the expected number of
  distinct experts hit is E (1 - (1 - k/E)^T). KV cache: decodes read their whole context, a
  prefill chunk reads the context before it; every processed token writes its KV.
* Layered prefill: a chunk that runs layer group g only adds its tokens to the layers of g.
* KV capacity = memory x utilization - weights - activation reserve, in tokens of
  ``kv_bytes_per_token``.

The executor decides tokens only to end each request at its trace length (a stop token); the
scheduler never sees those lengths.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from autotune.devices import Device, get_device
from dsl.errors import ServingError, TuningError
from runtime.serve.block_manager import BlockManager
from runtime.serve.engine_core import EngineCore
from runtime.serve.metrics import SLO, RequestRecord, RunMetrics, summarize
from runtime.serve.request import Request, SamplingParams
from runtime.serve.scheduler import Scheduler, SchedulerConfig, StepPlan, get_scheduler
from runtime.serve.traces import Trace

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes of a decoder-only (MoE) transformer, enough to count its FLOPs, bytes and KV size."""

    name: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    ffn_hidden: int = 0             # dense FFN intermediate size (0 for an all-MoE model)
    num_experts: int = 0
    top_k: int = 0
    expert_hidden: int = 0
    shared_expert_hidden: int = 0   # always-on shared expert (Qwen-MoE), 0 if none
    weight_bytes: float = 2.0       # bytes per weight (2 bf16, 1 fp8, 0.5 int4)
    kv_bytes: float = 2.0           # bytes per KV cache element
    compute_dtype: str = "bf16"     # dtype of the GEMMs (peak FLOP/s looked up on the device)
    tied_embeddings: bool = False
    source: str = ""

    def __post_init__(self):
        for field in ("num_layers", "hidden", "num_heads", "num_kv_heads", "head_dim", "vocab"):
            if getattr(self, field) < 1:
                raise ServingError(f"model {self.name}: {field} must be positive")
        if self.num_experts and not (1 <= self.top_k <= self.num_experts and self.expert_hidden > 0):
            raise ServingError(f"model {self.name}: MoE needs 1 <= top_k <= num_experts and expert_hidden > 0")
        if not self.num_experts and self.ffn_hidden < 1:
            raise ServingError(f"model {self.name}: a dense model needs ffn_hidden")

    # parameters per layer
    @property
    def attn_params(self) -> int:
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return self.hidden * (q + 2 * kv) + q * self.hidden

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.expert_hidden   # gate, up, down

    @property
    def always_on_ffn_params(self) -> int:
        """FFN weights every token uses: dense FFN, shared expert, router."""
        return 3 * self.hidden * (self.ffn_hidden + self.shared_expert_hidden) + self.hidden * self.num_experts

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def total_params(self) -> int:
        per_layer = self.attn_params + self.num_experts * self.expert_params + self.always_on_ffn_params
        return self.num_layers * per_layer + self.embedding_params

    @property
    def active_params_per_token(self) -> int:
        per_layer = self.attn_params + self.top_k * self.expert_params + self.always_on_ffn_params
        return self.num_layers * per_layer + self.vocab * self.hidden

    @property
    def weight_bytes_total(self) -> float:
        return self.total_params * self.weight_bytes

    @property
    def kv_bytes_per_token_layer(self) -> float:
        return 2 * self.num_kv_heads * self.head_dim * self.kv_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        return self.num_layers * self.kv_bytes_per_token_layer


# Shapes from each model's published config.json (Hugging Face model cards).
MODEL_PRESETS: dict[str, ModelConfig] = {m.name: m for m in [
    # mistralai/Mixtral-8x7B-v0.1: 46.7 B parameters. In bf16 (93 GB) it does not fit one 80 GB GPU,
    # so the single-GPU preset stores weights in FP8 (W8A8 GEMMs, as FP8 serving on H100 does);
    # KV cache in bf16.
    ModelConfig("mixtral-8x7b", num_layers=32, hidden=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                vocab=32000, num_experts=8, top_k=2, expert_hidden=14336, weight_bytes=1.0,
                compute_dtype="f8e4m3", source="mistralai/Mixtral-8x7B-v0.1 config.json; FP8 weights"),
    ModelConfig("mixtral-8x7b-bf16", num_layers=32, hidden=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                vocab=32000, num_experts=8, top_k=2, expert_hidden=14336, weight_bytes=2.0,
                source="mistralai/Mixtral-8x7B-v0.1 config.json (needs > 93 GB: H200, MI300X)"),
    # Qwen/Qwen1.5-MoE-A2.7B: 14.3 B parameters, 60 routed experts top-4 plus a shared expert.
    ModelConfig("qwen-moe", num_layers=24, hidden=2048, num_heads=16, num_kv_heads=16, head_dim=128,
                vocab=151936, num_experts=60, top_k=4, expert_hidden=1408, shared_expert_hidden=5632,
                source="Qwen/Qwen1.5-MoE-A2.7B config.json; bf16"),
    # Qwen/Qwen3-30B-A3B: 30.5 B parameters, 128 experts top-8, GQA with 4 KV heads; bf16 weights
    # leave little KV memory on an 80 GB GPU (a memory-tight setting).
    ModelConfig("qwen3-30b-a3b", num_layers=48, hidden=2048, num_heads=32, num_kv_heads=4, head_dim=128,
                vocab=151936, num_experts=128, top_k=8, expert_hidden=768,
                source="Qwen/Qwen3-30B-A3B config.json; bf16"),
]}


def get_model_config(name: str | ModelConfig) -> ModelConfig:
    if isinstance(name, ModelConfig):
        return name
    key = str(name).strip().lower()
    if key not in MODEL_PRESETS:
        raise ServingError(f"unknown model '{name}'; presets: {', '.join(sorted(MODEL_PRESETS))}")
    return MODEL_PRESETS[key]


def resolve_device(device: str | Device) -> Device:
    if isinstance(device, Device):
        return device
    try:
        return get_device(device)
    except TuningError as exc:
        raise ServingError(str(exc)) from None


@dataclasses.dataclass(frozen=True)
class CostParams:
    """Knobs of the step-time model. Efficiencies are fractions of datasheet peaks that serving
    kernels reach on large shapes; the overhead covers scheduling, sampling and launches."""

    compute_efficiency: float = 0.5
    memory_efficiency: float = 0.8
    step_overhead_s: float = 0.002
    memory_utilization: float = 0.9          # share of device memory the engine may use
    activation_reserve_bytes: float = 2 * GiB


def kv_capacity_tokens(model: ModelConfig, device: Device, cost: CostParams = CostParams()) -> int:
    """Tokens of KV cache that fit beside the weights."""
    free = device.memory_bytes * cost.memory_utilization - model.weight_bytes_total - cost.activation_reserve_bytes
    if free < model.kv_bytes_per_token * 1024:
        raise ServingError(f"model {model.name} ({model.weight_bytes_total / 1e9:.1f} GB of weights) leaves no "
                           f"room for a KV cache on {device.name} ({device.memory_bytes / 1e9:.0f} GB); "
                           f"use a larger device or fewer weight bytes")
    return int(free // model.kv_bytes_per_token)


@dataclasses.dataclass(frozen=True)
class StepCost:
    gemm_flops: float
    attn_flops: float
    bytes: float
    seconds: float


class StepTimeModel:
    """Seconds one engine step takes on ``device`` for ``model`` (see the module doc)."""

    def __init__(self, model: ModelConfig, device: Device, cost: CostParams = CostParams()):
        self.model, self.device, self.cost = model, device, cost
        self.gemm_rate = device.flops(model.compute_dtype) * cost.compute_efficiency
        self.attn_rate = device.flops("bf16") * cost.compute_efficiency
        self.byte_rate = device.mem_bandwidth * cost.memory_efficiency
        m = model
        self._dense_per_token = m.attn_params + m.always_on_ffn_params + m.top_k * m.expert_params
        self._fixed_bytes = (m.attn_params + m.always_on_ffn_params) * m.weight_bytes
        self._expert_bytes = m.expert_params * m.weight_bytes
        self._attn_pair_flops = 4 * m.num_heads * m.head_dim
        self._kv_layer = m.kv_bytes_per_token_layer

    def active_experts(self, tokens: np.ndarray) -> np.ndarray:
        m = self.model
        if not m.num_experts:
            return np.zeros_like(tokens, dtype=np.float64)
        return m.num_experts * (1.0 - (1.0 - m.top_k / m.num_experts) ** tokens)

    def step_cost(self, plan: StepPlan) -> StepCost:
        m = self.model
        L = m.num_layers
        tokens = np.zeros(L)
        pairs = np.zeros(L)
        kv_read = np.zeros(L)
        if plan.decodes:
            ctx = float(sum(r.num_tokens for r in plan.decodes))
            tokens += len(plan.decodes)
            pairs += ctx
            kv_read += ctx
        for chunk in plan.prefills:
            n, s = chunk.num_tokens, chunk.start
            if chunk.layer_group is None:
                layers = slice(0, L)
            else:
                g, G = chunk.layer_group, chunk.num_layer_groups
                layers = slice(g * L // G, (g + 1) * L // G)
            tokens[layers] += n
            pairs[layers] += n * s + n * (n + 1) / 2
            kv_read[layers] += s
        used = tokens > 0
        gemm = 2.0 * tokens * self._dense_per_token
        attn = self._attn_pair_flops * pairs
        nbytes = np.where(used, self._fixed_bytes + self.active_experts(tokens) * self._expert_bytes, 0.0)
        nbytes += (kv_read + tokens) * self._kv_layer
        layer_time = np.maximum(gemm / self.gemm_rate + attn / self.attn_rate, nbytes / self.byte_rate)
        sampled = len(plan.decodes) + sum(1 for c in plan.prefills if c.samples)
        head_flops = 2.0 * sampled * m.vocab * m.hidden
        head_bytes = m.vocab * m.hidden * m.weight_bytes if sampled else 0.0
        head_time = max(head_flops / self.gemm_rate, head_bytes / self.byte_rate)
        seconds = float(layer_time.sum()) + head_time + self.cost.step_overhead_s
        return StepCost(float(gemm.sum()) + head_flops, float(attn.sum()), float(nbytes.sum()) + head_bytes,
                        seconds)


class SimulatedExecutor:
    """An executor whose step takes the modelled time and whose requests stop at their trace length.

    ``output_lengths`` maps request id -> the number of tokens the request generates before its stop
    token; tokens before it are arbitrary ids other than ``eos_token_id``.
    """

    def __init__(self, model: ModelConfig, device: Device, output_lengths: dict[str, int], *,
                 eos_token_id: int = 0, cost: CostParams = CostParams()):
        self.time_model = StepTimeModel(model, device, cost)
        self.output_lengths = output_lengths
        self.eos_token_id = eos_token_id
        self.vocab = model.vocab
        self.busy_seconds = 0.0

    def execute(self, plan: StepPlan) -> tuple[dict[str, int], float]:
        seconds = self.time_model.step_cost(plan).seconds
        self.busy_seconds += seconds
        tokens = {}
        for req in plan.sampling_requests():
            target = self.output_lengths.get(req.request_id)
            if target is None:
                raise ServingError(f"simulated executor: no output length for request {req.request_id}")
            position = req.num_output_tokens
            if position + 1 >= target:
                tokens[req.request_id] = self.eos_token_id
            else:   # any id but the stop token; varied so recomputed outputs hash like real text
                tokens[req.request_id] = 1 + (position * 7919 + len(req.request_id)) % (self.vocab - 1)
        return tokens, seconds


@dataclasses.dataclass
class SimulationResult:
    scheduler: str
    rate: float
    model: str
    device: str
    num_blocks: int
    block_size: int
    capacity_tokens: int
    metrics: RunMetrics
    num_steps: int
    busy_seconds: float
    wall_seconds: float
    records: list[RequestRecord] = dataclasses.field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("scheduler", "rate", "model", "device", "num_blocks", "block_size",
                                            "capacity_tokens", "num_steps", "busy_seconds", "wall_seconds")}
        d["metrics"] = self.metrics.to_dict()
        return d


def _default_max_tokens(trace: Trace) -> int:
    # The client's cap on output: the smallest power of two that truncates no request of the trace.
    return 1 << max(0, math.ceil(math.log2(max(1, trace.max_output_len))))


def simulate(trace: Trace, model: str | ModelConfig, device: str | Device, scheduler: str | Scheduler,
             rate: float | None = None, *, num_requests: int | None = None, max_tokens: int | None = None,
             block_size: int = 16, scheduler_config: SchedulerConfig | None = None, slo: SLO | None = None,
             cost: CostParams = CostParams(), num_blocks: int | None = None,
             enable_prefix_caching: bool = True, abort_missed: bool = False,
             check_invariants: bool = False) -> SimulationResult:
    """Replay ``trace`` (its first ``num_requests``, at ``rate`` requests/s if given) through the
    engine with the step-time model of ``model`` on ``device``; returns the run's metrics.

    ``max_tokens`` is each request's cap (default: the smallest power of two >= the trace's longest
    output). ``num_blocks`` overrides the KV capacity computed from the device memory. Without
    ``enable_prefix_caching`` no block is shared or kept after release, so a preempted request pays
    its full recompute (as engines without a prefix cache do). With ``abort_missed`` the engine drops
    each request the moment it has missed the SLO (see ``EngineCore``), as an SLA-bound server does.
    """
    model = get_model_config(model)
    device = resolve_device(device)
    if num_requests is not None:
        trace = trace.head(num_requests)
    if rate is not None:
        trace = trace.with_rate(rate)
    sched = scheduler if isinstance(scheduler, Scheduler) else get_scheduler(scheduler, scheduler_config)
    if num_blocks is None:
        num_blocks = kv_capacity_tokens(model, device, cost) // block_size
    blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching)
    cap = max_tokens or _default_max_tokens(trace)
    lengths = {f"r{i}": min(r.output_len, cap) for i, r in enumerate(trace.requests)}
    executor = SimulatedExecutor(model, device, lengths, cost=cost)
    slo = slo or SLO()
    engine = EngineCore(sched, blocks, executor,
                        abort_missed=slo.scaled(trace.time_scale) if abort_missed else None)
    records: list[RequestRecord] = []
    engine.on_finish.append(lambda req: records.append(RequestRecord.from_request(req)))

    started = time.perf_counter()
    arrivals = [r.arrival for r in trace.requests]
    stop_ids = (executor.eos_token_id,)
    i, n = 0, len(arrivals)
    while i < n or engine.has_unfinished:
        now = engine.now()
        while i < n and arrivals[i] <= now:
            req = Request(f"r{i}", trace.prompt_token_ids(i), SamplingParams(max_tokens=cap, stop_token_ids=stop_ids),
                          arrival_time=arrivals[i])
            try:
                engine.add_request(req)
            except ServingError:
                records.append(RequestRecord.rejected(req.request_id, req.arrival_time, req.num_prompt_tokens))
            i += 1
        if not engine.has_unfinished:
            if i < n:
                engine.advance_to(arrivals[i])
            continue
        result = engine.step()
        if check_invariants:
            blocks.check_invariants()
        if result.plan.is_empty:
            if i >= n:
                raise ServingError(f"simulation stalled: {engine.num_waiting} requests wait but none can be "
                                   f"scheduled ({sched.name}, {num_blocks} blocks)")
            engine.advance_to(arrivals[i])
    metrics = summarize(records, slo, time_scale=trace.time_scale, num_preemptions=engine.num_preemptions)
    return SimulationResult(sched.name, trace.rate, model.name, device.name, num_blocks, block_size,
                            num_blocks * block_size, metrics, engine.num_steps, executor.busy_seconds,
                            time.perf_counter() - started, records)


def sweep(trace: Trace, model: str | ModelConfig, device: str | Device, schedulers: Sequence[str],
          rates: Iterable[float], *, progress: Callable[[SimulationResult], None] | None = None,
          **kwargs) -> list[SimulationResult]:
    """``simulate`` for every (scheduler, rate) pair, rates in the outer loop."""
    results = []
    for rate in rates:
        for name in schedulers:
            res = simulate(trace, model, device, name, rate, **kwargs)
            results.append(res)
            if progress:
                progress(res)
    return results


def write_sweep(results: Sequence[SimulationResult], out_dir: str | Path, *, title: str = "") -> tuple[Path, Path]:
    """Write ``simulate.json`` (every run's metrics) and ``goodput_vs_rate.png``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "simulate.json"
    json_path.write_text(json.dumps({"title": title, "runs": [r.to_dict() for r in results]}, indent=2))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_good, ax_ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r.scheduler for r in results):
        runs = sorted((r for r in results if r.scheduler == name), key=lambda r: r.rate)
        rates = [r.rate for r in runs]
        ax_good.plot(rates, [r.metrics.goodput_req_s for r in runs], marker="o", label=name)
        ax_ttft.plot(rates, [r.metrics.ttft_p99 for r in runs], marker="o", label=name)
    ax_good.set_xlabel("request rate (req/s)")
    ax_good.set_ylabel("goodput (req/s meeting SLO)")
    ax_good.set_title("goodput vs rate")
    ax_ttft.set_xlabel("request rate (req/s)")
    ax_ttft.set_ylabel("TTFT p99 (s)")
    ax_ttft.set_yscale("log")
    ax_ttft.set_title("p99 time to first token")
    for ax in (ax_good, ax_ttft):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png_path = out / "goodput_vs_rate.png"
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return json_path, png_path
