"""The lookup chain: which config a kernel runs with, and where that config came from.

    explicit override -> exact measured record -> nearest measured shape on this device (bounded gap)
    -> shipped record for this device -> predicted record -> the template's default

Records of another Triton version are stale (a config tuned for one compiler may spill or fault on
the next) and are skipped; records whose config no longer fits the template's space are skipped too,
since configs become constexprs in generated source. The answer for a (kernel, shape, device) is kept
in memory, so a compiled op asks the database once per new shape, never per call.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

from dsl.errors import TuningError

from codegen.render import triton_version as current_triton_version

from .db import Record, TuningDB
from .devices import Device, local_device
from .shape_keys import DEFAULT_MAX_RATIO, check_shape, nearest_shape, shape_key
from codegen.template import get_space

LABELS = ("override", "measured", "nearest", "shipped", "predicted", "default")


class DefaultConfigWarning(UserWarning):
    """A kernel runs with its template's default config because nothing was tuned for it."""


class Resolution(NamedTuple):
    config: dict[str, int]
    source: str  # one of LABELS
    detail: str


def tune_command(shape: Mapping[str, int], op_file: str | None, op_name: str | None) -> str:
    """The command that tunes this kernel at this shape (placeholders where the op is unknown)."""
    return f"kdsl tune {op_file or 'FILE.py'}:{op_name or 'OP'} --shape {shape_key(shape)}"


def template_tune_command(template: str, shape: Mapping[str, int], options: Mapping[str, object]) -> str:
    """The command that tunes a template without an op (the quantized GEMMs); each option is a flag
    of the same name (``group_size=128`` -> ``--group-size 128``, ``asym=True`` -> ``--asym``)."""
    words = [f"kdsl tune {template} --shape " + ",".join(f"{k}={v}" for k, v in shape.items())]
    for name, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        words.append(flag if value is True else f"{flag} {value}")
    return " ".join(words)


def _same_model(record: Record, device: Device) -> bool:
    # Shipped and predicted records are written for a device model ("h100"), not for one machine.
    return record.device_fingerprint == device.fingerprint() or (
        record.device_name == device.name and record.device["arch"] == device.arch)


