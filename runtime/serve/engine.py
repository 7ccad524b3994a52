"""``Engine``: a model served with continuous batching over a paged KV cache.

Two ways to drive it:

* offline: ``engine.generate(prompts, params)`` runs the step loop in the caller's thread until
  every prompt is answered;
* online (the HTTP server): ``engine.start()`` runs the step loop in a background thread;
  ``engine.submit(prompt, params)`` returns a :class:`RequestStream` whose events (new tokens, then
  the finish) arrive on a thread-safe queue and, when submitted from an asyncio loop, on an
  ``asyncio.Queue`` of that loop as well. ``engine.cancel(id)`` stops a request and frees its blocks;
  ``engine.shutdown(drain=...)`` stops taking requests and either lets the live ones finish or
  cancels them.

Preemption by recompute keeps answers unchanged: a preempted request prefills its prompt plus its
outputs again and continues from there, and seeded sampling depends only on (seed, position).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import queue
import threading
import time
from collections.abc import Sequence

import torch

from dsl.errors import ServingError
from runtime.serve.block_manager import BlockManager
from runtime.serve.engine_core import EngineCore, FinishEvent, TokenEvent
from runtime.serve.executor import KVGeometry, ModelExecutor
from runtime.serve.request import SLO, Request, SamplingParams
from runtime.serve.scheduler import SchedulerConfig, get_scheduler


@dataclasses.dataclass
class CompletionOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str | None
    text: str | None = None
    num_preemptions: int = 0


class RequestStream:
    """Events of one request: ``TokenEvent``s, then one ``FinishEvent``."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop | None):
        self.request = request
        self.request_id = request.request_id
        self.events: queue.Queue = queue.Queue()
        self._loop = loop
        self._async_events: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self.finished = threading.Event()

    def _deliver(self, event) -> None:
        self.events.put(event)
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._async_events.put_nowait, event)
            except RuntimeError:    # the client's loop is gone; the sync queue still has it
                pass
        if isinstance(event, FinishEvent):
            self.finished.set()

    async def next_event(self, timeout: float | None = None):
        """The next event on the submitting loop; raises asyncio.TimeoutError after ``timeout``."""
        if self._async_events is None:
            raise ServingError("this request was not submitted from an asyncio loop")
        return await asyncio.wait_for(self._async_events.get(), timeout)

    def __iter__(self):
        while True:
            event = self.events.get()
            yield event
            if isinstance(event, FinishEvent):
                return


