from __future__ import annotations

import datetime as dt
import hashlib
import sqlite3

import pytest
import sqlalchemy as sa

from autotune import db as db_mod
from autotune.db import SCHEMA_VERSION, TuningDB, device_descriptor, optuna_storage
from autotune.devices import get_device
from dsl.errors import DatabaseError, TuningError

from .conftest import TOY

H100 = get_device("h100")
A100 = get_device("a100")


def add(db, *, shape=None, config=None, time_ms=1.0, device=H100, source="measured", source_hash="aa11bb22cc33",
        **kw):
    return db.add_record(template=TOY, source_hash=source_hash, op_name="ops.gated", device=device,
                         shape=shape or {"M": 128, "N": 256, "K": 512},
                         config=config or {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4},
                         time_ms=time_ms, source=source, **kw)


def file_state(path):
    return hashlib.sha256(path.read_bytes()).hexdigest(), sorted(p.name for p in path.parent.iterdir())


def test_round_trip(toy, db_url):
    created = dt.datetime(2025, 3, 1, 12, 30, tzinfo=dt.timezone.utc)
    with TuningDB(db_url) as db:
        stored = add(db, samples=[1.0, 1.1, 0.9], throughput=12.5, created_at=created, triton_version="3.9.0",
                     kdsl_version="0.1.0")
    with TuningDB(db_url) as db:  # a new connection sees exactly what was written
        (got,) = db.query()
        assert got == stored and got.id is not None
        assert got.shape == {"K": 512, "M": 128, "N": 256} and got.shape_key == "K=512,M=128,N=256"
        assert got.config == {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4}
        assert got.samples == [1.0, 1.1, 0.9] and got.throughput == 12.5
        assert got.created_at == created and got.triton_version == "3.9.0"
        assert got.device == device_descriptor(H100)
        assert db.get(got.id) == got and db.get(got.id + 1000) is None


def test_upserts_are_idempotent(toy, db_url):
    with TuningDB(db_url) as db:
        assert db.upsert_device(H100) == db.upsert_device(H100) != db.upsert_device(A100)
        db.upsert_device(H100, driver="550.54")
        assert [d["driver"] for d in db.devices() if d["name"] == "h100"] == ["550.54"]
        assert db.upsert_kernel(TOY, "ab12cd34", "f") == db.upsert_kernel(TOY, "ab12cd34", "f")
        with pytest.raises(DatabaseError, match="already recorded as template"):
            db.upsert_kernel("other", "ab12cd34", "f")


