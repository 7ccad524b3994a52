from __future__ import annotations

import copy
import dataclasses
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autotune.db import TuningDB, device_descriptor
from autotune.devices import get_device
from autotune.records import (
    LineError,
    export_records,
    import_records,
    load_shipped,
    parse_line,
    read_records,
    write_shipped,
)
from dsl.errors import DatabaseError

from .conftest import TOY

H100 = get_device("h100")


def line(**overrides) -> dict:
    base = {
        "template": TOY, "source_hash": "0123456789abcdef", "op_name": "ops.gated_linear",
        "device": device_descriptor(H100, driver="550.54.15"), "shape": {"M": 128, "N": 256, "K": 512},
        "config": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4}, "time_ms": 0.125,
        "samples": [0.125, 0.13, 0.12], "throughput": 268.4, "source": "measured",
        "triton_version": "3.9.0", "kdsl_version": "0.1.0", "created_at": "2025-05-01T10:00:00+00:00",
    }
    base.update(overrides)
    return base


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_export_import_round_trip(toy, tmp_path):
    with TuningDB(str(tmp_path / "a.sqlite")) as src:
        src.add_records([parse_line(line()),
                         parse_line(line(shape={"M": 256, "N": 256, "K": 512}, throughput=None, samples=[])),
                         parse_line(line(source="predicted", device=device_descriptor(get_device("a100"))))])
        assert export_records(src, tmp_path / "out.jsonl") == 3
        assert export_records(src, tmp_path / "h100.jsonl", device="h100") == 2
        originals = src.query()
    with TuningDB(str(tmp_path / "b.sqlite")) as dst:
        assert import_records(dst, tmp_path / "out.jsonl") == 3
        copies = dst.query()
    strip = [dataclasses.replace(r, id=None) for r in originals]
    assert [dataclasses.replace(r, id=None) for r in copies] == strip


