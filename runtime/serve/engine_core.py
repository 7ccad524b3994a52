"""The step loop shared by the real engine and the simulator.

``EngineCore`` owns the queues; each ``step()`` asks the scheduler for a plan, hands it to an
executor (the real model, or the simulator's step-time model), then applies what came back: KV
progress, new tokens, stop conditions, releases. The executor never changes request state.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Protocol

from dsl.errors import ServingError
from runtime.serve.block_manager import BlockManager
from runtime.serve.request import SLO, Request, RequestState
from runtime.serve.scheduler import Scheduler, StepPlan


class Executor(Protocol):
    """Runs a step. A model executor holds the KV tensors and a reference to the block manager:
    it first performs ``plan.block_copies`` (copy-on-write), then computes the tokens of
    ``plan.decodes`` and ``plan.prefills`` writing KV into ``block_manager.block_table(request_id)``
    slots, and samples (``runtime.serve.sampling.sample_tokens``) for ``plan.sampling_requests()``."""

    def execute(self, plan: StepPlan) -> tuple[dict[str, int], float]:
        """Run the plan; return the sampled token of each request in ``plan.sampling_requests()``
        (by request id) and the seconds the step took."""


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token_id: int
    index: int          # position in the request's output
    time: float


@dataclasses.dataclass(frozen=True)
class FinishEvent:
    request_id: str
    reason: str         # "stop" | "length" | "cancelled" | "slo" (aborted past its deadline)
    time: float


@dataclasses.dataclass
class StepResult:
    plan: StepPlan
    events: list[TokenEvent | FinishEvent]
    step_seconds: float
    now: float


class EngineCore:
    """Continuous batching over a scheduler, a block manager and an executor.

    ``clock``: a function returning seconds (e.g. ``time.monotonic``) for a real engine; without one
    the engine keeps a virtual clock that advances by each step's reported seconds (simulation).

    ``abort_missed``: an SLO under which the engine gives up on a request as soon as it has missed
    it (no first token by the TTFT limit, or a gap since its last token over the limit), frees its
    blocks and ends it with reason "slo". Work on a request that can no longer count toward goodput
    only delays the others; an SLA-bound server drops it, as LightLLM's does in the Past-Future
    evaluation. Off by default: every request runs to its end.
    """

    def __init__(self, scheduler: Scheduler, block_manager: BlockManager, executor: Executor, *,
                 clock: Callable[[], float] | None = None, max_model_len: int | None = None,
                 abort_missed: SLO | None = None):
        self.scheduler = scheduler
        self.blocks = block_manager
        self.executor = executor
        self._clock = clock
        self._virtual_now = 0.0
        self.max_model_len = min(max_model_len or block_manager.capacity_tokens, block_manager.capacity_tokens)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.live: dict[str, Request] = {}
        self.abort_missed = abort_missed
        self.num_preemptions = 0
        self.num_slo_aborts = 0
        self.num_steps = 0
        self.on_finish: list[Callable[[Request], None]] = []   # observers (metrics, servers)

    # --- time --------------------------------------------------------------------------------
    def now(self) -> float:
        return self._clock() if self._clock is not None else self._virtual_now

    def advance_to(self, t: float) -> None:
        """Move the virtual clock forward to ``t`` (idle time in a simulation)."""
        if self._clock is not None:
            raise ServingError("advance_to needs the virtual clock; this engine runs on a real clock")
        self._virtual_now = max(self._virtual_now, float(t))

    # --- requests ----------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        rid = request.request_id
        if rid in self.live:
            raise ServingError(f"request id '{rid}' is already in the engine")
        if request.state is not RequestState.WAITING or request.output_token_ids:
            raise ServingError(f"request {rid} is {request.state.value}; only new requests can be added")
        need = request.num_prompt_tokens + request.sampling.max_tokens
        if need > self.max_model_len:
            raise ServingError(f"request {rid}: prompt ({request.num_prompt_tokens} tokens) + max_tokens "
                               f"({request.sampling.max_tokens}) exceeds the context limit of "
                               f"{self.max_model_len} tokens")
        self.live[rid] = request
        self.waiting.append(request)

    def cancel(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks; False if it is unknown or already done."""
        req = self.live.pop(request_id, None)
        if req is None:
            return False
        if req in self.waiting:
            self.waiting.remove(req)
        else:
            self.running.remove(req)
        self.blocks.free(req)
        req.transition(RequestState.CANCELLED, self.now())
        return True

    def _abort_missed(self, now: float) -> list[FinishEvent]:
        slo = self.abort_missed
        late = [r for r in self.live.values() if slo.missed(r, now)]
        if not late:
            return []
        gone = {id(r) for r in late}
        self.waiting = collections.deque(r for r in self.waiting if id(r) not in gone)
        self.running = [r for r in self.running if id(r) not in gone]
        events = []
        for req in late:
            del self.live[req.request_id]
            self.blocks.free(req)
            req.transition(RequestState.CANCELLED, now)
            req.finish_reason = "slo"
            events.append(FinishEvent(req.request_id, "slo", now))
            for observer in self.on_finish:
                observer(req)
        self.num_slo_aborts += len(late)
        return events

    @property
    def has_unfinished(self) -> bool:
        return bool(self.live)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # --- the step ----------------------------------------------------------------------------
    def step(self) -> StepResult:
        start = self.now()
        aborted = self._abort_missed(start) if self.abort_missed is not None else []
        plan = self.scheduler.schedule(self.waiting, self.running, self.blocks, start)
        self.num_preemptions += len(plan.preempted)
        if plan.is_empty:
            return StepResult(plan, aborted, 0.0, start)
        samplers = plan.sampling_requests()
        tokens, seconds = self.executor.execute(plan)
        if self._clock is None:
            self._virtual_now += float(seconds)
        now = self.now()
        self.num_steps += 1

        expected = {r.request_id for r in samplers}
        if set(tokens) != expected:
            missing, extra = sorted(expected - set(tokens)), sorted(set(tokens) - expected)
            raise ServingError(f"executor returned tokens for the wrong requests (missing {missing[:5]}, "
                               f"unexpected {extra[:5]})")

        block_size = self.blocks.block_size
        for req in plan.decodes:
            req.num_computed_tokens += 1
            if req.num_computed_tokens % block_size == 0:   # a block just filled: offer it to the cache
                self.blocks.mark_computed(req)
        for chunk in plan.prefills:
            req = chunk.request
            if chunk.finishes_forward:
                req.num_computed_tokens += chunk.num_tokens
                req.layer_groups_done = 0
                self.blocks.mark_computed(req)
            else:
                req.layer_groups_done += 1

        events: list[TokenEvent | FinishEvent] = aborted
        finished: list[Request] = []
        for req in samplers:
            token = tokens[req.request_id]
            reason = req.append_token(token, now)
            events.append(TokenEvent(req.request_id, int(token), req.num_output_tokens - 1, now))
            if reason is not None:
                req.finish_reason = reason
                finished.append(req)
                events.append(FinishEvent(req.request_id, reason, now))
        if finished:
            done = {id(r) for r in finished}
            self.running = [r for r in self.running if id(r) not in done]
            for req in finished:
                self.blocks.free(req)
                req.transition(RequestState.FINISHED, now)
                del self.live[req.request_id]
                self.scheduler.on_finished(req)
                for observer in self.on_finish:
                    observer(req)
        return StepResult(plan, events, float(seconds), now)
