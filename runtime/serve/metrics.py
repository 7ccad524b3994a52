"""Serving metrics: per-request latencies, run summaries with goodput, and Prometheus exposition.

Definitions (times in seconds):
* TTFT: first token time - arrival (queueing included).
* TBT: the gaps between consecutive output tokens of a request; a request's mean gap is its TPOT.
* max gap: a request's largest gap between consecutive tokens (a preemption shows up here).
* goodput: requests per second that finished and met TTFT <= 10 s and max gap <= 1.5 s (the
  Past-Future paper's SLO), with both limits multiplied by the trace's time scale. The time base is
  the run's span, from the first arrival to the last finish.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np

from runtime.serve.engine_core import FinishEvent, TokenEvent
from runtime.serve.request import SLO, Request, RequestState


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    request_id: str
    arrival: float
    token_times: tuple[float, ...]
    finish_time: float | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_preemptions: int = 0

    @classmethod
    def from_request(cls, req: Request) -> RequestRecord:
        return cls(req.request_id, req.arrival_time, tuple(req.token_times), req.finish_time,
                   req.finish_reason if req.state in (RequestState.FINISHED, RequestState.CANCELLED) else None,
                   req.num_prompt_tokens, req.num_preemptions)

    @classmethod
    def rejected(cls, request_id: str, arrival: float, num_prompt_tokens: int) -> RequestRecord:
        return cls(request_id, arrival, (), None, "rejected", num_prompt_tokens)

    @property
    def finished(self) -> bool:
        return self.finish_reason in ("stop", "length")

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_times)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival if self.token_times else None

    @property
    def gaps(self) -> np.ndarray:
        return np.diff(np.asarray(self.token_times, dtype=np.float64))

    @property
    def tpot(self) -> float | None:
        """Mean gap between tokens after the first (None with fewer than two tokens)."""
        gaps = self.gaps
        return float(gaps.mean()) if gaps.size else None

    @property
    def max_gap(self) -> float:
        gaps = self.gaps
        return float(gaps.max()) if gaps.size else 0.0

    def meets(self, slo: SLO) -> bool:
        return self.finished and self.ttft <= slo.ttft_s and self.max_gap <= slo.max_gap_s


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0-100, linear interpolation); NaN for no values."""
    arr = np.asarray(list(values), dtype=np.float64)
    return float(np.percentile(arr, q)) if arr.size else math.nan


@dataclasses.dataclass(frozen=True)
class RunMetrics:
    num_requests: int
    num_finished: int
    num_met_slo: int
    duration_s: float
    throughput_tok_s: float       # output tokens per second
    throughput_req_s: float       # finished requests per second
    goodput_req_s: float
    ttft_p50: float
    ttft_p99: float
    tbt_p50: float                # over all token gaps
    tbt_p99: float
    max_gap_p99: float            # over requests
    num_preemptions: int
    slo: SLO

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["slo"] = dataclasses.asdict(self.slo)
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def summarize(records: Sequence[RequestRecord], slo: SLO = SLO(), *, time_scale: float = 1.0,
              num_preemptions: int | None = None) -> RunMetrics:
    """Aggregate per-request records; ``time_scale`` scales the SLO (see module doc)."""
    slo = slo.scaled(time_scale)
    finished = [r for r in records if r.finished]
    if records:
        start = min(r.arrival for r in records)
        end_candidates = [r.finish_time for r in records if r.finish_time is not None]
        end = max(end_candidates) if end_candidates else start
        duration = max(end - start, 0.0)
    else:
        duration = 0.0
    met = sum(1 for r in finished if r.meets(slo))
    tokens = sum(r.num_output_tokens for r in finished)

    def per_second(x: float) -> float:
        return x / duration if duration > 0 else 0.0

    all_gaps = np.concatenate([r.gaps for r in finished]) if finished else np.zeros(0)
    return RunMetrics(
        num_requests=len(records), num_finished=len(finished), num_met_slo=met, duration_s=duration,
        throughput_tok_s=per_second(tokens), throughput_req_s=per_second(len(finished)),
        goodput_req_s=per_second(met),
        ttft_p50=percentile((r.ttft for r in finished), 50), ttft_p99=percentile((r.ttft for r in finished), 99),
        tbt_p50=percentile(all_gaps, 50), tbt_p99=percentile(all_gaps, 99),
        max_gap_p99=percentile((r.max_gap for r in finished), 99),
        num_preemptions=(sum(r.num_preemptions for r in records) if num_preemptions is None
                         else num_preemptions),
        slo=slo)


class PrometheusMetrics:
    """Live engine metrics in Prometheus text format (one registry per engine, not the global one).

    Feed it with ``observe_step(engine, step_result)`` after every step; ``render()`` gives the body
    of ``/metrics``.
    """

    TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0)
    ITL_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 1.5, 5.0)

    def __init__(self, prefix: str = "kdsl"):
        import prometheus_client as prom  # the [serve] extra; the simulator does not need it

        self._prom = prom
        self.registry = prom.CollectorRegistry(auto_describe=True)
        self.queue = prom.Gauge(f"{prefix}_queue_length", "Requests waiting to be scheduled",
                                registry=self.registry)
        self.running = prom.Gauge(f"{prefix}_running_requests", "Requests in the running batch",
                                  registry=self.registry)
        self.kv_usage = prom.Gauge(f"{prefix}_kv_cache_usage_ratio", "Fraction of KV cache blocks in use",
                                   registry=self.registry)
        self.ttft = prom.Histogram(f"{prefix}_time_to_first_token_seconds", "Time to first token",
                                   buckets=self.TTFT_BUCKETS, registry=self.registry)
        self.itl = prom.Histogram(f"{prefix}_inter_token_latency_seconds", "Time between output tokens",
                                  buckets=self.ITL_BUCKETS, registry=self.registry)
        self.tokens = prom.Counter(f"{prefix}_generated_tokens", "Output tokens generated",
                                   registry=self.registry)
        self.preemptions = prom.Counter(f"{prefix}_preemptions", "Requests preempted by recompute",
                                        registry=self.registry)
        self.finished = prom.Counter(f"{prefix}_finished_requests", "Requests that ended, by reason",
                                     ["reason"], registry=self.registry)

    def observe_step(self, engine, result) -> None:
        for req in result.plan.sampling_requests():
            times = req.token_times
            if len(times) == 1:
                self.ttft.observe(times[0] - req.arrival_time)
            elif len(times) >= 2:
                self.itl.observe(times[-1] - times[-2])
        n_tokens = sum(1 for e in result.events if isinstance(e, TokenEvent))
        if n_tokens:
            self.tokens.inc(n_tokens)
        if result.plan.preempted:
            self.preemptions.inc(len(result.plan.preempted))
        for e in result.events:
            if isinstance(e, FinishEvent):
                self.finished.labels(reason=e.reason).inc()
        self.observe_engine(engine)

    def observe_engine(self, engine) -> None:
        self.queue.set(engine.num_waiting)
        self.running.set(engine.num_running)
        self.kv_usage.set(engine.blocks.usage)

    def observe_cancel(self) -> None:
        self.finished.labels(reason="cancelled").inc()

    def render(self) -> str:
        return self._prom.generate_latest(self.registry).decode()

    content_type = "text/plain; version=0.0.4; charset=utf-8"