def test_measured_keeps_best_time_others_keep_newest(toy, db_url):
    with TuningDB(db_url) as db:
        add(db, time_ms=2.0, config={"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1})
        kept = add(db, time_ms=3.0, config={"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 1})
        assert kept.time_ms == 2.0 and kept.config["BLOCK_M"] == 16
        kept = add(db, time_ms=1.5, config={"BLOCK_M": 128, "BLOCK_N": 16, "num_warps": 1})
        assert kept.time_ms == 1.5 and kept.config["BLOCK_M"] == 128
        add(db, source="predicted", time_ms=1.0)
        newest = add(db, source="predicted", time_ms=4.0, config={"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 2})
        assert newest.time_ms == 4.0
        # Another Triton version is another key.
        add(db, time_ms=9.0, triton_version="2.3.1")
        assert db.count() == 3


def test_add_record_rejects_bad_input(toy, db_url):
    with TuningDB(db_url) as db:
        with pytest.raises(TuningError, match="not in"):
            add(db, config={"BLOCK_M": 48, "BLOCK_N": 32, "num_warps": 4})
        with pytest.raises(TuningError, match="time_ms"):
            add(db, time_ms=float("nan"))
        with pytest.raises(TuningError, match="source"):
            add(db, source="guessed")
        with pytest.raises(TuningError, match="unknown template"):
            db.add_record(template="no_such_template_xyz", source_hash="ab12cd34", op_name="f", device=H100,
                          shape={"M": 1}, config={}, time_ms=1.0)
        assert db.count() == 0


def test_query_filters_and_prune(toy, db_url):
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=40)
    with TuningDB(db_url) as db:
        add(db, shape={"M": 1, "N": 2})
        add(db, shape={"M": 2, "N": 2}, device=A100, created_at=old)
        add(db, shape={"M": 3, "N": 2}, triton_version="3.0.0")
        add(db, shape={"M": 4, "N": 2}, source="predicted")
        assert len(db.query(device="a100")) == 1
        assert len(db.query(device=H100.fingerprint())) == 3
        assert len(db.query(device=H100, sources="predicted")) == 1
        assert len(db.query(shape={"N": 2, "M": 3})) == 1
        assert len(db.query(template="other")) == 0
        assert len(db.query(limit=2)) == 2

        with pytest.raises(DatabaseError, match="at least one"):
            db.prune()
        assert db.prune(stale=True, dry_run=True) == 1 and db.count() == 4
        assert db.prune(stale=True) == 1
        assert db.prune(older_than=dt.timedelta(days=30)) == 1
        assert [r.shape["M"] for r in db.query()] == [1, 4]
        assert db.prune(device="h100", template=TOY) == 2 and db.count() == 0


def test_nearest_is_bounded(toy, db_url):
    with TuningDB(db_url) as db:
        add(db, shape={"M": 128, "N": 256, "K": 64})
        add(db, shape={"M": 1024, "N": 256, "K": 64})
        add(db, shape={"M": 200, "N": 512, "K": 64})
        near = db.nearest(source_hash="aa11bb22cc33", device=H100, shape={"M": 200, "N": 256, "K": 64},
                          token_dim="M")
        assert near.shape == {"M": 128, "N": 256, "K": 64}
        assert db.nearest(source_hash="aa11bb22cc33", device=H100, shape={"M": 400, "N": 256, "K": 64},
                          token_dim="M") is None  # 128 and 1024 are both more than 2x away
        assert db.nearest(source_hash="aa11bb22cc33", device=A100, shape={"M": 128, "N": 256, "K": 64},
                          token_dim="M") is None


def test_schema_version_stamped_and_newer_refused(toy, db_url, tmp_path):
    TuningDB(db_url).close()
    path = tmp_path / "tuning.sqlite"
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 5,))
    with pytest.raises(DatabaseError, match="newer than this kdsl"):
        TuningDB(db_url)


def test_migrations_applied_in_order(toy, db_url, tmp_path, monkeypatch):
    with TuningDB(db_url) as db:
        add(db)
    applied = []

    def to_next(version):
        def migrate(conn):
            applied.append(version)
            conn.exec_driver_sql(f"ALTER TABLE tuning_records ADD COLUMN note_v{version} TEXT")
        return migrate

    target = SCHEMA_VERSION + 2
    monkeypatch.setattr(db_mod, "SCHEMA_VERSION", target)
    monkeypatch.setattr(db_mod, "MIGRATIONS", {v: to_next(v) for v in (target, target - 1)})
    with TuningDB(db_url) as db:
        assert db.count() == 1
    assert applied == [target - 1, target]
    with sqlite3.connect(tmp_path / "tuning.sqlite") as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchone() == (target,)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(tuning_records)")}
    assert {f"note_v{target - 1}", f"note_v{target}"} <= columns
    TuningDB(db_url).close()
    assert applied == [target - 1, target]  # nothing runs twice


def test_failed_migration_leaves_database_untouched(toy, db_url, tmp_path, monkeypatch):
    TuningDB(db_url).close()

    def broken(conn):
        conn.exec_driver_sql("ALTER TABLE tuning_records ADD COLUMN half_done TEXT")
        conn.exec_driver_sql("ALTER TABLE no_such_table ADD COLUMN x TEXT")

    monkeypatch.setattr(db_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setattr(db_mod, "MIGRATIONS", {SCHEMA_VERSION + 1: broken})
    with pytest.raises(DatabaseError, match=f"migration to schema {SCHEMA_VERSION + 1} failed"):
        TuningDB(db_url)
    with sqlite3.connect(tmp_path / "tuning.sqlite") as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchone() == (SCHEMA_VERSION,)
        assert "half_done" not in {row[1] for row in conn.execute("PRAGMA table_info(tuning_records)")}


def test_corrupt_file_refused_and_untouched(tmp_path):
    path = tmp_path / "tuning.sqlite"
    path.write_bytes(b"this is not a database at all\x00\x01" * 100)
    before = file_state(path)
    with pytest.raises(DatabaseError, match="not a SQLite database") as info:
        TuningDB(f"sqlite:///{path}")
    assert str(path) in str(info.value)
    assert file_state(path) == before


def test_damaged_sqlite_refused_and_untouched(tmp_path):
    path = tmp_path / "tuning.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x)")
    data = bytearray(path.read_bytes())
    data[100:] = b"\xff" * (len(data) - 100)  # a valid header, garbage pages
    path.write_bytes(bytes(data))
    before = file_state(path)
    with pytest.raises(DatabaseError):
        TuningDB(str(path))
    assert file_state(path) == before


def test_foreign_sqlite_refused_and_untouched(tmp_path):
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO users (name) VALUES ('ada')")
    conn.close()
    before = file_state(path)
    with pytest.raises(DatabaseError, match="not a kdsl tuning database.*users"):
        TuningDB(str(path))
    assert file_state(path) == before


def test_database_shared_with_optuna_is_not_foreign(toy, db_url):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna_storage(db_url, heartbeat_interval=1)
    optuna.create_study(storage=storage, study_name="s").optimize(lambda t: t.suggest_int("x", 0, 3), n_trials=2)
    storage.engine.dispose()
    with TuningDB(db_url) as db:
        add(db)
        assert db.count() == 1


def test_unreachable_and_bad_urls():
    with pytest.raises(DatabaseError) as info:
        TuningDB("postgresql+psycopg://kdsl:s3cret@127.0.0.1:1/tuning")
    message = str(info.value)
    assert "cannot reach database" in message and "127.0.0.1:1" in message and "s3cret" not in message
    with pytest.raises(DatabaseError, match="cannot use database URL 'nosuchdb://"):
        TuningDB("nosuchdb://host/x")
    with pytest.raises(DatabaseError, match="invalid database URL") as info:
        TuningDB("postgresql://u:pw@h:notaport/x")
    assert "pw" not in str(info.value)


def test_missing_directory(tmp_path):
    with pytest.raises(DatabaseError, match="does not exist"):
        TuningDB(str(tmp_path / "nope" / "t.sqlite"))
    assert not (tmp_path / "nope").exists()


def test_default_url(tmp_path, monkeypatch):
    monkeypatch.delenv("KDSL_DB", raising=False)
    monkeypatch.setenv("KDSL_CACHE_DIR", str(tmp_path / "c"))
    with TuningDB() as db:
        assert db.url == f"sqlite:///{tmp_path / 'c' / 'tuning.sqlite'}"
    monkeypatch.setenv("KDSL_DB", f"sqlite:///{tmp_path / 'env.sqlite'}")
    with TuningDB() as db:
        assert db.url.endswith("env.sqlite")
    assert (tmp_path / "env.sqlite").exists()


def test_in_memory(toy):
    with TuningDB("sqlite://") as db:
        add(db)
        assert db.count() == 1


def test_postgresql_round_trip(toy, pg_url):
    with TuningDB(pg_url) as db:
        stored = add(db, samples=[2.0, 2.5])
        add(db, time_ms=5.0)  # slower: ignored
    with TuningDB(pg_url) as db:
        assert db.query() == [stored]
        with db.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT version FROM schema_version")).scalar_one() == SCHEMA_VERSION
