"""A serving request: what the client asked for, where it is in its life, and when each token came.

The engine never looks at how long a request *will* be; everything here is what is known so far.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence

import numpy as np

from dsl.errors import ServingError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop (OpenAI-style knobs)."""

    max_tokens: int = 16
    temperature: float = 0.0          # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ServingError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise ServingError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ServingError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ServingError(f"seed must be an integer or None, got {self.seed!r}")
        stops = tuple(self.stop_token_ids)
        if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0 for t in stops):
            raise ServingError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in stops))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class SLO:
    """Latency targets of a request: time to first token and the largest gap between two tokens."""

    ttft_s: float = 10.0
    max_gap_s: float = 1.5

    def __post_init__(self):
        for field in ("ttft_s", "max_gap_s"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ServingError(f"SLO {field} must be a positive number of seconds, got {value!r}")

    def scaled(self, factor: float) -> SLO:
        return SLO(self.ttft_s * factor, self.max_gap_s * factor)

    def missed(self, request: Request, now: float) -> bool:
        """True when ``request`` can no longer meet the targets: no first token by the TTFT limit,
        or no next token within the gap limit of its last one."""
        times = request.token_times
        if not times:
            return now - request.arrival_time > self.ttft_s
        return now - times[-1] > self.max_gap_s


class RequestState(enum.Enum):
    WAITING = "waiting"        # arrived, holds no KV blocks
    RUNNING = "running"        # admitted: holds KV blocks, prefilling or decoding
    PREEMPTED = "preempted"    # evicted by recompute: holds nothing, will prefill prompt + outputs again
    FINISHED = "finished"
    CANCELLED = "cancelled"


_ALLOWED = {
    RequestState.WAITING: {RequestState.RUNNING, RequestState.CANCELLED},
    RequestState.RUNNING: {RequestState.PREEMPTED, RequestState.FINISHED, RequestState.CANCELLED},
    RequestState.PREEMPTED: {RequestState.RUNNING, RequestState.CANCELLED},
    RequestState.FINISHED: set(),
    RequestState.CANCELLED: set(),
}


class Request:
    """One generation request and its progress.

    ``num_computed_tokens`` counts the tokens (prompt first, then outputs) whose KV is in the cache.
    A step processes tokens ``[num_computed_tokens, num_tokens)`` or a chunk of them; when a step
    reaches ``num_tokens`` the model samples the next output token. In decode, exactly one token
    (the last sampled one) is uncomputed.
    """

    def __init__(self, request_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams | None = None,
                 *, arrival_time: float = 0.0):
        if not isinstance(request_id, str) or not request_id:
            raise ServingError(f"request id must be a non-empty string, got {request_id!r}")
        try:
            prompt = np.asarray(prompt_token_ids, dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ServingError(f"request {request_id}: prompt must be a sequence of token ids ({exc})") from None
        if prompt.ndim != 1 or prompt.size == 0:
            raise ServingError(f"request {request_id}: prompt must be a non-empty 1-D sequence of token ids")
        if (prompt < 0).any():
            raise ServingError(f"request {request_id}: token ids must be non-negative")
        prompt.flags.writeable = False
        self.request_id = request_id
        self.prompt_token_ids = prompt
        self._num_prompt = int(prompt.size)   # hot in the scheduler loop: keep it a plain int
        self.sampling = sampling or SamplingParams()
        self.arrival_time = float(arrival_time)
        self.state = RequestState.WAITING
        self.output_token_ids: list[int] = []
        self.token_times: list[float] = []
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.finish_reason: str | None = None     # "stop" | "length" | "cancelled" | "slo"
        self.num_computed_tokens = 0
        self.num_preemptions = 0
        self.admitted_time: float | None = None   # last admission; newest-first preemption uses it
        # Layered prefill: how many layer groups of the current prefill have run (0 when not layered).
        self.layer_groups_done = 0
        # Prefix-hash chain of this request's full blocks, filled lazily by the block manager.
        self.block_hashes: list[bytes] = []

    # --- sizes -------------------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return self._num_prompt

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return self._num_prompt + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self._num_prompt + len(self.output_token_ids) - self.num_computed_tokens

    @property
    def in_decode(self) -> bool:
        """True once the prompt (and, after a preemption, the earlier outputs) are all in the cache."""
        out = len(self.output_token_ids)
        return out > 0 and self._num_prompt + out - self.num_computed_tokens == 1

    def token_ids(self, start: int, stop: int) -> np.ndarray:
        """Token ids at positions [start, stop) of prompt + outputs."""
        p = self._num_prompt
        if stop <= p:
            return self.prompt_token_ids[start:stop]
        out = np.asarray(self.output_token_ids[max(0, start - p):stop - p], dtype=np.int64)
        if start >= p:
            return out
        return np.concatenate([self.prompt_token_ids[start:], out])

    @property
    def is_done(self) -> bool:
        return self.state in (RequestState.FINISHED, RequestState.CANCELLED)

    # --- life cycle --------------------------------------------------------------------------
    def transition(self, new: RequestState, now: float) -> None:
        if new not in _ALLOWED[self.state]:
            raise ServingError(f"request {self.request_id}: cannot go from {self.state.value} to {new.value}")
        self.state = new
        if new is RequestState.RUNNING:
            self.admitted_time = now
        elif new is RequestState.PREEMPTED:
            self.num_preemptions += 1
            self.num_computed_tokens = 0
            self.layer_groups_done = 0
        elif new in (RequestState.FINISHED, RequestState.CANCELLED):
            self.finish_time = now
            if new is RequestState.CANCELLED:
                self.finish_reason = "cancelled"

    def append_token(self, token_id: int, now: float) -> str | None:
        """Record a sampled token; returns the finish reason if this token ends the request."""
        self.output_token_ids.append(int(token_id))
        self.token_times.append(now)
        if self.first_token_time is None:
            self.first_token_time = now
        if int(token_id) in self.sampling.stop_token_ids:
            return "stop"
        if len(self.output_token_ids) >= self.sampling.max_tokens:
            return "length"
        return None

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.state.value}, prompt={self.num_prompt_tokens}, "
                f"out={self.num_output_tokens}, computed={self.num_computed_tokens})")
