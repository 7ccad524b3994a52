"""The tuning database: SQLAlchemy 2.0 ORM models, schema versioning, and safe concurrent writes.

Any SQLAlchemy URL works; the default is a SQLite file in the user's cache directory. Several tuning
workers may write at once: on SQLite every write runs in ``BEGIN IMMEDIATE`` (so a transaction never
has to upgrade a read snapshot to a write lock, the case SQLite answers with an immediate "database is
locked"), waits on the busy timeout, and is retried with backoff on top of that; on PostgreSQL,
serialization failures and unique-key races are retried the same way. Optuna's studies live in the same
database through :func:`optuna_storage`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import random
import re
import sqlite3
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from codegen.render import triton_version as current_triton_version
from dsl.errors import DatabaseError, TuningError

from .devices import Device
from .shape_keys import DEFAULT_MAX_RATIO, check_shape, nearest_shape, shape_key

SCHEMA_VERSION = 1
SOURCES = ("measured", "predicted", "shipped")
DEVICE_FIELDS = ("fingerprint", "name", "full_name", "vendor", "arch", "compute_capability", "sm_count",
                 "memory_bytes", "driver")
# How long one write may wait in total for other writers before it gives up with a DatabaseError.
DEFAULT_LOCK_TIMEOUT_S = 120.0
# Optuna's own tables may share the database (DESIGN.md); a file with only these is not foreign.
OPTUNA_TABLES = frozenset({
    "studies", "study_directions", "study_user_attributes", "study_system_attributes", "trials",
    "trial_params", "trial_values", "trial_intermediate_values", "trial_user_attributes",
    "trial_system_attributes", "trial_heartbeats", "version_info", "alembic_version",
})
_PG_SCHEMA_LOCK = 0x6B64_736C  # "kdsl": advisory lock key that serialises schema set-up


class Base(DeclarativeBase):
    pass


class DeviceRow(Base):
    __tablename__ = "devices"

    id: Mapped[int] = mapped_column(primary_key=True)
    fingerprint: Mapped[str] = mapped_column(sa.String(96), unique=True)
    name: Mapped[str] = mapped_column(sa.String(64), index=True)
    full_name: Mapped[str] = mapped_column(sa.String(128))
    vendor: Mapped[str] = mapped_column(sa.String(16))
    arch: Mapped[str] = mapped_column(sa.String(16))
    compute_capability: Mapped[int]
    sm_count: Mapped[int]
    memory_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    driver: Mapped[str | None] = mapped_column(sa.String(64))


class KernelRow(Base):
    __tablename__ = "kernels"

    id: Mapped[int] = mapped_column(primary_key=True)
    template: Mapped[str] = mapped_column(sa.String(64), index=True)
    source_hash: Mapped[str] = mapped_column(sa.String(128), unique=True)
    op_name: Mapped[str] = mapped_column(sa.String(128))


class TuningRecordRow(Base):
    __tablename__ = "tuning_records"
    __table_args__ = (
        sa.UniqueConstraint("kernel_id", "device_id", "shape_key", "source", "triton_version",
                            name="uq_tuning_record_key"),
        sa.CheckConstraint("source IN ('measured', 'predicted', 'shipped')", name="ck_tuning_record_source"),
        sa.CheckConstraint("time_ms > 0", name="ck_tuning_record_time"),
        sa.Index("ix_tuning_record_kernel_device", "kernel_id", "device_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kernel_id: Mapped[int] = mapped_column(sa.ForeignKey("kernels.id", ondelete="CASCADE"))
    device_id: Mapped[int] = mapped_column(sa.ForeignKey("devices.id", ondelete="CASCADE"))
    shape_key: Mapped[str] = mapped_column(sa.String(255))
    shape_json: Mapped[str] = mapped_column(sa.Text)
    config_json: Mapped[str] = mapped_column(sa.Text)
    time_ms: Mapped[float] = mapped_column(sa.Float)
    samples_json: Mapped[str] = mapped_column(sa.Text)
    throughput: Mapped[float | None] = mapped_column(sa.Float)
    source: Mapped[str] = mapped_column(sa.String(16))
    triton_version: Mapped[str] = mapped_column(sa.String(64))
    kdsl_version: Mapped[str] = mapped_column(sa.String(64))
    # Naive UTC in the column (SQLite has no time zones); aware UTC everywhere else.
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime)

    kernel: Mapped[KernelRow] = relationship(lazy="joined")
    device: Mapped[DeviceRow] = relationship(lazy="joined")


class SchemaVersionRow(Base):
    __tablename__ = "schema_version"

    id: Mapped[int] = mapped_column(primary_key=True)  # a single row, id 1
    version: Mapped[int]


# Migrations: MIGRATIONS[v] turns a schema at version v-1 into version v, inside the open transaction.
# A fresh database is created from the ORM models above and stamped SCHEMA_VERSION directly, so a
# migration must only use SQL (never the ORM models, which describe the newest schema). To change the
# schema: edit the models, bump SCHEMA_VERSION, and add MIGRATIONS[SCHEMA_VERSION].
Migration = Callable[[sa.Connection], None]
MIGRATIONS: dict[int, Migration] = {}


# ---------------------------------------------------------------- plain values handed to callers


@dataclasses.dataclass(frozen=True)
class Record:
    """One tuning record as plain data (no session attached)."""

    template: str
    source_hash: str
    op_name: str
    device: dict[str, Any]  # descriptor: DEVICE_FIELDS
    shape: dict[str, int]
    config: dict[str, int]
    time_ms: float
    samples: list[float]
    throughput: float | None
    source: str
    triton_version: str
    kdsl_version: str
    created_at: dt.datetime
    id: int | None = None

    @property
    def shape_key(self) -> str:
        return shape_key(self.shape)

    @property
    def device_name(self) -> str:
        return self.device["name"]

    @property
    def device_fingerprint(self) -> str:
        return self.device["fingerprint"]

    def to_line(self) -> dict[str, Any]:
        """The JSON-lines form (autotune.records)."""
        return {
            "template": self.template, "source_hash": self.source_hash, "op_name": self.op_name,
            "device": dict(self.device), "shape": dict(self.shape), "config": dict(self.config),
            "time_ms": self.time_ms, "samples": list(self.samples), "throughput": self.throughput,
            "source": self.source, "triton_version": self.triton_version,
            "kdsl_version": self.kdsl_version, "created_at": self.created_at.isoformat(),
        }


def device_descriptor(device: Device | Mapping[str, Any], driver: str | None = None) -> dict[str, Any]:
    """The descriptor fields the database keeps for a device."""
    if isinstance(device, Device):
        return {"fingerprint": device.fingerprint(), "name": device.name, "full_name": device.full_name,
                "vendor": device.vendor, "arch": device.arch,
                "compute_capability": device.compute_capability, "sm_count": device.sm_count,
                "memory_bytes": device.memory_bytes, "driver": driver}
    missing = [f for f in DEVICE_FIELDS if f not in device and f != "driver"]
    if missing:
        raise TuningError(f"device descriptor lacks {missing}")
    desc = {f: device.get(f) for f in DEVICE_FIELDS}
    if driver is not None:
        desc["driver"] = driver
    return desc


def current_kdsl_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("kdsl")
    except metadata.PackageNotFoundError:
        return "unknown"  # running from a source checkout that was never installed


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _to_column_time(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value


def _from_column_time(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# ---------------------------------------------------------------- URLs and engines


def default_url() -> str:
    """``KDSL_DB`` if set, else ``tuning.sqlite`` in KDSL_CACHE_DIR or the user's cache directory."""
    env = os.environ.get("KDSL_DB")
    if env:
        return env
    from dsl.paths import cache_root

    return f"sqlite:///{cache_root() / 'tuning.sqlite'}"


