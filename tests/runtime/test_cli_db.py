"""`kdsl db list | show | export | import | prune`, run in-process through the CLI entry point."""

from __future__ import annotations

import json

import pytest

from autotune.db import TuningDB, device_descriptor
from autotune.devices import get_device
from codegen.space import SearchSpace
from runtime.cli import main

TEMPLATE = "kdsl_test_cli_tile"


@pytest.fixture
def db_path(tmp_path, monkeypatch):
    from tests.autotune.conftest import register_toy

    register_toy(monkeypatch, SearchSpace(TEMPLATE, {"BLOCK": (16, 32, 64), "num_warps": (2, 4)},
                                          {"BLOCK": 32, "num_warps": 4}))
    monkeypatch.setenv("KDSL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("KDSL_DB", raising=False)
    yield tmp_path / "t.sqlite"


def lines(n, device="h100", triton="3.9.0"):
    return [json.dumps({
        "template": TEMPLATE, "source_hash": "abcdef0123456789", "op_name": "ops.gemm",
        "device": device_descriptor(get_device(device)), "shape": {"M": 16 * (i + 1), "N": 64, "K": 64},
        "config": {"BLOCK": 16, "num_warps": 4}, "time_ms": 0.5 + i, "samples": [0.5 + i, 0.6 + i],
        "throughput": None, "source": "measured", "triton_version": triton, "kdsl_version": "0.1.0",
        "created_at": "2025-01-01T00:00:00+00:00"}) for i in range(n)]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_import_list_show_export(db_path, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines(3) + lines(1, device="a100")) + "\n")
    assert run(capsys, "db", "import", str(src), "--db", str(db_path)) == (0, f"imported 4 record(s) from {src}\n", "")

    code, out, _ = run(capsys, "db", "list", "--db", str(db_path))
    assert code == 0 and "4 tuning record(s)" in out and "K=64,M=48,N=64" in out and "a100" in out
    code, out, _ = run(capsys, "db", "list", "--device", "a100", "--db", str(db_path))
    assert "1 tuning record(s)" in out
    code, out, _ = run(capsys, "db", "list", "--template", "nothing", "--db", str(db_path))
    assert code == 0 and "no records" in out

    code, out, _ = run(capsys, "db", "show", "2", "--db", str(db_path))
    assert code == 0 and "K=64,M=32,N=64" in out and "n=2 median=1.55" in out and "sm_90" in out

    dst = tmp_path / "out.jsonl"
    assert run(capsys, "db", "export", str(dst), "--device", "h100", "--db", str(db_path))[0] == 0
    assert len(dst.read_text().splitlines()) == 3
    code, out, _ = run(capsys, "db", "export", "-", "--db", str(db_path))
    assert code == 0 and len(out.splitlines()) == 4


def test_prune(db_path, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines(2) + lines(3, triton="2.0.0")) + "\n")
    run(capsys, "db", "import", str(src), "--db", str(db_path))

    code, _, err = run(capsys, "db", "prune", "--db", str(db_path))
    assert code == 2 and "at least one of" in err
    code, _, err = run(capsys, "db", "prune", "--stale", "--db", str(db_path))  # stdin is not a terminal
    assert code == 2 and "would delete 3 record(s); pass --yes" in err
    assert run(capsys, "db", "prune", "--stale", "--yes", "--db", str(db_path))[:2] == (0, "deleted 3 record(s)\n")
    assert run(capsys, "db", "prune", "--older-than", "1", "--yes", "--db", str(db_path))[:2] == \
        (0, "deleted 2 record(s)\n")
    with TuningDB(str(db_path)) as db:
        assert db.count() == 0


def test_errors_are_one_line_exit_2(db_path, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines(2) + [lines(1)[0].replace('"BLOCK": 16', '"BLOCK": "16; import os"')]) + "\n")
    code, _, err = run(capsys, "db", "import", str(bad), "--db", str(db_path))
    assert code == 2 and err.count("\n") == 1 and f"{bad}:3: field 'config.BLOCK'" in err
    with TuningDB(str(db_path)) as db:
        assert db.count() == 0

    code, _, err = run(capsys, "db", "show", "99", "--db", str(db_path))
    assert (code, err) == (2, "kdsl: error: no record with id 99\n")

    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_bytes(b"garbage" * 50)
    code, _, err = run(capsys, "db", "list", "--db", str(corrupt))
    assert code == 2 and err.count("\n") == 1 and "not a SQLite database" in err

    code, _, err = run(capsys, "db", "list", "--db", "postgresql+psycopg://u:hunter2@127.0.0.1:1/db")
    assert code == 2 and "cannot reach database" in err and "hunter2" not in err