class ConfigResolver:
    """Resolves configs through the lookup chain and remembers the answers.

    ``db``: a TuningDB, a URL, None for the default database, or False for none (shipped records and
    defaults only). A URL or None is opened on the first lookup that needs it.
    """

    def __init__(self, db: TuningDB | str | None | bool = None, *, device: Device | None = None,
                 triton_version: str | None = None, shipped_dir: str | None = None,
                 max_ratio: float = DEFAULT_MAX_RATIO):
        if db is True:
            db = None
        self._db_arg = db
        self._db: TuningDB | None = db if isinstance(db, TuningDB) else None
        self._owns_db = False
        self.device = device or local_device()
        self.triton_version = triton_version or current_triton_version()
        self.shipped_dir = shipped_dir
        self.max_ratio = max_ratio
        self._cache: dict[tuple[str, str, str], Resolution] = {}
        self._shipped: list[Record] | None = None
        self._warned: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()

    # -- sources

    def _database(self) -> TuningDB | None:
        if self._db is None and self._db_arg is not False:
            self._db = TuningDB(self._db_arg)  # type: ignore[arg-type]
            self._owns_db = True
        return self._db

    def _shipped_records(self) -> list[Record]:
        if self._shipped is None:
            from .records import load_shipped

            self._shipped = load_shipped(self.device, self.shipped_dir)
        return self._shipped

    def close(self) -> None:
        if self._owns_db and self._db is not None:
            self._db.close()
        self._db = None if self._owns_db else self._db

    def invalidate(self, source_hash: str | None = None) -> None:
        """Forget cached answers (all, or one kernel's), e.g. after new records were tuned."""
        with self._lock:
            for key in [k for k in self._cache if source_hash is None or k[0] == source_hash]:
                del self._cache[key]

    # -- the chain

    def resolve(self, template: str, source_hash: str, shape: Mapping[str, int], *, token_dim: str = "M",
                op_file: str | None = None, op_name: str | None = None,
                override: Mapping[str, int] | None = None,
                op_shape: Mapping[str, int] | None = None, tune_hint: str | None = None) -> Resolution:
        """``tune_hint``: the command the default-config warning names, where ``kdsl tune FILE.py:OP``
        does not apply (kernels tuned as templates)."""
        space = get_space(template)
        if override is not None:
            config = space.validate(override, where=f"override for kernel {source_hash} ({template})")
            return Resolution(config, "override", "explicit config given by the caller")
        shape = check_shape(shape)
        key = (source_hash, shape_key(shape), self.device.fingerprint())
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        with self._lock:
            cached = self._cache.get(key)
            if cached is None:
                cached = self._resolve_uncached(space, source_hash, shape, token_dim, op_file, op_name,
                                                op_shape, tune_hint)
                self._cache[key] = cached
        return cached

    def _resolve_uncached(self, space, source_hash: str, shape: dict[str, int], token_dim: str,
                          op_file: str | None, op_name: str | None,
                          op_shape: Mapping[str, int] | None = None, tune_hint: str | None = None) -> Resolution:
        db = self._database()
        stored = db.query(source_hash=source_hash) if db is not None else []
        shipped = [r for r in self._shipped_records() if r.source_hash == source_hash]
        usable, notes = self._usable(space, stored + shipped)

        measured = [r for r in usable if r.source == "measured"
                    and r.device_fingerprint == self.device.fingerprint()]
        key = shape_key(shape)
        for r in measured:
            if r.shape_key == key:
                return self._found(r, "measured", f"record #{r.id}: {r.time_ms:.4g} ms at {key} on "
                                   f"{self.device.name}, Triton {r.triton_version}", notes)
        found = self._nearest(shape, measured, token_dim)
        if found is not None:
            return self._found(found, "nearest", f"record #{found.id} measured at {found.shape_key} "
                               f"({found.time_ms:.4g} ms), nearest to {key} within {self.max_ratio:g}x "
                               f"in {token_dim}", notes)
        for label in ("shipped", "predicted"):
            candidates = [r for r in usable if r.source == label and _same_model(r, self.device)]
            exact = [r for r in candidates if r.shape_key == key]
            record = exact[0] if exact else self._nearest(shape, candidates, token_dim)
            if record is not None:
                where = "at this shape" if exact else f"at {record.shape_key}, nearest to {key}"
                origin = f" record #{record.id}" if record.id is not None else " record (tuning_db/)"
                return self._found(record, label, f"{label}{origin} for {record.device_name} {where}", notes)

        # An op called with an empty dimension (zero tokens) still launches kernels over padded or
        # bucketed problems; the command then names the kernel's own shape.
        usable_op_shape = op_shape if op_shape and all(v >= 1 for v in op_shape.values()) else None
        command = tune_hint or tune_command(usable_op_shape or shape, op_file, op_name)
        warn_key = (source_hash, key, self.device.fingerprint())
        if warn_key not in self._warned:
            self._warned.add(warn_key)
            warnings.warn(f"no tuned config for {space.template} kernel {source_hash} at {key} on "
                          f"{self.device.name}; using the template default. Run `{command}` to tune it.",
                          DefaultConfigWarning, stacklevel=3)
        detail = f"no record for {key} on {self.device.name}; run `{command}`"
        return Resolution(dict(space.default), "default", detail + "".join(f"; {n}" for n in notes))

    def _nearest(self, shape: dict[str, int], records: Iterable[Record], token_dim: str) -> Record | None:
        found = nearest_shape(shape, ((r.shape, r) for r in records), token_dim, self.max_ratio)
        return None if found is None else found[1]

    def _usable(self, space, records: list[Record]) -> tuple[list[Record], list[str]]:
        usable, stale, unfit = [], [], 0
        for r in records:
            if r.triton_version != self.triton_version:
                stale.append(r)
                continue
            try:
                space.validate(r.config, where="record")
            except TuningError:
                unfit += 1
                continue
            usable.append(r)
        notes = []
        if stale:
            versions = ", ".join(sorted({r.triton_version for r in stale}))
            notes.append(f"skipped {len(stale)} stale record(s) from Triton {versions} (installed "
                         f"{self.triton_version}; `kdsl db prune --stale` removes them)")
        if unfit:
            notes.append(f"skipped {unfit} record(s) whose config no longer fits template '{space.template}'")
        return usable, notes

    @staticmethod
    def _found(record: Record, label: str, detail: str, notes: list[str]) -> Resolution:
        return Resolution(dict(record.config), label, detail + "".join(f"; {n}" for n in notes))


