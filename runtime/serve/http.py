"""OpenAI-style HTTP API over an :class:`runtime.serve.engine.Engine` (FastAPI, the [serve] extra).

Endpoints: ``POST /v1/completions`` (``stream: true`` sends server-sent events ending with
``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).
Every error a client can cause is a 4xx with OpenAI's body ``{"error": {"message", "type", "param",
"code"}}``; the server keeps serving. A client that disconnects has its request cancelled, which
frees its KV blocks. On shutdown the engine stops taking requests (503) and drains the live ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dsl.errors import ServingError
from runtime.serve.engine import Engine
from runtime.serve.engine_core import FinishEvent
from runtime.serve.metrics import PrometheusMetrics
from runtime.serve.request import SamplingParams

DEFAULT_HOST = "127.0.0.1"   # never expose an unauthenticated model server by default


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None    # default: the engine's context limit
    max_tokens: int = 512                   # largest max_tokens a request may ask for
    drain_timeout_s: float = 30.0
    disconnect_poll_s: float = 0.25         # how often a waiting non-streamed request checks its client


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclasses.dataclass
class _Completion:
    prompt: str | list[int]
    params: SamplingParams
    stream: bool
    stop_strings: tuple[str, ...]
    echo_model: str


def _parse_completion(body, model_name: str, limits: ServerLimits, engine: Engine) -> _Completion:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model", model_name)
    if not isinstance(model, str):
        raise APIError(400, "'model' must be a string", param="model")
    if model != model_name:
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{model_name}'",
                       param="model", code="model_not_found")
    if "prompt" not in body:
        raise APIError(400, "'prompt' is required", param="prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]     # OpenAI allows a batch of one
    if isinstance(prompt, str):
        if engine.tokenizer is None:
            raise APIError(400, "this server has no tokenizer: send the prompt as a list of token ids",
                           param="prompt")
        if not prompt:
            raise APIError(400, "'prompt' must not be empty", param="prompt")
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        bad = [t for t in prompt if t < 0 or (engine.vocab_size is not None and t >= engine.vocab_size)]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {engine.vocab_size})",
                           param="prompt")
    else:
        raise APIError(400, "'prompt' must be a string or a non-empty list of integer token ids",
                       param="prompt")

    max_tokens = body.get("max_tokens", 16)
    if not _is_int(max_tokens) or max_tokens < 1:
        raise APIError(400, "'max_tokens' must be an integer >= 1", param="max_tokens")
    if max_tokens > limits.max_tokens:
        raise APIError(400, f"'max_tokens' is {max_tokens}, over this server's limit of {limits.max_tokens}",
                       param="max_tokens")
    temperature = body.get("temperature", 1.0)
    if not _is_number(temperature) or not 0 <= temperature <= 2:
        raise APIError(400, "'temperature' must be a number in [0, 2]", param="temperature")
    top_p = body.get("top_p", 1.0)
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise APIError(400, "'top_p' must be a number in (0, 1]", param="top_p")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise APIError(400, "'seed' must be an integer", param="seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean", param="stream")
    stop = body.get("stop")
    stop_strings: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()
    if stop is None:
        pass
    elif isinstance(stop, str):
        stop_strings = (stop,)
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop):
        stop_strings = tuple(stop)
    elif isinstance(stop, list) and all(_is_int(s) and s >= 0 for s in stop):
        stop_ids = tuple(stop)     # kdsl extension: stop token ids
    else:
        raise APIError(400, "'stop' must be a string, a list of up to 4 strings, or a list of token ids",
                       param="stop")
    if stop_strings and engine.tokenizer is None:
        raise APIError(400, "stop strings need a tokenizer; send stop token ids instead", param="stop")

    try:
        ids = engine.encode(prompt)
    except ServingError as exc:
        raise APIError(400, str(exc), param="prompt") from None
    prompt_limit = limits.max_prompt_tokens or engine.max_model_len
    if len(ids) > prompt_limit:
        raise APIError(400, f"the prompt has {len(ids)} tokens, over the limit of {prompt_limit}",
                       param="prompt", code="context_length_exceeded")
    if len(ids) + max_tokens > engine.max_model_len:
        raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the context "
                       f"length of {engine.max_model_len} tokens", param="max_tokens",
                       code="context_length_exceeded")
    params = SamplingParams(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                            seed=seed, stop_token_ids=stop_ids)
    return _Completion(ids, params, stream, stop_strings, model)


class _StopStringMatcher:
    """Finds stop strings in the decoded text; returns the text to send so far."""

    def __init__(self, engine: Engine, stops: tuple[str, ...]):
        self.engine, self.stops = engine, stops
        self.tokens: list[int] = []
        self.sent = 0          # characters already sent
        self.hit = False

    def feed(self, token_id: int) -> str:
        self.tokens.append(token_id)
        text = self.engine.decode(self.tokens) or ""
        if self.stops:
            cuts = [text.find(s) for s in self.stops if s in text]
            if cuts:
                self.hit = True
                text = text[:min(cuts)]
            else:
                # Hold back a tail that could be the start of a stop string.
                hold = max((len(s) - 1 for s in self.stops), default=0)
                text = text[:max(self.sent, len(text) - hold)]
        delta = text[self.sent:]
        self.sent = len(text)
        return delta

    def flush(self) -> str:
        if self.hit:
            return ""
        text = self.engine.decode(self.tokens) or ""
        delta = text[self.sent:]
        self.sent = len(text)
        return delta


def create_app(engine: Engine, *, model_name: str = "kdsl", limits: ServerLimits | None = None,
               start_engine: bool = True) -> FastAPI:
    """The FastAPI app; the engine's background loop starts and stops with the app's lifespan."""
    limits = limits or ServerLimits()
    if engine.metrics is None:
        engine.metrics = PrometheusMetrics()
    metrics = engine.metrics
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if start_engine:
            engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.shutdown, drain=True, timeout=limits.drain_timeout_s)

    app = FastAPI(title="kdsl", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(404)
    async def _not_found(request, exc):
        return APIError(404, f"no route {request.method} {request.url.path}", code="not_found").response()

    @app.exception_handler(405)
    async def _bad_method(request, exc):
        return APIError(405, f"method {request.method} is not allowed on {request.url.path}").response()

    @app.get("/health")
    async def health():
        if not engine.accepting:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok", "running": engine.core.num_running, "waiting": engine.core.num_waiting,
                "kv_blocks_used": engine.blocks.num_used_blocks, "kv_blocks_total": engine.blocks.num_blocks}

    @app.get("/metrics")
    async def prometheus():
        metrics.observe_engine(engine.core)
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "kdsl", "max_model_len": engine.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
            raise APIError(413, f"the request body is over {limits.max_body_bytes} bytes", code="body_too_large")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > limits.max_body_bytes:
                raise APIError(413, f"the request body is over {limits.max_body_bytes} bytes",
                               code="body_too_large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        job = _parse_completion(body, model_name, limits, engine)
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        try:
            stream = engine.submit(job.prompt, job.params, request_id=rid)
        except ServingError as exc:
            status = 503 if not engine.accepting else 400
            raise APIError(status, str(exc), type_="server_unavailable" if status == 503
                           else "invalid_request_error") from None
        matcher = _StopStringMatcher(engine, job.stop_strings)
        if job.stream:
            return StreamingResponse(_sse(engine, stream, matcher, rid, job, created, request),
                                     media_type="text/event-stream")
        return await _collect(engine, stream, matcher, rid, job, request, limits)

    return app


def _chunk(rid: str, model: str, text: str, token_ids: list[int], finish: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "token_ids": token_ids, "logprobs": None,
                         "finish_reason": finish}]}


def _finish_reason(reason: str | None) -> str | None:
    return {"stop": "stop", "length": "length", "cancelled": "abort", "slo": "abort"}.get(reason, reason)


async def _collect(engine: Engine, stream, matcher: _StopStringMatcher, rid: str, job: _Completion,
                   request: Request, limits: ServerLimits) -> JSONResponse:
    tokens: list[int] = []
    text = ""
    reason = None
    try:
        while True:
            try:
                event = await stream.next_event(timeout=limits.disconnect_poll_s)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return JSONResponse({}, status_code=499)   # nobody reads it; the finally cancels
                continue
            if isinstance(event, FinishEvent):
                if event.reason == "slo":
                    raise APIError(503, "the server is overloaded: the request missed its latency target "
                                        "and was dropped (kdsl serve --abort-missed); retry later",
                                   type_="server_overloaded")
                reason = _finish_reason(event.reason)
                text += matcher.flush()
                break
            tokens.append(event.token_id)
            text += matcher.feed(event.token_id)
            if matcher.hit:
                reason = "stop"
                break
    finally:
        if reason is None or matcher.hit:
            engine.cancel(rid)
    if reason == "abort":
        raise APIError(503, "the request was cancelled because the server is shutting down",
                       type_="server_unavailable")
    n_prompt = len(job.prompt)
    body = _chunk(rid, job.echo_model, text if engine.tokenizer is not None else "", tokens, reason)
    body["usage"] = {"prompt_tokens": n_prompt, "completion_tokens": len(tokens),
                     "total_tokens": n_prompt + len(tokens)}
    return JSONResponse(body)


async def _next_event_or_disconnect(stream, request: Request, poll_s: float = 0.25):
    """The request's next event, or None once the client has gone. Polled while waiting: a request
    still queued or in a long prefill produces no events, and the server may drop writes to a
    closed connection silently, so neither would reveal the hang-up."""
    waiter = asyncio.ensure_future(stream.next_event())
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=poll_s)
            if done:
                event = waiter.result()
                return None if await request.is_disconnected() else event
            if await request.is_disconnected():
                return None
    finally:
        if not waiter.done():
            waiter.cancel()


async def _sse(engine: Engine, stream, matcher: _StopStringMatcher, rid: str, job: _Completion, created,
               request: Request):
    """Server-sent events. A client that goes away stops the stream (see _next_event_or_disconnect)
    and the ``finally`` cancels the request, freeing its KV blocks."""
    done = False
    try:
        while True:
            event = await _next_event_or_disconnect(stream, request)
            if event is None:
                return
            if isinstance(event, FinishEvent):
                done = True
                reason = _finish_reason(event.reason)
                yield f"data: {json.dumps(_chunk(rid, job.echo_model, matcher.flush(), [], reason))}\n\n"
                break
            delta = matcher.feed(event.token_id)
            if matcher.hit:
                yield f"data: {json.dumps(_chunk(rid, job.echo_model, delta, [event.token_id], 'stop'))}\n\n"
                break
            yield f"data: {json.dumps(_chunk(rid, job.echo_model, delta, [event.token_id], None))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        if not done:
            engine.cancel(rid)


def serve(engine: Engine, *, host: str = DEFAULT_HOST, port: int = 8000, model_name: str = "kdsl",
          limits: ServerLimits | None = None, log_level: str = "info") -> None:
    """Run the server until interrupted (uvicorn handles SIGINT/SIGTERM and runs the lifespan)."""
    import uvicorn

    app = create_app(engine, model_name=model_name, limits=limits)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=int(
        (limits or ServerLimits()).drain_timeout_s))


__all__ = ["DEFAULT_HOST", "APIError", "ServerLimits", "create_app", "serve"]
