from __future__ import annotations

import warnings

import pytest

from codegen.template import get_space
from autotune.db import TuningDB, device_descriptor
from autotune.devices import get_device
from autotune.lookup import ConfigResolver, DefaultConfigWarning
from autotune.records import write_shipped
from codegen.space import SearchSpace
from dsl.errors import TuningError

from .conftest import TOY

H100 = get_device("h100")
HASH = "feedface0001"
SHAPE = {"M": 128, "N": 256, "K": 512}
CFG_MEASURED = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4}
CFG_SHIPPED = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 2}
CFG_PREDICTED = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1}


@pytest.fixture
def db(toy, db_url):
    with TuningDB(db_url) as database:
        yield database


def record(db, shape=SHAPE, config=CFG_MEASURED, source="measured", device=H100, **kw):
    return db.add_record(template=TOY, source_hash=HASH, op_name="gated", device=device, shape=shape,
                         config=config, time_ms=1.0, source=source, **kw)


def resolver(db, tmp_path, **kw):
    return ConfigResolver(db, device=H100, shipped_dir=str(tmp_path / "shipped"), **kw)


def resolve(res, shape=SHAPE, **kw):
    return res.resolve(TOY, HASH, shape, op_file="ops.py", op_name="gated", **kw)


def test_override_first(db, tmp_path):
    record(db)
    res = resolver(db, tmp_path)
    config, source, _ = resolve(res, override={"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 1})
    assert (config, source) == ({"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 1}, "override")
    with pytest.raises(TuningError, match="override"):
        resolve(res, override={"BLOCK_M": 7, "BLOCK_N": 32, "num_warps": 1})


def test_each_step_of_the_chain(db, tmp_path):
    res = resolver(db, tmp_path)
    with pytest.warns(DefaultConfigWarning):
        assert resolve(res).source == "default"

    record(db, source="predicted", config=CFG_PREDICTED)
    res = resolver(db, tmp_path)
    assert resolve(res)[:2] == (CFG_PREDICTED, "predicted")

    shipped = TuningDB.make_record(template=TOY, source_hash=HASH, op_name="gated", device=H100,
                                   shape={"M": 100, "N": 256, "K": 512}, config=CFG_SHIPPED, time_ms=1.0,
                                   source="shipped")
    write_shipped([shipped], H100, tmp_path / "shipped")
    res = resolver(db, tmp_path)
    config, source, detail = resolve(res)
    assert (config, source) == (CFG_SHIPPED, "shipped") and "nearest" in detail  # M=100 stands in for M=128

    record(db, shape={"M": 200, "N": 256, "K": 512}, config={"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 2})
    res = resolver(db, tmp_path)
    config, source, detail = resolve(res)
    assert (config, source) == ({"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 2}, "nearest")
    assert "K=512,M=200,N=256" in detail

    stored = record(db)
    res = resolver(db, tmp_path)
    config, source, detail = resolve(res)
    assert (config, source) == (CFG_MEASURED, "measured") and f"#{stored.id}" in detail


def test_measured_is_per_machine_shipped_and_predicted_per_model(db, tmp_path):
    other_h100 = device_descriptor(H100) | {"fingerprint": "h100-0badc0de", "full_name": "NVIDIA H100 PCIe"}
    record(db, device=other_h100)
    record(db, device=other_h100, source="predicted", config=CFG_PREDICTED)
    record(db, device=get_device("a100"), source="predicted", config=CFG_SHIPPED)
    assert resolve(resolver(db, tmp_path))[:2] == (CFG_PREDICTED, "predicted")


def test_shipped_records_imported_into_the_database_count_as_shipped(db, tmp_path):
    record(db, source="shipped", config=CFG_SHIPPED)
    record(db, source="predicted", config=CFG_PREDICTED)
    assert resolve(resolver(db, tmp_path))[:2] == (CFG_SHIPPED, "shipped")


def test_stale_triton_version_is_skipped(db, tmp_path):
    record(db, triton_version="2.3.1")
    res = resolver(db, tmp_path, triton_version="3.9.0")
    with pytest.warns(DefaultConfigWarning):
        config, source, detail = resolve(res)
    assert source == "default" and config == get_space(TOY).default
    assert "skipped 1 stale record(s) from Triton 2.3.1" in detail

    record(db, source="predicted", config=CFG_PREDICTED, triton_version="3.9.0")
    config, source, detail = resolve(resolver(db, tmp_path, triton_version="3.9.0"))
    assert (config, source) == (CFG_PREDICTED, "predicted") and "stale" in detail


def test_config_that_no_longer_fits_the_template_is_skipped(db, tmp_path, monkeypatch):
    record(db)
    narrowed = SearchSpace(TOY, {"BLOCK_M": (16, 32), "BLOCK_N": (16, 32, 64), "num_warps": (1, 2, 4)},
                           {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4})
    from .conftest import register_toy

    register_toy(monkeypatch, narrowed)
    with pytest.warns(DefaultConfigWarning):
        config, source, detail = resolve(resolver(db, tmp_path))
    assert (config, source) == (narrowed.default, "default") and "no longer fits" in detail


def test_nearest_never_across_a_large_gap(db, tmp_path):
    record(db, shape={"M": 64, "N": 256, "K": 512})
    record(db, shape={"M": 1024, "N": 256, "K": 512})
    res = resolver(db, tmp_path)
    assert resolve(res, {"M": 128, "N": 256, "K": 512}).source == "nearest"     # 2x: allowed
    assert resolve(res, {"M": 600, "N": 256, "K": 512}).source == "nearest"     # 1.7x from 1024
    with pytest.warns(DefaultConfigWarning):
        assert resolve(res, {"M": 300, "N": 256, "K": 512}).source == "default"  # 4.7x and 3.4x away
    with pytest.warns(DefaultConfigWarning):
        assert resolve(res, {"M": 64, "N": 512, "K": 512}).source == "default"   # another N is another problem


def test_default_warns_once_with_the_tune_command(db, tmp_path):
    res = resolver(db, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            config, source, detail = resolve(res)
        resolve(res, {"M": 7, "N": 256, "K": 512})
    assert config == get_space(TOY).default
    messages = [str(w.message) for w in caught if issubclass(w.category, DefaultConfigWarning)]
    assert len(messages) == 2
    assert "`kdsl tune ops.py:gated --shape K=512,M=128,N=256`" in messages[0]
    assert "kdsl tune ops.py:gated --shape K=512,M=128,N=256" in detail and source == "default"


def test_answers_are_cached_in_memory(db, tmp_path, monkeypatch):
    record(db)
    res = resolver(db, tmp_path)
    assert resolve(res).source == "measured"
    calls = []
    monkeypatch.setattr(db, "query", lambda **kw: calls.append(kw) or [])
    for _ in range(100):
        assert resolve(res).source == "measured"
    assert calls == []  # no database access per call
    res.invalidate(HASH)
    with pytest.warns(DefaultConfigWarning):
        assert resolve(res).source == "default"
    assert len(calls) == 1


def test_no_database(toy, tmp_path):
    res = ConfigResolver(False, device=H100, shipped_dir=str(tmp_path))
    with pytest.warns(DefaultConfigWarning):
        assert res.resolve(TOY, HASH, SHAPE).source == "default"


def test_default_database_opened_lazily(toy, db_url, tmp_path):
    with TuningDB(db_url) as db:
        record(db)
    res = ConfigResolver(device=H100, shipped_dir=str(tmp_path))  # None: KDSL_DB
    assert resolve(res).source == "measured"
    res.close()
