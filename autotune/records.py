"""Tuning records as JSON lines: export, validated all-or-nothing import, and the shipped records.

A record file is data from elsewhere (a colleague, a CI machine, the ``tuning_db/`` directory), and its
configs end up as constexprs in generated source. So every line is checked before anything is written:
types, ranges, identifiers where identifiers belong, enums where enums belong, and the config against
its template's search space. One bad line rejects the whole file.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from dsl.errors import DatabaseError, TuningError

from .db import DEVICE_FIELDS, SOURCES, Record, TuningDB
from .devices import Device
from .shape_keys import MAX_DIM

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "tuning_db"

LINE_FIELDS = ("template", "source_hash", "op_name", "device", "shape", "config", "time_ms", "samples",
               "throughput", "source", "triton_version", "kdsl_version", "created_at")
OPTIONAL_FIELDS = frozenset({"throughput"})
VENDORS = ("nvidia", "amd", "intel", "cpu")
MAX_LINE_CHARS = 100_000
MAX_SAMPLES = 10_000
MAX_ERRORS_SHOWN = 5

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_OP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_HEX = re.compile(r"[0-9a-f]{8,128}")
_DEVICE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_FINGERPRINT = re.compile(r"[a-z0-9][a-z0-9_.-]{0,80}-[0-9a-f]{8}")
# Marketing names: letters, digits, spaces and a little punctuation; no quotes, braces, newlines.
_FULL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._()/+-]{0,127}")
_ARCH = re.compile(r"sm_[0-9]{2,3}a?|gfx[0-9a-f]{3,4}|cpu")
_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}")


class LineError(Exception):
    """One problem on one line: the field and what is wrong with it."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field '{field}': {problem}")
        self.field = field


def _looks_like(value: str) -> str:
    # Say *why* a string was refused: text that carries code or prose gets named as such.
    if any(c in value for c in "\n;(){}[]=\"'`\\") or len(value) > 64 or " " in value.strip():
        return f"looks like source code or free text ({value[:40]!r}{'...' if len(value) > 40 else ''})"
    return f"{value!r} is not valid here"


def _string(value: Any, field: str, pattern: re.Pattern, expected: str) -> str:
    if not isinstance(value, str):
        raise LineError(field, f"expected {expected} (a string), got {type(value).__name__}")
    if not pattern.fullmatch(value):
        raise LineError(field, f"expected {expected}; {_looks_like(value)}")
    return value


