"""Which requests run in the next step: continuous batching with chunked prefill and preemption.

Every policy shares one step structure (``Scheduler.schedule``):

1. requests already decoding each get one token, oldest first; when the KV cache cannot take a
   request's next token, the newest running request is preempted by recompute (its blocks freed,
   it goes back to the front of the waiting queue and later prefills prompt + outputs again);
2. prefills already under way continue (chunks from the per-step token budget);
3. waiting requests are admitted in arrival order (preempted ones first) while the *policy* agrees,
   the blocks fit, the batch is below ``max_running`` and the budget lasts; admission stops at the
   first refusal, so no request overtakes an older one.

Policies differ only in the admission rule of step 3 (and layered prefill in how a prefill runs).
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import math
from typing import ClassVar

import numpy as np

from dsl.errors import ServingError
from runtime.serve.block_manager import BlockManager
from runtime.serve.request import Request, RequestState


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_tokens_per_step: int = 2048   # chunked-prefill budget: decodes + prefill tokens per step
    max_running: int = 256            # most requests in a batch
    num_layer_groups: int = 8         # layered prefill: G contiguous groups of layers
    seed: int = 0                     # randomness of past-future's sampling

    def __post_init__(self):
        for field in ("max_tokens_per_step", "max_running", "num_layer_groups"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ServingError(f"scheduler config: {field} must be a positive integer, got {value!r}")


@dataclasses.dataclass
class PrefillChunk:
    """Tokens ``[start, start + num_tokens)`` of a request go through the model (or, for layered
    prefill, through layer group ``layer_group`` of ``num_layer_groups``) this step."""

    request: Request
    start: int
    num_tokens: int
    layer_group: int | None = None
    num_layer_groups: int = 1
    # Fixed when the plan is made (the request grows once the step is applied).
    samples: bool = dataclasses.field(init=False)

    def __post_init__(self):
        self.samples = self.finishes_forward and self.start + self.num_tokens == self.request.num_tokens

    @property
    def finishes_forward(self) -> bool:
        """True when these tokens leave the last layer this step (their KV is then complete)."""
        return self.layer_group is None or self.layer_group == self.num_layer_groups - 1


@dataclasses.dataclass
class StepPlan:
    """What one engine step runs. ``decodes`` each process their newest token through all layers."""

    decodes: list[Request] = dataclasses.field(default_factory=list)
    prefills: list[PrefillChunk] = dataclasses.field(default_factory=list)
    preempted: list[Request] = dataclasses.field(default_factory=list)
    block_copies: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.num_tokens for c in self.prefills)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills

    def sampling_requests(self) -> list[Request]:
        """The requests that get a new token from this step (``samples`` of a chunk is set when the
        plan is made, so this stays right after the engine applied the step)."""
        return list(self.decodes) + [c.request for c in self.prefills if c.samples]


class Scheduler(abc.ABC):
    """Shared step structure; subclasses give the admission rule (``admits``)."""

    name: ClassVar[str]

    def __init__(self, config: SchedulerConfig | None = None):
        self.config = config or SchedulerConfig()

    # --- policy hooks ------------------------------------------------------------------------
    @abc.abstractmethod
    def admits(self, candidate: Request, running: list[Request], blocks: BlockManager) -> bool:
        """The policy's admission rule for the head of the waiting queue (memory is checked apart)."""

    def begin_admission(self, running: list[Request], blocks: BlockManager) -> None:
        """Called once per step before the first ``admits`` (past-future samples the batch here)."""

    def on_admitted(self, request: Request) -> None:
        """Called after ``request`` was admitted into the batch."""

    def on_finished(self, request: Request) -> None:
        """Called when a request finished normally (not cancelled)."""

    def prefill_chunk(self, request: Request, budget: int, first: bool) -> tuple[PrefillChunk | None, int]:
        """The next piece of the request's prefill within ``budget`` tokens, and what it costs of the
        budget. ``first``: no other prefill runs this step (a prefill must always be able to move)."""
        if budget <= 0 or request.num_uncomputed_tokens <= 0:
            return None, 0
        n = min(budget, request.num_uncomputed_tokens)
        return PrefillChunk(request, request.num_computed_tokens, n), n

    # --- the step ----------------------------------------------------------------------------
    def schedule(self, waiting: collections.deque[Request], running: list[Request], blocks: BlockManager,
                 now: float = 0.0) -> StepPlan:
        """Decide this step's batch; mutates ``waiting``/``running`` (admissions, preemptions) and
        the block manager (allocations, decode slots, frees of preempted requests)."""
        plan = StepPlan()
        budget = self.config.max_tokens_per_step

        # 1. Decodes, oldest first; make room by preempting the newest.
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            if not req.in_decode:
                i += 1
                continue
            while not blocks.can_append_slot(req):
                victim = self._preempt_newest(waiting, running, blocks, plan, now)
                if victim is req:
                    break
            else:
                plan.block_copies.extend(blocks.append_slot(req))
                plan.decodes.append(req)
                budget -= 1
                i += 1

        # 2. Prefills under way, oldest first.
        for req in running:
            if req.in_decode:      # decoding (scheduled in 1., or left out by the budget)
                continue
            chunk, cost = self.prefill_chunk(req, budget, first=not plan.prefills)
            if chunk is None:
                continue
            plan.prefills.append(chunk)
            budget -= cost

        # 3. Admission in arrival order (preempted requests were put back at the front).
        if waiting and budget > 0 and len(running) < self.config.max_running:
            self.begin_admission(running, blocks)
        while waiting and budget > 0 and len(running) < self.config.max_running:
            cand = waiting[0]
            # An empty batch takes its head request whatever the policy says, or nothing would move.
            if running and not self.admits(cand, running, blocks):
                break
            if not blocks.can_allocate(cand):
                break
            chunk_probe = self._probe_budget(cand, budget, first=not plan.prefills)
            if not chunk_probe:
                break
            waiting.popleft()
            cached = blocks.allocate(cand)
            cand.num_computed_tokens = cached
            cand.transition(RequestState.RUNNING, now)
            running.append(cand)
            self.on_admitted(cand)
            chunk, cost = self.prefill_chunk(cand, budget, first=not plan.prefills)
            plan.prefills.append(chunk)
            budget -= cost
        return plan

    def _probe_budget(self, cand: Request, budget: int, first: bool) -> bool:
        # Ask the policy's chunking whether the candidate could run this step, before allocating.
        chunk, _ = self.prefill_chunk(cand, budget, first)
        return chunk is not None

    @staticmethod
    def _preempt_newest(waiting, running, blocks: BlockManager, plan: StepPlan, now: float) -> Request:
        victim = running.pop()          # running is in admission order: the newest is last
        blocks.free(victim)
        victim.transition(RequestState.PREEMPTED, now)
        waiting.appendleft(victim)
        plan.preempted.append(victim)
        return victim


