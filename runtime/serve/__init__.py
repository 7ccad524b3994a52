"""Serving: requests, the paged KV cache block manager, schedulers, the engine step loop, traces,
metrics and the GPU-scale simulator. The model executor and the HTTP server plug in on top."""

from runtime.serve.block_manager import BlockManager
from runtime.serve.engine_core import EngineCore, Executor, FinishEvent, StepResult, TokenEvent
from runtime.serve.metrics import SLO, PrometheusMetrics, RequestRecord, RunMetrics, summarize
from runtime.serve.request import Request, RequestState, SamplingParams
from runtime.serve.scheduler import (
                                     SCHEDULERS,
                                     PrefillChunk,
                                     Scheduler,
                                     SchedulerConfig,
                                     StepPlan,
                                     get_scheduler,
)
from runtime.serve.traces import Trace, TraceRequest, load_trace

__all__ = [
                                     "SCHEDULERS",
                                     "SLO",
                                     "BlockManager",
                                     "EngineCore",
                                     "Executor",
                                     "FinishEvent",
                                     "PrefillChunk",
                                     "PrometheusMetrics",
                                     "Request",
                                     "RequestRecord",
                                     "RequestState",
                                     "RunMetrics",
                                     "SamplingParams",
                                     "Scheduler",
                                     "SchedulerConfig",
                                     "StepPlan",
                                     "StepResult",
                                     "TokenEvent",
                                     "Trace",
                                     "TraceRequest",
                                     "get_scheduler",
                                     "load_trace",
                                     "summarize",
]