def _enum(value: Any, field: str, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if not isinstance(value, str):
        raise LineError(field, f"expected one of {list(allowed)}, got {type(value).__name__}")
    if value not in allowed:
        raise LineError(field, f"expected one of {list(allowed)}; {_looks_like(value)}")
    return value


def _int(value: Any, field: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        shown = repr(value) if not isinstance(value, str) else _looks_like(value)
        raise LineError(field, f"expected an int in [{lo}, {hi}], got {type(value).__name__} {shown}")
    if not lo <= value <= hi:
        raise LineError(field, f"{value} is out of range [{lo}, {hi}]")
    return value


def _positive(value: Any, field: str, *, allow_zero: bool = False, hi: float = 1e12) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LineError(field, f"expected a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero) or value > hi:
        bound = ">= 0" if allow_zero else "> 0"
        raise LineError(field, f"{value} must be finite, {bound} and <= {hi:g}")
    return value


def _mapping_of_ints(value: Any, field: str, lo: int, hi: int) -> dict[str, int]:
    if not isinstance(value, dict) or not value:
        raise LineError(field, f"expected a non-empty object of NAME: int, got {type(value).__name__}")
    out = {}
    for name, size in value.items():
        if not _IDENT.fullmatch(name):
            raise LineError(field, f"key is not an identifier; {_looks_like(name)}")
        out[name] = _int(size, f"{field}.{name}", lo, hi)
    return out


def _device(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise LineError("device", f"expected an object with {list(DEVICE_FIELDS)}, got {type(value).__name__}")
    unknown = sorted(set(value) - set(DEVICE_FIELDS))
    if unknown:
        raise LineError("device", f"unknown field(s) {unknown}")
    missing = [f for f in DEVICE_FIELDS if f not in value and f != "driver"]
    if missing:
        raise LineError("device", f"missing field(s) {missing}")
    driver = value.get("driver")
    return {
        "fingerprint": _string(value["fingerprint"], "device.fingerprint", _FINGERPRINT, "a device fingerprint"),
        "name": _string(value["name"], "device.name", _DEVICE_NAME, "a device name"),
        "full_name": _string(value["full_name"], "device.full_name", _FULL_NAME, "a device model name"),
        "vendor": _enum(value["vendor"], "device.vendor", VENDORS),
        "arch": _string(value["arch"], "device.arch", _ARCH, "an architecture like sm_90 or gfx942"),
        "compute_capability": _int(value["compute_capability"], "device.compute_capability", 0, 1000),
        "sm_count": _int(value["sm_count"], "device.sm_count", 1, 1 << 20),
        "memory_bytes": _int(value["memory_bytes"], "device.memory_bytes", 0, 1 << 50),
        "driver": None if driver is None else _string(driver, "device.driver", _VERSION, "a driver version"),
    }


def _created_at(value: Any) -> dt.datetime:
    if not isinstance(value, str) or len(value) > 40:
        raise LineError("created_at", "expected an ISO 8601 time string")
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise LineError("created_at", f"expected an ISO 8601 time; {_looks_like(value)}") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.timezone.utc)


def parse_line(data: Any) -> Record:
    """Validate one decoded JSON line; raises LineError naming the first bad field."""
    from codegen.template import get_space

    if not isinstance(data, dict):
        raise LineError("<line>", f"expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(LINE_FIELDS))
    if unknown:
        raise LineError(unknown[0], f"unknown field (known: {', '.join(LINE_FIELDS)})")
    missing = [f for f in LINE_FIELDS if f not in data and f not in OPTIONAL_FIELDS]
    if missing:
        raise LineError(missing[0], "missing")

    template = _string(data["template"], "template", _IDENT, "a template name")
    try:
        space = get_space(template)
    except TuningError as exc:
        raise LineError("template", str(exc)) from None
    config = data["config"]
    if isinstance(config, dict):
        for name, value in config.items():  # name the offending entry before the space's own check
            if not _IDENT.fullmatch(name):
                raise LineError("config", f"parameter name is not an identifier; {_looks_like(name)}")
            _int(value, f"config.{name}", -(1 << 31), 1 << 31)
    else:
        raise LineError("config", f"expected an object of parameter: int, got {type(config).__name__}")
    try:
        config = space.validate(config, where=f"template '{template}'")
    except TuningError as exc:
        raise LineError("config", str(exc)) from None

    samples = data["samples"]
    if not isinstance(samples, list) or len(samples) > MAX_SAMPLES:
        raise LineError("samples", f"expected a list of at most {MAX_SAMPLES} numbers")
    samples = [_positive(x, f"samples[{i}]") for i, x in enumerate(samples)]
    throughput = data.get("throughput")

    return Record(
        template=template,
        source_hash=_string(data["source_hash"], "source_hash", _HEX, "a lowercase hex kernel hash"),
        op_name=_string(data["op_name"], "op_name", _OP_NAME, "an op name (dotted identifier)"),
        device=_device(data["device"]),
        shape=_mapping_of_ints(data["shape"], "shape", 1, MAX_DIM),
        config=config,
        time_ms=_positive(data["time_ms"], "time_ms", hi=1e7),
        samples=samples,
        throughput=None if throughput is None else _positive(throughput, "throughput", allow_zero=True, hi=1e18),
        source=_enum(data["source"], "source", SOURCES),
        triton_version=_string(data["triton_version"], "triton_version", _VERSION, "a version"),
        kdsl_version=_string(data["kdsl_version"], "kdsl_version", _VERSION, "a version"),
        created_at=_created_at(data["created_at"]),
    )


def read_records(path: str | Path) -> list[Record]:
    """Every record of a JSON-lines file, all validated; DatabaseError naming file, line and field otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatabaseError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatabaseError(f"{path}: cannot read ({exc})") from None
    return parse_lines(text.splitlines(), str(path))


def parse_lines(lines: Iterable[str], name: str) -> list[Record]:
    records: list[Record] = []
    errors: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            if len(line) > MAX_LINE_CHARS:
                raise LineError("<line>", f"longer than {MAX_LINE_CHARS} characters")
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LineError("<line>", f"invalid JSON ({exc.msg} at column {exc.colno})") from None
            records.append(parse_line(data))
        except LineError as exc:
            errors.append(f"{name}:{number}: {exc}")
    if errors:
        more = f" (and {len(errors) - MAX_ERRORS_SHOWN} more)" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise DatabaseError(f"rejected, nothing imported: {'; '.join(errors[:MAX_ERRORS_SHOWN])}{more}")
    return records


def import_records(db: TuningDB, path: str | Path) -> int:
    """Validate every line of ``path``, then write all of them in one transaction; returns the count."""
    records = read_records(path)
    return db.add_records(records)


def format_records(records: Iterable[Record]) -> Iterator[str]:
    for record in records:
        yield json.dumps(record.to_line(), sort_keys=True, separators=(",", ":"))


def export_records(db: TuningDB, path: str | Path | IO[str], *, device: Device | str | None = None,
                   template: str | None = None, sources: str | Iterable[str] | None = None) -> int:
    """Write matching records as JSON lines (``-`` = stdout); returns the count."""
    records = db.query(device=device, template=template, sources=sources)
    lines = "".join(line + "\n" for line in format_records(records))
    if path == "-":
        sys.stdout.write(lines)
    elif hasattr(path, "write"):
        path.write(lines)
    else:
        try:
            Path(path).write_text(lines, encoding="utf-8")
        except OSError as exc:
            raise DatabaseError(f"cannot write {path}: {exc}") from None
    return len(records)


def shipped_file(device: Device | str, directory: str | Path | None = None) -> Path:
    name = device.name if isinstance(device, Device) else device
    return Path(directory or SHIPPED_DIR) / f"{name}.jsonl"


def load_shipped(device: Device, directory: str | Path | None = None) -> list[Record]:
    """The shipped records for ``device`` from ``tuning_db/<name>.jsonl`` as source=shipped.

    Matched by device name and architecture, not fingerprint: the fingerprint of a real GPU includes
    what the driver reports (its exact name and memory), which a file written for "h100" cannot know.
    """
    path = shipped_file(device, directory)
    if not path.is_file():
        return []
    out = []
    for record in read_records(path):
        if record.device["name"] == device.name and record.device["arch"] == device.arch:
            out.append(_as_shipped(record))
    return out


def _as_shipped(record: Record) -> Record:
    return dataclasses.replace(record, source="shipped", id=None)


def write_shipped(records: Iterable[Record], device: Device | str, directory: str | Path | None = None) -> Path:
    """Write records as the shipped file of ``device`` (source=shipped), sorted so diffs stay reviewable."""
    rows = sorted((_as_shipped(r) for r in records),
                  key=lambda r: (r.template, r.source_hash, sorted(r.shape.items())))
    path = shipped_file(device, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in format_records(rows)), encoding="utf-8")
    return path