class KernelChoice(NamedTuple):
    """The config a directly launched kernel runs with and where it came from (its ``explain``)."""

    kernel: str
    template: str
    problem: dict
    config: dict
    source: str  # one of LABELS
    detail: str

    def __str__(self) -> str:
        prob = ", ".join(f"{k}={v}" for k, v in self.problem.items())
        cfg = ", ".join(f"{k}={v}" for k, v in self.config.items())
        return f"{self.kernel} [{self.template}] {prob}: {cfg}  <- {self.source}" + (
            f" ({self.detail})" if self.detail else "")


class DirectConfigs:
    """Configs of kernels that library code launches itself, with no CompiledOp around them (the
    quantized GEMMs behind QuantLinear): the lookup chain for the tensors' device, ending in the
    template's shape-aware default instead of its static one.

    Answers are kept per call key, which the caller builds from what it has at hand (kernel, token
    bucket, sizes, torch device), so a call at a known shape costs one dict lookup: these kernels
    sit on the hot path of every quantized linear layer. One resolver per device opens the default
    database (``KDSL_DB``) on its first miss; :meth:`clear` forgets everything, e.g. after tuning
    in the same process or when ``KDSL_DB`` changes.
    """

    def __init__(self):
        self._chosen: dict = {}
        self._resolvers: dict[str, ConfigResolver] = {}
        self._lock = threading.Lock()

    def cached(self, key) -> KernelChoice | None:
        return self._chosen.get(key)

    def choose(self, key, *, kernel: str, template: str, source_hash: str, problem: Mapping[str, int],
               device: Device, default: Callable[[Mapping[str, int], Device], dict], tune_hint: str,
               token_dim: str = "M") -> KernelChoice:
        with self._lock:
            found = self._chosen.get(key)
            if found is None:
                found = self._chosen[key] = self._choose(kernel, template, source_hash, dict(problem),
                                                         device, default, tune_hint, token_dim)
        return found

    def _choose(self, kernel, template, source_hash, problem, device, default, tune_hint, token_dim):
        resolver = self._resolvers.get(device.fingerprint())
        if resolver is None:
            resolver = self._resolvers[device.fingerprint()] = ConfigResolver(None, device=device)
        found = resolver.resolve(template, source_hash, problem, token_dim=token_dim, tune_hint=tune_hint)
        if found.source != "default":
            # A record borrowed from a near shape (or tuned for a device model) may break a rule of
            # this exact problem; the kernel would still compute correctly, but the space says no.
            bad = get_space(template).violations(found.config, problem, device)
            if not bad:
                return KernelChoice(kernel, template, problem, found.config, found.source, found.detail)
            found = found._replace(detail=f"{found.source} config {found.config} violates "
                                          f"{', '.join(bad)} here ({found.detail})")
        return KernelChoice(kernel, template, problem, default(problem, device), "default", found.detail)

    def clear(self) -> None:
        with self._lock:
            for resolver in self._resolvers.values():
                resolver.close()
            self._resolvers.clear()
            self._chosen.clear()


# One per process: every directly launched kernel shares the resolvers and their database handle.
DIRECT = DirectConfigs()
