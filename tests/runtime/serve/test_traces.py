import json
from pathlib import Path

import numpy as np
import pytest

from dsl.errors import ServingError
from runtime.serve.traces import load_trace

DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "traces"

AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:48.6805900,10,0
2023-11-16 18:15:56.6805900,879,55
"""


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_azure_csv(tmp_path):
    t = load_trace(write(tmp_path, "conv.csv", AZURE))
    assert t.name == "conv"
    # the row with 0 generated tokens is dropped; arrivals sorted and re-based to 0
    assert [(r.prompt_len, r.output_len) for r in t.requests] == [(374, 44), (396, 109), (879, 55)]
    assert [r.arrival for r in t.requests] == pytest.approx([0.0, 4.314579, 10.0])
    assert t.duration == pytest.approx(10.0) and t.rate == pytest.approx(0.2)
    p0, p1 = t.prompt_token_ids(0), t.prompt_token_ids(1)
    assert p0.size == 374 and len(set(p0) & set(p1)) == 0     # Azure prompts share nothing


def test_mooncake_jsonl_prefix_blocks(tmp_path):
    lines = [{"timestamp": 0, "input_length": 1000, "output_length": 6, "hash_ids": [0, 1]},
             {"timestamp": 500, "input_length": 700, "output_length": 4, "hash_ids": [0, 2]},
             {"timestamp": 2000, "input_length": 1100, "output_length": 9, "hash_ids": [3, 4]}]
    t = load_trace(write(tmp_path, "mc.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n"))
    assert [r.arrival for r in t.requests] == [0.0, 0.5, 2.0]
    a, b, c = (t.prompt_token_ids(i) for i in range(3))
    assert (a.size, b.size, c.size) == (1000, 700, 1100)
    assert np.array_equal(a[:512], b[:512]) and not np.array_equal(a[512:700], b[512:700])
    assert len(set(c[:1024]) & set(a)) == 0
    assert len(set(c[1024:])) == 76 and len(set(c[1024:]) & set(a)) == 0   # beyond the blocks: own tokens


def test_rate_and_time_scaling(tmp_path):
    t = load_trace(write(tmp_path, "conv.csv", AZURE))
    fast = t.with_rate(2.0)
    assert fast.rate == pytest.approx(2.0) and fast.time_scale == 1.0
    gaps = np.diff([r.arrival for r in t.requests])
    fast_gaps = np.diff([r.arrival for r in fast.requests])
    assert fast_gaps == pytest.approx(gaps / 10)                   # burst shape kept
    slow = t.scale_time(3.0)
    assert slow.duration == pytest.approx(30.0) and slow.time_scale == 3.0
    assert slow.with_rate(1.0).time_scale == 3.0


def test_truncation(tmp_path):
    t = load_trace(write(tmp_path, "conv.csv", AZURE))
    assert len(t.head(2)) == 2
    w = t.window(4.0, 11.0)
    assert [r.prompt_len for r in w.requests] == [396, 879]
    assert w.requests[0].arrival == pytest.approx(0.314579)
    with pytest.raises(ServingError, match="no request arrives"):
        t.window(20.0, 30.0)
    with pytest.raises(ServingError):
        t.head(0)


@pytest.mark.parametrize("name,text,match", [
    ("bad.csv", "a,b\n1,2\n", "not an Azure trace"),
    ("bad.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,2\n", r"bad.csv:2: bad TIMESTAMP"),
    ("bad.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,x,2\n", "ContextTokens"),
    ("bad.jsonl", "{not json\n", r"bad.jsonl:1: not JSON"),
    ("bad.jsonl", '{"timestamp": 1}\n', "missing"),
    ("bad.jsonl", '{"timestamp": 1, "input_length": 3, "output_length": 1, "hash_ids": [-1]}\n', "hash_ids"),
    ("bad.txt", "x", "unknown format"),
])
def test_bad_files(tmp_path, name, text, match):
    with pytest.raises(ServingError, match=match):
        load_trace(write(tmp_path, name, text))


def test_missing_file(tmp_path):
    with pytest.raises(ServingError, match="does not exist"):
        load_trace(tmp_path / "nope.csv")


@pytest.mark.skipif(not (DATA / "azure_2023_conv.csv").exists(), reason="shared trace data absent")
def test_real_traces_load():
    az = load_trace(DATA / "azure_2023_conv.csv")
    assert len(az) > 19000 and 5 < az.rate < 6 and az.max_output_len <= 1000
    mc = load_trace(DATA / "mooncake_synthetic.jsonl")
    assert len(mc) > 3900 and any(r.prefix_blocks for r in mc.requests)