# --- policies --------------------------------------------------------------------------------
class AggressiveScheduler(Scheduler):
    """Admit while the tokens in the cache plus the candidate's fit in 99% of it; decode growth is
    paid later by preemption (vLLM's default behaviour)."""

    name = "aggressive"
    fill_limit = 0.99

    def admits(self, candidate, running, blocks):
        used_tokens = blocks.num_used_blocks * blocks.block_size
        return used_tokens + candidate.num_tokens <= self.fill_limit * blocks.capacity_tokens


class ConservativeScheduler(Scheduler):
    """Admit while every request's worst case (prompt + max_tokens) fits: never preempts, queues."""

    name = "conservative"

    def admits(self, candidate, running, blocks):
        def worst(r: Request) -> int:
            return r.num_prompt_tokens + r.sampling.max_tokens
        reserved = sum(worst(r) for r in running)
        return reserved + worst(candidate) <= blocks.capacity_tokens


def sample_final_lengths(history_sorted: np.ndarray, generated: np.ndarray, max_tokens: np.ndarray,
                         u: np.ndarray) -> np.ndarray:
    """Past-future's conditional sample of each request's final output length.

    For a request with ``d`` tokens generated, the candidates are ``[d] + (history values > d) +
    [max_tokens]``; a uniform ``u`` in [0, 1) picks a continuous position along that list and the
    length is interpolated linearly between its neighbours. The two end points are our reading of
    "interpolated" (LightLLM's implementation does the same): they bracket the range and keep the
    sample defined when no recorded length exceeds ``d``. The result is clipped to
    ``[d + 1, max_tokens]``. ``u`` has shape (samples, requests); so has the result.
    """
    h = history_sorted.size
    d = generated.astype(np.int64)
    mx = max_tokens.astype(np.int64)
    pos = np.searchsorted(history_sorted, d, side="right")
    above = h - pos                                   # values strictly above d
    p = u * (above + 1)                               # positions in [0, above + 1)
    left = np.floor(p).astype(np.int64)
    frac = p - left

    def value(k):
        inner = history_sorted[np.clip(pos + k - 1, 0, max(h - 1, 0))] if h else np.zeros_like(k)
        return np.where(k == 0, d, np.where(k >= above + 1, mx, inner))

    lo, hi = value(left), value(left + 1)
    final = np.rint(lo + (hi - lo) * frac).astype(np.int64)
    return np.clip(final, d + 1, np.maximum(mx, d + 1))


def peak_future_tokens(current_lens: np.ndarray, remaining: np.ndarray) -> int:
    """Peak KV tokens the batch will hold: sort by remaining r descending; when request j finishes,
    it and every request that lives longer hold their current tokens plus r_j new ones:
    need = max_j ( r_j * (j + 1) + sum_{i <= j} current_len_i )."""
    if len(current_lens) == 0:
        return 0
    order = np.argsort(-np.asarray(remaining), kind="stable")
    r = np.asarray(remaining, dtype=np.int64)[order]
    cum = np.cumsum(np.asarray(current_lens, dtype=np.int64)[order])
    return int((r * np.arange(1, r.size + 1) + cum).max())