def resolve_url(url: str | None) -> str:
    """A full SQLAlchemy URL: None means the default, a bare path means a SQLite file."""
    if url is None or url == "":
        return default_url()
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    return url


_PASSWORD_IN_URL = re.compile(r"(://[^:/@]*:)[^@]*@")


def redact_url(url: str) -> str:
    """The URL for messages: the password replaced by ***, even when the URL does not parse."""
    return _PASSWORD_IN_URL.sub(r"\1***@", url)


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__


def _sqlite_file(url: sa.URL) -> Path | None:
    """The file behind a SQLite URL, or None for an in-memory database."""
    if url.get_backend_name() != "sqlite":
        return None
    db = url.database or ""
    if db in ("", ":memory:") or db.startswith("file:") or url.query.get("mode") == "memory":
        return None
    return Path(db)


def _install_sqlite_transactions(engine: sa.Engine, *, always_immediate: bool) -> None:
    """Take transaction control away from pysqlite so writes can start with BEGIN IMMEDIATE.

    pysqlite's default begins a transaction lazily at the first write statement; a transaction that
    read first then holds a read snapshot that SQLite refuses to upgrade when another process has
    committed since (SQLITE_BUSY without waiting). Beginning writes IMMEDIATE takes the write lock
    up front, where the busy timeout applies. ``always_immediate`` is for engines whose callers we do
    not control (Optuna's), which mix reads and writes in one transaction.
    """

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")  # safe in WAL mode: a crash loses no commit
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn):
        write = always_immediate or conn.get_execution_options().get("kdsl_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _is_lock_contention(exc: BaseException) -> bool:
    """A failure that another writer caused and that the same work, retried, will get past."""
    if isinstance(exc, sa_exc.OperationalError):
        text = str(getattr(exc, "orig", exc)).lower()
        if "database is locked" in text or "database table is locked" in text or "busy" in text:
            return True
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
    # 40001 serialization failure, 40P01 deadlock, 55P03 lock not available.
    return sqlstate in ("40001", "40P01", "55P03")


def _is_key_race(exc: BaseException) -> bool:
    # Two writers inserted the same unique key at once; re-running the work finds the other's row.
    return isinstance(exc, sa_exc.IntegrityError)


T = TypeVar("T")


# ---------------------------------------------------------------- the database


class TuningDB:
    """A tuning database at a SQLAlchemy URL. Use :meth:`open` (or the constructor) and :meth:`close`."""

    def __init__(self, url: str | None = None, *, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S):
        self.url = resolve_url(url)
        self.shown_url = redact_url(self.url)
        self.lock_timeout_s = lock_timeout_s
        try:
            parsed = sa.make_url(self.url)
        except (sa_exc.ArgumentError, ValueError) as exc:
            raise DatabaseError(f"invalid database URL '{self.shown_url}': {_first_line(exc)}") from None
        self.shown_url = parsed.render_as_string(hide_password=True)
        self.backend = parsed.get_backend_name()
        self._file = _sqlite_file(parsed)
        if self._file is not None:
            self._check_sqlite_file(self._file)
        self.engine = self._create_engine(parsed)
        try:
            self._prepare_schema()
        except BaseException:
            self.engine.dispose()
            raise

    @classmethod
    def open(cls, url: str | None = None, **kwargs) -> TuningDB:
        return cls(url, **kwargs)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> TuningDB:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TuningDB({self.shown_url!r})"

    # -- opening

    def _check_sqlite_file(self, path: Path) -> None:
        # Only stat the file, never open it: closing any descriptor of a SQLite file drops every POSIX
        # lock this process holds on it, including the shared lock of a live WAL connection, after
        # which another process may checkpoint and delete the WAL under it and commits are lost.
        # SQLite itself refuses a foreign file ("file is not a database") without writing to it.
        if path.exists() and not path.is_file():
            raise DatabaseError(f"database '{path}' is not a file")
        if not path.exists() and not path.parent.is_dir():
            raise DatabaseError(f"cannot create database '{path}': directory {path.parent} does not exist")

    def _create_engine(self, url: sa.URL) -> sa.Engine:
        kwargs: dict[str, Any] = {}
        if self.backend == "sqlite":
            # The busy timeout (seconds) is how long SQLite itself waits for another writer.
            kwargs["connect_args"] = {"timeout": min(30.0, self.lock_timeout_s)}
            if self._file is None:
                kwargs["poolclass"] = sa.pool.StaticPool  # one shared in-memory database
        elif self.backend == "postgresql":
            kwargs["pool_pre_ping"] = True
            if url.get_driver_name() in ("psycopg", "psycopg2"):
                kwargs["connect_args"] = {"connect_timeout": 10}
        try:
            engine = sa.create_engine(url, **kwargs)
        except (sa_exc.NoSuchModuleError, ImportError) as exc:
            hint = " (install kdsl[postgres] for PostgreSQL)" if self.backend == "postgresql" else ""
            raise DatabaseError(f"cannot use database URL '{self.shown_url}': {_first_line(exc)}{hint}") \
                from None
        except sa_exc.ArgumentError as exc:
            raise DatabaseError(f"invalid database URL '{self.shown_url}': {_first_line(exc)}") from None
        if self.backend == "sqlite":
            _install_sqlite_transactions(engine, always_immediate=False)
        return engine

    def _inspect_schema(self, conn: sa.Connection) -> int | None:
        """The schema version of the database; None when it is fresh (no kdsl tables yet)."""
        tables = set(sa.inspect(conn).get_table_names())
        if SchemaVersionRow.__tablename__ not in tables:
            foreign = sorted(tables - OPTUNA_TABLES)
            if foreign:
                shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
                raise DatabaseError(f"'{self.shown_url}' is not a kdsl tuning database (it has tables {shown} "
                                    "and no schema_version); nothing was written")
            return None
        rows = conn.execute(sa.select(SchemaVersionRow.version)).scalars().all()
        if len(rows) != 1 or not isinstance(rows[0], int) or rows[0] < 1:
            raise DatabaseError(f"'{self.shown_url}': schema_version table is corrupt ({rows!r}); "
                                "nothing was written")
        version = rows[0]
        if version > SCHEMA_VERSION:
            raise DatabaseError(f"'{self.shown_url}' has schema version {version}, newer than this kdsl "
                                f"understands ({SCHEMA_VERSION}); upgrade kdsl")
        return version

    def _prepare_schema(self) -> None:
        version = self._read(self._inspect_schema)
        if self._file is not None:
            self._enable_wal()
        if version == SCHEMA_VERSION:
            return

        def setup(session: Session) -> None:
            conn = session.connection()
            if self.backend == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_SCHEMA_LOCK})")
            current = self._inspect_schema(conn)  # again: another process may have done it meanwhile
            if current is None:
                Base.metadata.create_all(conn)
                conn.execute(sa.insert(SchemaVersionRow).values(id=1, version=SCHEMA_VERSION))
                return
            for target in range(current + 1, SCHEMA_VERSION + 1):
                migration = MIGRATIONS.get(target)
                if migration is None:
                    raise DatabaseError(f"'{self.shown_url}': no migration from schema {target - 1} to {target}")
                try:
                    migration(conn)
                except sa_exc.SQLAlchemyError as exc:
                    raise DatabaseError(f"'{self.shown_url}': migration to schema {target} failed "
                                        f"({_first_line(exc)}); the database was left at {current}") from None
            conn.execute(sa.update(SchemaVersionRow).where(SchemaVersionRow.id == 1)
                         .values(version=SCHEMA_VERSION))

        self._write(setup)

    def _enable_wal(self) -> None:
        # WAL lets readers run beside a writer. The mode is stored in the file, so this runs once per
        # file in practice; it needs no open transaction, hence the raw driver connection. SQLite answers
        # a switch it cannot make now (another connection busy) with the old mode, not an error.
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.01
        while True:
            with self.engine.connect() as conn:
                raw = conn.connection.driver_connection
                try:
                    mode = raw.execute("PRAGMA journal_mode").fetchone()[0].lower()
                    if mode != "wal":
                        mode = raw.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower()
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) and "busy" not in str(exc):
                        raise self._wrap(sa_exc.OperationalError("PRAGMA journal_mode", {}, exc)) from None
                    mode = "locked"
            if mode == "wal":
                return
            if time.monotonic() > deadline:
                raise DatabaseError(f"'{self.shown_url}': could not switch to WAL mode (still '{mode}' "
                                    f"after {self.lock_timeout_s:.0f} s)")
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 1.0)

    # -- transactions with retry

    def _retry(self, work: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.01
        key_races = 0
        while True:
            try:
                return work()
            except sa_exc.DBAPIError as exc:
                if _is_key_race(exc) and key_races < 5:
                    key_races += 1
                elif not _is_lock_contention(exc):
                    raise self._wrap(exc) from None
                if time.monotonic() > deadline:
                    raise DatabaseError(f"'{self.shown_url}': still locked by other writers after "
                                        f"{self.lock_timeout_s:.0f} s ({_first_line(exc)})") from None
            # Jitter keeps workers that collided from colliding again in lockstep.
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 1.0)

    def _wrap(self, exc: sa_exc.DBAPIError) -> DatabaseError:
        if isinstance(exc, sa_exc.OperationalError) and self.backend != "sqlite":
            return DatabaseError(f"cannot reach database '{self.shown_url}': {_first_line(exc)}")
        if isinstance(exc, (sa_exc.DatabaseError, sa_exc.OperationalError)) and "not a database" in str(exc):
            return DatabaseError(f"'{self.shown_url}' is not a SQLite database (corrupt or foreign file); "
                                 "nothing was written")
        if "malformed" in str(exc):
            return DatabaseError(f"'{self.shown_url}' is corrupt ({_first_line(exc)}); nothing was written")
        return DatabaseError(f"database '{self.shown_url}': {_first_line(exc)}")

    def _write(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn`` in one write transaction, committed as a whole, retried on lock contention."""

        def attempt() -> T:
            with self.engine.connect() as conn:
                conn.execution_options(kdsl_write=True)
                with conn.begin(), Session(bind=conn, expire_on_commit=False) as session:
                    result = fn(session)
                    session.flush()
            return result

        return self._retry(attempt)

    def _read(self, fn: Callable[[sa.Connection], T]) -> T:
        def attempt() -> T:
            with self.engine.connect() as conn, conn.begin():
                return fn(conn)

        return self._retry(attempt)

    def _read_session(self, fn: Callable[[Session], T]) -> T:
        def run(conn: sa.Connection) -> T:
            with Session(bind=conn) as session:
                return fn(session)

        return self._read(run)

    # -- devices and kernels

    @staticmethod
    def _device_row(session: Session, descriptor: Mapping[str, Any]) -> DeviceRow:
        row = session.scalars(sa.select(DeviceRow).where(DeviceRow.fingerprint == descriptor["fingerprint"])).first()
        if row is None:
            row = DeviceRow(**{f: descriptor.get(f) for f in DEVICE_FIELDS})
            session.add(row)
            session.flush()
        elif descriptor.get("driver") and row.driver != descriptor["driver"]:
            row.driver = descriptor["driver"]
        return row

    @staticmethod
    def _kernel_row(session: Session, template: str, source_hash: str, op_name: str) -> KernelRow:
        row = session.scalars(sa.select(KernelRow).where(KernelRow.source_hash == source_hash)).first()
        if row is None:
            row = KernelRow(template=template, source_hash=source_hash, op_name=op_name)
            session.add(row)
            session.flush()
        elif row.template != template:
            raise DatabaseError(f"kernel {source_hash} is already recorded as template '{row.template}', "
                                f"not '{template}'")
        return row

    def upsert_device(self, device: Device | Mapping[str, Any], driver: str | None = None) -> int:
        descriptor = device_descriptor(device, driver)
        return self._write(lambda s: self._device_row(s, descriptor).id)

    def upsert_kernel(self, template: str, source_hash: str, op_name: str) -> int:
        return self._write(lambda s: self._kernel_row(s, template, source_hash, op_name).id)

    # -- records

    def add_record(self, *, template: str, source_hash: str, op_name: str, device: Device | Mapping[str, Any],
                   shape: Mapping[str, int], config: Mapping[str, int], time_ms: float,
                   samples: Iterable[float] = (), throughput: float | None = None, source: str = "measured",
                   triton_version: str | None = None, kdsl_version: str | None = None,
                   created_at: dt.datetime | None = None) -> Record:
        """Store one record; returns what the database now holds for its key.

        Per key (kernel, device, shape, source, Triton version) a ``measured`` record is only replaced
        by a faster one, so concurrent tuners keep the best; other sources are replaced by the newest.
        """
        record = self.make_record(template=template, source_hash=source_hash, op_name=op_name, device=device,
                                  shape=shape, config=config, time_ms=time_ms, samples=samples,
                                  throughput=throughput, source=source, triton_version=triton_version,
                                  kdsl_version=kdsl_version, created_at=created_at)
        return self._write(lambda s: _row_to_record(self._store(s, record)))

    def add_records(self, records: Iterable[Record]) -> int:
        """Store many records in one transaction: all of them or, on any error, none."""
        records = list(records)

        def store_all(session: Session) -> int:
            for record in records:
                self._store(session, record)
            return len(records)

        return self._write(store_all)

    @staticmethod
    def make_record(*, template: str, source_hash: str, op_name: str, device: Device | Mapping[str, Any],
                    shape: Mapping[str, int], config: Mapping[str, int], time_ms: float,
                    samples: Iterable[float] = (), throughput: float | None = None, source: str = "measured",
                    triton_version: str | None = None, kdsl_version: str | None = None,
                    created_at: dt.datetime | None = None) -> Record:
        """A checked :class:`Record` (raises TuningError); the config is validated by its template's space."""
        from codegen.template import get_space

        if source not in SOURCES:
            raise TuningError(f"record source must be one of {SOURCES}, got {source!r}")
        if isinstance(time_ms, bool) or not isinstance(time_ms, (int, float)) or not math.isfinite(time_ms) \
                or time_ms <= 0:
            raise TuningError(f"record time_ms must be a finite positive number, got {time_ms!r}")
        samples = [float(x) for x in samples]
        if not all(math.isfinite(x) and x > 0 for x in samples):
            raise TuningError("record samples must be finite positive numbers")
        if throughput is not None and (not math.isfinite(throughput) or throughput < 0):
            raise TuningError(f"record throughput must be finite and >= 0, got {throughput!r}")
        clean_config = get_space(template).validate(config, where=f"config of {template} kernel {source_hash}")
        when = created_at or utcnow()
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        return Record(template=template, source_hash=source_hash, op_name=op_name,
                      device=device_descriptor(device), shape=check_shape(shape), config=clean_config,
                      time_ms=float(time_ms), samples=samples,
                      throughput=None if throughput is None else float(throughput), source=source,
                      triton_version=triton_version or current_triton_version(),
                      kdsl_version=kdsl_version or current_kdsl_version(), created_at=when)

    def _store(self, session: Session, record: Record) -> TuningRecordRow:
        device = self._device_row(session, record.device)
        kernel = self._kernel_row(session, record.template, record.source_hash, record.op_name)
        key = record.shape_key
        row = session.scalars(sa.select(TuningRecordRow).where(
            TuningRecordRow.kernel_id == kernel.id, TuningRecordRow.device_id == device.id,
            TuningRecordRow.shape_key == key, TuningRecordRow.source == record.source,
            TuningRecordRow.triton_version == record.triton_version)).first()
        if row is not None and record.source == "measured" and row.time_ms <= record.time_ms:
            return row  # an equal or faster measurement is already there
        if row is None:
            row = TuningRecordRow(kernel=kernel, device=device, shape_key=key, source=record.source,
                                  triton_version=record.triton_version)
            session.add(row)
        row.shape_json = _dumps(record.shape)
        row.config_json = _dumps(record.config)
        row.time_ms = record.time_ms
        row.samples_json = _dumps(record.samples)
        row.throughput = record.throughput
        row.kdsl_version = record.kdsl_version
        row.created_at = _to_column_time(record.created_at)
        session.flush()
        return row

    def _filtered(self, stmt, *, template=None, source_hash=None, op_name=None, device=None, shape_key=None,
                  sources=None, triton_version=None, created_before=None):
        if template is not None:
            stmt = stmt.where(KernelRow.template == template)
        if source_hash is not None:
            stmt = stmt.where(KernelRow.source_hash == source_hash)
        if op_name is not None:
            stmt = stmt.where(KernelRow.op_name == op_name)
        if device is not None:
            if isinstance(device, Device):
                stmt = stmt.where(DeviceRow.fingerprint == device.fingerprint())
            else:
                stmt = stmt.where(sa.or_(DeviceRow.name == device, DeviceRow.fingerprint == device))
        if shape_key is not None:
            stmt = stmt.where(TuningRecordRow.shape_key == shape_key)
        if sources is not None:
            sources = [sources] if isinstance(sources, str) else list(sources)
            stmt = stmt.where(TuningRecordRow.source.in_(sources))
        if triton_version is not None:
            stmt = stmt.where(TuningRecordRow.triton_version == triton_version)
        if created_before is not None:
            stmt = stmt.where(TuningRecordRow.created_at < _to_column_time(created_before))
        return stmt

    def query(self, *, template: str | None = None, source_hash: str | None = None, op_name: str | None = None,
              device: Device | str | None = None, shape: Mapping[str, int] | None = None,
              sources: str | Iterable[str] | None = None, triton_version: str | None = None,
              created_before: dt.datetime | None = None, limit: int | None = None) -> list[Record]:
        """Records matching every given filter, oldest first. ``device``: a Device, a name or a fingerprint."""
        stmt = (sa.select(TuningRecordRow).join(TuningRecordRow.kernel).join(TuningRecordRow.device)
                .order_by(TuningRecordRow.id))
        stmt = self._filtered(stmt, template=template, source_hash=source_hash, op_name=op_name, device=device,
                              shape_key=None if shape is None else shape_key(shape), sources=sources,
                              triton_version=triton_version, created_before=created_before)
        if limit is not None:
            stmt = stmt.limit(limit)
        return self._read_session(lambda s: [_row_to_record(r) for r in s.scalars(stmt).unique()])

    def get(self, record_id: int) -> Record | None:
        def fetch(session: Session) -> Record | None:
            row = session.get(TuningRecordRow, record_id)
            return None if row is None else _row_to_record(row)

        return self._read_session(fetch)

    def count(self) -> int:
        return self._read(lambda c: c.execute(sa.select(sa.func.count()).select_from(TuningRecordRow)).scalar_one())

    def nearest(self, *, source_hash: str, device: Device | str, shape: Mapping[str, int], token_dim: str,
                sources: str | Iterable[str] = "measured", triton_version: str | None = None,
                max_ratio: float = DEFAULT_MAX_RATIO) -> Record | None:
        """The record of the same kernel and device at the nearest shape within the token gap, or None.

        Only ``token_dim`` may differ, by at most ``max_ratio``; an exact match is the nearest of all.
        """
        candidates = self.query(source_hash=source_hash, device=device, sources=sources,
                                triton_version=triton_version or current_triton_version())
        found = nearest_shape(shape, ((r.shape, r) for r in candidates), token_dim, max_ratio)
        return None if found is None else found[1]

    def delete(self, record_ids: Iterable[int]) -> int:
        ids = list(record_ids)

        def remove(session: Session) -> int:
            if not ids:
                return 0
            result = session.execute(sa.delete(TuningRecordRow).where(TuningRecordRow.id.in_(ids)))
            return result.rowcount

        return self._write(remove)

    def prune(self, *, device: Device | str | None = None, template: str | None = None,
              older_than: dt.timedelta | None = None, stale: bool = False, triton_version: str | None = None,
              dry_run: bool = False) -> int:
        """Delete records matching every given criterion; returns how many (would be) deleted.

        ``stale`` selects records of a Triton version other than ``triton_version`` (default: installed).
        At least one criterion is required, so an empty call never wipes the database.
        """
        if device is None and template is None and older_than is None and not stale:
            raise DatabaseError("prune needs at least one of: device, template, older_than, stale")
        stmt = sa.select(TuningRecordRow.id).join(TuningRecordRow.kernel).join(TuningRecordRow.device)
        stmt = self._filtered(stmt, template=template, device=device,
                              created_before=None if older_than is None else utcnow() - older_than)
        if stale:
            stmt = stmt.where(TuningRecordRow.triton_version != (triton_version or current_triton_version()))

        def remove(session: Session) -> int:
            ids = list(session.scalars(stmt))
            if not dry_run and ids:
                for start in range(0, len(ids), 500):  # stay below the bound-parameter limit
                    chunk = ids[start:start + 500]
                    session.execute(sa.delete(TuningRecordRow).where(TuningRecordRow.id.in_(chunk)))
            return len(ids)

        return self._write(remove) if not dry_run else self._read_session(remove)

    def devices(self) -> list[dict[str, Any]]:
        return self._read_session(lambda s: [{f: getattr(r, f) for f in DEVICE_FIELDS}
                                             for r in s.scalars(sa.select(DeviceRow).order_by(DeviceRow.id))])


def _row_to_record(row: TuningRecordRow) -> Record:
    return Record(
        id=row.id, template=row.kernel.template, source_hash=row.kernel.source_hash, op_name=row.kernel.op_name,
        device={f: getattr(row.device, f) for f in DEVICE_FIELDS}, shape=json.loads(row.shape_json),
        config=json.loads(row.config_json), time_ms=row.time_ms, samples=json.loads(row.samples_json),
        throughput=row.throughput, source=row.source, triton_version=row.triton_version,
        kdsl_version=row.kdsl_version, created_at=_from_column_time(row.created_at))


def open_db(url: str | None = None) -> TuningDB:
    return TuningDB(url)


# ---------------------------------------------------------------- Optuna's storage in the same database


@contextlib.contextmanager
def _storage_setup_lock(db: TuningDB):
    """Serialise Optuna's table creation and version stamping across processes (both race otherwise)."""
    if db._file is not None:
        import fcntl

        with open(f"{db._file}.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    elif db.backend == "postgresql":
        with db.engine.connect() as conn:
            conn.exec_driver_sql(f"SELECT pg_advisory_lock({_PG_SCHEMA_LOCK + 1})")
            try:
                yield
            finally:
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock({_PG_SCHEMA_LOCK + 1})")
                conn.commit()
    else:
        yield


def optuna_storage(url: str | None = None, *, heartbeat_interval: int = 10, grace_period: int | None = None,
                   max_retry: int = 3, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S):
    """An Optuna RDBStorage on the tuning database, safe for several worker processes on one study.

    - SQLite: WAL, a long busy timeout and BEGIN IMMEDIATE on every transaction, so workers queue for
      the write lock instead of failing with "database is locked".
    - Heartbeats: a worker that dies (SIGKILL, OOM) leaves its trial RUNNING; once its heartbeat is
      older than ``grace_period`` the next worker to start a trial marks it FAIL, and
      RetryHeartbeatStaleTrialCallback re-enqueues its parameters, so the study resumes where it stopped and
      no completed trial is lost (completed trials are committed as they finish).
    """
    import optuna

    db = TuningDB(url, lock_timeout_s=lock_timeout_s)  # validates the file, creates kdsl's tables, sets WAL
    try:
        engine_kwargs: dict[str, Any] = {}
        if db.backend == "sqlite":
            engine_kwargs["connect_args"] = {"timeout": lock_timeout_s}
        elif db.backend == "postgresql":
            engine_kwargs["pool_pre_ping"] = True
        with warnings.catch_warnings():
            # Heartbeats and their retry callback are marked experimental, and are what makes resuming work.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
            with _storage_setup_lock(db):
                try:
                    storage = optuna.storages.RDBStorage(
                        db.url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                        grace_period=grace_period or 3 * heartbeat_interval,
                        heartbeat_stale_trial_callback=callback)
                except (sa_exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
                    raise DatabaseError(f"cannot open Optuna storage at '{db.shown_url}': "
                                        f"{_first_line(exc)}") from None
    finally:
        db.close()
    if db.backend == "sqlite":
        _install_sqlite_transactions(storage.engine, always_immediate=True)
        storage.engine.dispose()  # connections made during set-up lack the listeners
    return storage
