"""The OpenAI-style server on a tiny model, over real sockets (uvicorn on 127.0.0.1, free port)."""

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402

from runtime.serve.engine import Engine  # noqa: E402
from runtime.serve.http import ServerLimits, create_app  # noqa: E402
from runtime.serve.request import SLO, SamplingParams  # noqa: E402

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ."   # 64 = the tiny vocab


class CharTokenizer:
    def encode(self, text):
        return [ALPHABET.index(c) for c in text]

    def decode(self, ids):
        return "".join(ALPHABET[i] for i in ids)


MODEL = "kdsl-tiny"
LIMITS = ServerLimits(max_body_bytes=4096, max_tokens=48)


def make_engine(model):
    return Engine(model, CharTokenizer(), scheduler="past-future", num_blocks=64, block_size=4,
                  max_model_len=64)


@pytest.fixture(scope="module")
def server(tiny_model):
    engine = make_engine(tiny_model)
    app = create_app(engine, model_name=MODEL, limits=LIMITS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", engine
    srv.should_exit = True
    thread.join(timeout=30)


def wait_idle(url, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(f"{url}/health").json()
        if health["kv_blocks_used"] == 0 and health["running"] == 0 and health["waiting"] == 0:
            return health
        assert time.monotonic() < deadline, f"blocks not freed: {health}"
        time.sleep(0.05)


def sse_events(lines):
    out = []
    for line in lines:
        if line.startswith("data: "):
            out.append(line[len("data: "):])
    return out


def test_completion_text_and_stream(server):
    url, engine = server
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hello world", "max_tokens": 4,
                                                  "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and len(choice["token_ids"]) == 4
    assert choice["text"] == CharTokenizer().decode(choice["token_ids"])
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}

    with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                      json={"prompt": "hello world", "max_tokens": 4, "temperature": 0, "stream": True}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = sse_events(s.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == choice["token_ids"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    # Seeded sampling is reproducible; a stop string cuts the text.
    req = {"prompt": [1, 2, 3], "max_tokens": 5, "temperature": 0.9, "top_p": 0.95, "seed": 11}
    a, b = (httpx.post(f"{url}/v1/completions", json=req, timeout=60).json() for _ in range(2))
    assert a["choices"][0]["token_ids"] == b["choices"][0]["token_ids"]
    stop = choice["text"][1:3]
    r = httpx.post(f"{url}/v1/completions", timeout=60,
                   json={"prompt": "hello world", "max_tokens": 4, "temperature": 0, "stop": [stop]})
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    assert r.json()["choices"][0]["text"] == choice["text"][:choice["text"].index(stop)]

    models = httpx.get(f"{url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    metrics = httpx.get(f"{url}/metrics").text
    assert "kdsl_time_to_first_token_seconds_bucket" in metrics and "kdsl_kv_cache_usage_ratio" in metrics
    wait_idle(url)


def test_64_concurrent_clients_match_engine_alone(server, tiny_model):
    url, _ = server
    prompts = [[1], [2, 3, 4, 5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16, 17], [20, 21, 22],
               [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41], [50, 51, 52, 53], [60, 61, 62, 63, 1, 2]]
    jobs = [(prompts[i % len(prompts)], 1 + (i * 7) % 4) for i in range(64)]
    alone = make_engine(tiny_model)
    want = {}
    for p in prompts:   # the longest answer of each prompt; shorter ones are its prefixes
        want[tuple(p)] = alone.generate([p], SamplingParams(max_tokens=4))[0].token_ids

    async def client(http, prompt, n, streamed):
        req = {"model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": streamed}
        if not streamed:
            r = await http.post(f"{url}/v1/completions", json=req)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["token_ids"]
        tokens = []
        async with http.stream("POST", f"{url}/v1/completions", json=req) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    tokens += json.loads(line[6:])["choices"][0]["token_ids"]
        return tokens

    async def run_all():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            return await asyncio.gather(*(client(http, p, n, i % 2 == 0) for i, (p, n) in enumerate(jobs)))

    got = asyncio.run(run_all())
    for (prompt, n), tokens in zip(jobs, got):
        assert tokens == want[tuple(prompt)][:n]
    wait_idle(url)


def test_client_disconnect_cancels_and_frees_blocks(server, monkeypatch):
    url, engine = server
    idle = wait_idle(url)
    cancelled = engine.metrics.finished.labels(reason="cancelled")
    cancelled_before = cancelled._value.get()
    # Pause the engine once the request has its first token, so it cannot finish before the hang-up
    # is noticed (a tiny model on CPU writes 48 tokens faster than a client reads the first one).
    resume = threading.Event()
    step = engine.step

    def paused_step():
        n = step()
        if any(r.output_token_ids for r in list(engine.core.live.values())):
            resume.wait(30)
        return n

    monkeypatch.setattr(engine, "step", paused_step)
    try:
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                          json={"prompt": [5, 6, 7, 8, 9, 10, 11, 12], "max_tokens": 48, "temperature": 0,
                                "stream": True}) as s:
            for line in s.iter_lines():
                if line.startswith("data: "):
                    break   # one token, then hang up
        deadline = time.monotonic() + 20
        while cancelled._value.get() == cancelled_before:   # noticed while no event is coming
            assert time.monotonic() < deadline, "the disconnected request was not cancelled"
            time.sleep(0.05)
    finally:
        resume.set()
    after = wait_idle(url)
    assert after["kv_blocks_used"] == idle["kv_blocks_used"] == 0
    assert cancelled._value.get() == cancelled_before + 1
    engine.blocks.check_invariants()


@pytest.mark.parametrize("payload, status, param", [
    (b"{not json", 400, None),
    (json.dumps({"prompt": [1, 2], "max_tokens": "4"}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": 12}).encode(), 400, "prompt"),
    (json.dumps({"prompt": [1, 2], "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"prompt": [1, 2], "stream": "yes"}).encode(), 400, "stream"),
    (json.dumps({"prompt": [1] * 70, "max_tokens": 1}).encode(), 400, "prompt"),
    (json.dumps({"prompt": [1] * 50, "max_tokens": 16}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": [1, 2], "max_tokens": 49}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": [1, 999]}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "no ~ such char"}).encode(), 400, "prompt"),
    (json.dumps({"model": "gpt-9", "prompt": [1, 2]}).encode(), 404, "model"),
    (json.dumps({"prompt": [1] * 3000}).encode(), 413, None),
    (json.dumps([1, 2]).encode(), 400, None),
], ids=["malformed-json", "max-tokens-string", "prompt-int", "temperature-string", "stream-string",
        "prompt-over-context", "prompt-plus-max-tokens-over-context", "max-tokens-over-limit",
        "token-outside-vocab", "untokenizable-text", "unknown-model", "body-too-large", "body-not-object"])
def test_bad_input_gets_openai_error_and_server_keeps_serving(server, payload, status, param):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", content=payload, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": [1, 2], "max_tokens": 1, "temperature": 0},
                    timeout=60)
    assert ok.status_code == 200


def test_abort_missed_answers_503_and_frees_blocks(tiny_model):
    # A TTFT target no request can meet: every request is dropped before its first token.
    engine = Engine(tiny_model, CharTokenizer(), scheduler="past-future", num_blocks=64, block_size=4,
                    max_model_len=64, abort_missed=SLO(ttft_s=1e-9, max_gap_s=1.5))
    app = create_app(engine, model_name=MODEL, limits=LIMITS)
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_overloaded"
        with client.stream("POST", "/v1/completions",
                           json={"prompt": [1, 2, 3], "max_tokens": 4, "stream": True}) as s:
            events = sse_events(s.iter_lines())
        assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"
        assert engine.metrics.finished.labels(reason="slo")._value.get() == 2
        engine.shutdown(drain=True, timeout=10)
    assert engine.blocks.num_used_blocks == 0


def test_unknown_route_and_shutdown_rejects_cleanly(tiny_model):
    engine = make_engine(tiny_model)
    app = create_app(engine, model_name=MODEL, limits=LIMITS)
    with TestClient(app) as client:
        assert client.get("/nope").json()["error"]["code"] == "not_found"
        assert client.post("/v1/completions", json={"prompt": [1], "max_tokens": 2}).status_code == 200
        engine.shutdown(drain=True, timeout=10)
        r = client.post("/v1/completions", json={"prompt": [1], "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_unavailable"
        assert client.get("/health").status_code == 503
    assert engine.blocks.num_used_blocks == 0