BAD_LINES = [
    # (what is wrong, the line, the field the message must name)
    ("string where an int belongs", line(shape={"M": "128", "N": 256, "K": 512}), "shape.M"),
    ("source-like text in a parameter", line(config={"BLOCK_M": "64); import os; os.system('x'", "BLOCK_N": 32,
                                                     "num_warps": 4}), "config.BLOCK_M"),
    ("code as a parameter name", line(config={"BLOCK_M\n__import__('os')": 64, "BLOCK_N": 32, "num_warps": 4}),
     "config"),
    ("unknown template", line(template="no_such_template"), "template"),
    ("template that is free text", line(template="gemm; rm -rf /"), "template"),
    ("unknown parameter", line(config={"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "SPLIT_K": 2}), "config"),
    ("value outside the space", line(config={"BLOCK_M": 48, "BLOCK_N": 32, "num_warps": 4}), "config"),
    ("bool where an int belongs", line(config={"BLOCK_M": True, "BLOCK_N": 32, "num_warps": 4}), "config.BLOCK_M"),
    ("NaN time", line(time_ms=float("nan")), "time_ms"),
    ("negative time", line(time_ms=-1.0), "time_ms"),
    ("zero sample", line(samples=[0.1, 0]), "samples[1]"),
    ("unknown source", line(source="trust_me"), "source"),
    ("op name with code", line(op_name="f(); __import__('os')"), "op_name"),
    ("hash that is not hex", line(source_hash="0123456789ABCDEFG"), "source_hash"),
    ("device name with a newline", line(device={**device_descriptor(H100), "full_name": "H100\nimport os"}),
     "device.full_name"),
    ("unknown vendor", line(device={**device_descriptor(H100), "vendor": "acme"}), "device.vendor"),
    ("unknown field", {**line(), "extra": 1}, "extra"),
    ("missing field", {k: v for k, v in line().items() if k != "time_ms"}, "time_ms"),
    ("bad time stamp", line(created_at="yesterday"), "created_at"),
    ("not an object", [1, 2, 3], "<line>"),
    ("invalid JSON", '{"template": ', "<line>"),
]


@pytest.mark.parametrize("what, bad, field", BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_bad_line_rejects_whole_file(toy, tmp_path, what, bad, field):
    path = write_lines(tmp_path / "in.jsonl", [line(), line(shape={"M": 64, "N": 256, "K": 512}), bad])
    with TuningDB(str(tmp_path / "t.sqlite")) as db:
        with pytest.raises(DatabaseError) as info:
            import_records(db, path)
        assert db.count() == 0
    message = str(info.value)
    assert f"{path}:3: field '{field}'" in message, message
    assert "nothing imported" in message and "\n" not in message


def test_all_errors_named_in_one_line(toy, tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [line(time_ms="fast"), "", line(), line(source="x")])
    with pytest.raises(DatabaseError) as info:
        read_records(path)
    assert ":1: field 'time_ms'" in str(info.value) and ":4: field 'source'" in str(info.value)
    with pytest.raises(DatabaseError, match="no such file"):
        read_records(tmp_path / "missing.jsonl")


def test_shipped_records(toy, tmp_path):
    a100 = get_device("a100")
    records = [parse_line(line()), parse_line(line(shape={"M": 8, "N": 256, "K": 512}, source="predicted"))]
    path = write_shipped(records, H100, tmp_path)
    assert path.name == "h100.jsonl"
    write_shipped([parse_line(line(device=device_descriptor(a100)))], a100, tmp_path)
    shipped = load_shipped(H100, tmp_path)
    assert {r.source for r in shipped} == {"shipped"} and len(shipped) == 2
    assert [r.shape["M"] for r in shipped] == [8, 128]  # sorted for reviewable diffs
    assert load_shipped(get_device("l40s"), tmp_path) == []


def test_shipped_files_in_repo_are_valid():
    from autotune.records import SHIPPED_DIR

    for path in sorted(SHIPPED_DIR.glob("*.jsonl")):
        read_records(path)  # raises on any bad line


# -- hypothesis: any well-formed record survives, any single corrupted field is caught

names = st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True)
positive = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False)
records = st.builds(
    line,
    op_name=names,
    source_hash=st.from_regex(r"[0-9a-f]{8,40}", fullmatch=True),
    shape=st.dictionaries(st.sampled_from(["M", "N", "K", "E"]), st.integers(1, 1 << 30), min_size=1),
    config=st.fixed_dictionaries({"BLOCK_M": st.sampled_from([16, 32, 64, 128]),
                                  "BLOCK_N": st.sampled_from([16, 32, 64]), "num_warps": st.sampled_from([1, 2, 4])}),
    time_ms=positive,
    samples=st.lists(positive, max_size=5),
    throughput=st.none() | positive,
    source=st.sampled_from(["measured", "predicted", "shipped"]),
    triton_version=st.sampled_from(["3.9.0", "3.1.0+git1a2b3c", "2.3.1"]),
)
corruptions = st.sampled_from([
    ("shape", "M", "12; drop table"), ("config", "BLOCK_M", "{{ evil }}"), ("config", "num_warps", 3.5),
    ("time_ms", None, "inf"), ("source", None, "MEASURED"), ("op_name", None, "a b"),
    ("triton_version", None, "3.9\n"), ("samples", None, ["1"]), ("device", "sm_count", -4),
])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records)
def test_valid_records_round_trip(toy, data):
    record = parse_line(json.loads(json.dumps(data)))
    again = parse_line(json.loads(json.dumps(record.to_line())))
    assert again == record


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records, corruptions)
def test_corrupted_records_rejected(toy, data, corruption):
    field, key, value = corruption
    bad = copy.deepcopy(data)
    if key is None:
        bad[field] = value
    else:
        bad[field][key] = value
    with pytest.raises(LineError):
        parse_line(json.loads(json.dumps(bad)))