class Engine:
    """A model, a tokenizer (optional: ``encode(str) -> list[int]``, ``decode(list[int]) -> str``),
    a scheduler policy and a paged KV cache of ``num_blocks`` x ``block_size`` tokens. With
    ``abort_missed`` (an SLO) a request is dropped once it has missed its latency targets."""

    def __init__(self, model, tokenizer=None, scheduler: str = "past-future", *, num_blocks: int = 256,
                 block_size: int = 16, max_tokens_per_step: int = 256, max_running: int = 64,
                 max_model_len: int | None = None, enable_prefix_caching: bool = True,
                 geometry: KVGeometry | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", seed: int = 0, metrics=None, abort_missed: SLO | None = None,
                 num_layer_groups: int | None = None):
        self.model = model.eval() if hasattr(model, "eval") else model
        self.tokenizer = tokenizer
        self.scheduler_name = scheduler
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching)
        self.executor = ModelExecutor(model, self.blocks, geometry=geometry, dtype=dtype, device=device,
                                      seed=seed)
        # Layered prefill: at most one group per layer (an empty group would only add a step).
        groups = num_layer_groups or min(SchedulerConfig.num_layer_groups, self.executor.geometry.n_layers)
        config = SchedulerConfig(max_tokens_per_step=max_tokens_per_step, max_running=max_running, seed=seed,
                                 num_layer_groups=groups)
        model_len = max_model_len
        config_len = getattr(getattr(model, "config", None), "max_seq_len", None)
        if model_len is None and config_len:
            model_len = int(config_len)
        self.core = EngineCore(get_scheduler(scheduler, config), self.blocks, self.executor,
                               clock=time.monotonic, max_model_len=model_len, abort_missed=abort_missed)
        self.vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
        self.metrics = metrics
        self._lock = threading.RLock()
        self._work = threading.Condition(self._lock)
        self._streams: dict[str, RequestStream] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._accepting = True
        self.error: BaseException | None = None

    # --- sizes -------------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def num_live(self) -> int:
        return len(self.core.live)

    # --- requests ----------------------------------------------------------------------------
    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ServingError("a text prompt needs a tokenizer; this engine has none (send token ids)")
            try:
                return [int(t) for t in self.tokenizer.encode(prompt)]
            except (ValueError, KeyError, TypeError, IndexError) as exc:   # text the tokenizer rejects
                raise ServingError(f"the tokenizer cannot encode the prompt: {exc}") from None
        return [int(t) for t in prompt]

    def decode(self, token_ids: Sequence[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(list(token_ids))

    def _make_request(self, prompt, params: SamplingParams | None, request_id: str | None) -> Request:
        ids = self.encode(prompt)
        if self.vocab_size is not None and any(t >= self.vocab_size for t in ids):
            raise ServingError(f"prompt has token ids >= the vocabulary size {self.vocab_size}")
        rid = request_id or f"req-{next(self._ids)}"
        return Request(rid, ids, params or SamplingParams(), arrival_time=time.monotonic())

    def submit(self, prompt, params: SamplingParams | None = None, *, request_id: str | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> RequestStream:
        """Queue a request for the background loop (or for ``run_until_idle``)."""
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
        with self._lock:
            if not self._accepting:
                raise ServingError("the engine is shutting down and takes no new requests")
            if self.error is not None:
                raise ServingError(f"the engine stopped after an error: {self.error}")
            req = self._make_request(prompt, params, request_id)
            stream = RequestStream(req, loop)
            self.core.add_request(req)
            self._streams[req.request_id] = stream
            self._work.notify_all()
        return stream

    def cancel(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks; False if unknown or already finished."""
        with self._lock:
            cancelled = self.core.cancel(request_id)
            stream = self._streams.pop(request_id, None)
            if cancelled:
                if self.metrics is not None:
                    self.metrics.observe_cancel()
                    self.metrics.observe_engine(self.core)
                if stream is not None:
                    stream._deliver(FinishEvent(request_id, "cancelled", self.core.now()))
        return cancelled

    # --- stepping ----------------------------------------------------------------------------
    def step(self) -> int:
        """One engine step; returns the number of tokens it produced."""
        with self._lock:
            result = self.core.step()
            if self.metrics is not None:
                self.metrics.observe_step(self.core, result)
            n = 0
            for event in result.events:
                stream = self._streams.get(event.request_id)
                if isinstance(event, TokenEvent):
                    n += 1
                elif isinstance(event, FinishEvent):
                    self._streams.pop(event.request_id, None)
                if stream is not None:
                    stream._deliver(event)
            return n

    def run_until_idle(self) -> None:
        if self._thread is not None:
            raise ServingError("the engine runs a background loop; wait on the request streams instead")
        while self.core.has_unfinished:
            self.step()

    def generate(self, prompts: Sequence, params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[CompletionOutput]:
        """Answer every prompt (text with a tokenizer, or token ids); outputs in prompt order."""
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ServingError(f"{len(prompts)} prompts but {len(params)} sampling params")
        streams = [self.submit(p, sp, loop=None) for p, sp in zip(prompts, params)]
        if self._thread is None:
            self.run_until_idle()
        else:
            for s in streams:
                s.finished.wait()
        outs = []
        for s in streams:
            req = s.request
            outs.append(CompletionOutput(req.request_id, [int(t) for t in req.prompt_token_ids],
                                         list(req.output_token_ids), req.finish_reason,
                                         self.decode(req.output_token_ids), req.num_preemptions))
        return outs

    # --- background loop ---------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop = False
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name="kdsl-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self.core.has_unfinished:
                    self._work.wait()
                if self._stop:
                    return
            try:
                self.step()
            except BaseException as exc:   # fail every open request rather than hang their clients
                with self._lock:
                    self.error = exc
                    for rid in list(self.core.live):
                        self.cancel(rid)
                    self._thread = None
                raise

    def shutdown(self, *, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop taking requests; with ``drain`` let live ones finish (up to ``timeout`` s), then
        cancel what is left and stop the background loop."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + timeout
        if drain and self._thread is not None:
            while self.core.has_unfinished and time.monotonic() < deadline and self.error is None:
                time.sleep(0.01)
        with self._lock:
            for rid in list(self.core.live):
                self.cancel(rid)
            self._stop = True
            self._work.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=max(1.0, deadline - time.monotonic()))

    @property
    def accepting(self) -> bool:
        return self._accepting and self.error is None


__all__ = ["CompletionOutput", "Engine", "RequestStream"]