class PastFutureScheduler(Scheduler):
    """Admit when the sampled peak future KV memory of the batch stays under 97% of the cache.

    The history holds the output lengths of the last 1000 finished requests, seeded with 500 x 512.
    Each step the running batch's final lengths are sampled S = min(5, floor(200 / |batch|) + 1)
    times; a candidate is appended to every sample (a fresh request draws from the whole history)
    and admitted if the largest peak over the samples is below the threshold.
    """

    name = "past-future"
    history_size = 1000
    seed_count, seed_length = 500, 512
    threshold = 0.97
    max_samplings, sampling_budget = 5, 200

    def __init__(self, config: SchedulerConfig | None = None):
        super().__init__(config)
        self.history: collections.deque[int] = collections.deque(
            [self.seed_length] * self.seed_count, maxlen=self.history_size)
        self.rng = np.random.default_rng(self.config.seed)
        self._lens: np.ndarray = np.zeros(0, dtype=np.int64)
        self._remaining: np.ndarray = np.zeros((1, 0), dtype=np.int64)
        self._pending: tuple[int, np.ndarray] | None = None

    def num_samplings(self, batch_size: int) -> int:
        if batch_size == 0:
            return self.max_samplings
        return min(self.max_samplings, self.sampling_budget // batch_size + 1)

    def on_finished(self, request):
        self.history.append(request.num_output_tokens)

    def _sample_remaining(self, reqs: list[Request], samples: int, whole_history_if_fresh: bool) -> np.ndarray:
        hist = np.sort(np.fromiter(self.history, dtype=np.int64, count=len(self.history)))
        d = np.array([r.num_output_tokens for r in reqs], dtype=np.int64)
        mx = np.array([r.sampling.max_tokens for r in reqs], dtype=np.int64)
        final = sample_final_lengths(hist, d, mx, self.rng.random((samples, len(reqs))))
        if whole_history_if_fresh:
            # A request that has generated nothing draws a recorded length as it is.
            fresh = d == 0
            if fresh.any():
                pick = hist[self.rng.integers(0, hist.size, size=(samples, int(fresh.sum())))]
                final[:, fresh] = np.clip(pick, 1, mx[fresh])
        return final - d

    def begin_admission(self, running, blocks):
        samples = self.num_samplings(len(running))
        self._lens = np.array([r.num_tokens for r in running], dtype=np.int64)
        self._remaining = self._sample_remaining(running, samples, whole_history_if_fresh=True)
        self._pending = None

    def peak_need(self, candidate: Request) -> int:
        """Largest sampled peak of (batch + candidate); remembers the candidate's draw for admission."""
        rem_c = self._sample_remaining([candidate], self._remaining.shape[0], whole_history_if_fresh=True)
        lens = np.append(self._lens, candidate.num_tokens)
        need = max(peak_future_tokens(lens, np.append(row, c)) for row, c in zip(self._remaining, rem_c[:, 0]))
        self._pending = (id(candidate), rem_c)
        return need

    def admits(self, candidate, running, blocks):
        return self.peak_need(candidate) < self.threshold * blocks.capacity_tokens

    def on_admitted(self, request):
        # Keep the admitted request's draw in the batch samples so later candidates see it.
        if self._pending is None or self._pending[0] != id(request):
            rem = self._sample_remaining([request], self._remaining.shape[0], whole_history_if_fresh=True)
        else:
            rem = self._pending[1]
        self._lens = np.append(self._lens, request.num_tokens)
        self._remaining = np.concatenate([self._remaining, rem], axis=1)
        self._pending = None


class LayeredPrefillScheduler(AggressiveScheduler):
    """Aggressive admission; a prefill runs all its tokens through one of G contiguous layer groups
    per step, while decodes run the whole model, so decodes never stall behind a long prompt and an
    MoE layer's experts are loaded once per prefill rather than once per chunk.

    The budget is charged ceil(tokens / G) per layered prefill (its share of a full forward)."""

    name = "layered-prefill"

    def prefill_chunk(self, request, budget, first):
        groups = self.config.num_layer_groups
        tokens = request.num_uncomputed_tokens
        if tokens <= 0:
            return None, 0
        cost = math.ceil(tokens / groups)
        underway = request.layer_groups_done > 0
        # A prefill that has started must go on (its partial layer state is live); a new one
        # starts only within the budget, except as the step's only prefill (long prompts move).
        if not underway and not first and cost > budget:
            return None, 0
        if budget <= 0 and not underway:
            return None, 0
        chunk = PrefillChunk(request, request.num_computed_tokens, tokens,
                             layer_group=request.layer_groups_done, num_layer_groups=groups)
        return chunk, cost


SCHEDULERS: dict[str, type[Scheduler]] = {cls.name: cls for cls in (
    AggressiveScheduler, ConservativeScheduler, PastFutureScheduler, LayeredPrefillScheduler)}


def get_scheduler(name: str, config: SchedulerConfig | None = None) -> Scheduler:
    """A fresh scheduler of the named policy."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in SCHEDULERS:
        raise ServingError(f"unknown scheduler '{name}'; known: {', '.join(sorted(SCHEDULERS))}")
    return SCHEDULERS[key](config)
