"""Request traces: when requests arrive and how long their prompts and answers are.

Two public formats are read (the caller gives the path; kdsl ships no trace):

* Azure LLM inference traces (CSV): ``TIMESTAMP, ContextTokens, GeneratedTokens``, one row per
  request, timestamps as ``YYYY-MM-DD HH:MM:SS.fffffff``.
* Mooncake traces (JSON lines): ``timestamp`` (ms), ``input_length``, ``output_length``,
  ``hash_ids`` (ids of 512-token prompt blocks; equal ids mean an identical prefix block).

A trace knows only lengths, so prompts are synthesised for replay: requests of an Azure trace get
prompts no other request shares; Mooncake requests get the same tokens for the same block id, so
prefix sharing in the KV cache behaves as it did in the traced service.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import math
from pathlib import Path

import numpy as np

from dsl.errors import ServingError

MOONCAKE_BLOCK_TOKENS = 512
_UNIQUE_BASE = 1 << 40          # synthetic ids of unshared prompts live far above any block id's
_UNIQUE_STRIDE = 1 << 24        # room per request: longer than any prompt


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    arrival: float                          # seconds since the trace's first request
    prompt_len: int
    output_len: int
    prefix_blocks: tuple[int, ...] = ()     # Mooncake block ids of the prompt, in order


@dataclasses.dataclass(frozen=True)
class Trace:
    """An arrival-ordered list of requests. ``time_scale`` is the factor by which time was stretched
    (2.0: played twice as slowly); latency targets scale with it. Rate changes keep it."""

    name: str
    requests: tuple[TraceRequest, ...]
    time_scale: float = 1.0
    prefix_block_tokens: int = MOONCAKE_BLOCK_TOKENS

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration(self) -> float:
        """Seconds from the first to the last arrival."""
        return self.requests[-1].arrival - self.requests[0].arrival if self.requests else 0.0

    @property
    def rate(self) -> float:
        """Mean arrival rate in requests per second (intervals between arrivals)."""
        if len(self.requests) < 2 or self.duration <= 0:
            return math.inf
        return (len(self.requests) - 1) / self.duration

    @property
    def max_output_len(self) -> int:
        return max((r.output_len for r in self.requests), default=0)

    def _replace_arrivals(self, arrivals, **changes) -> Trace:
        reqs = tuple(dataclasses.replace(r, arrival=float(a)) for r, a in zip(self.requests, arrivals))
        return dataclasses.replace(self, requests=reqs, **changes)

    def scale_time(self, factor: float) -> Trace:
        """Stretch time by ``factor`` (> 1 slower, < 1 faster); latency targets follow (``time_scale``)."""
        if not factor > 0 or not math.isfinite(factor):
            raise ServingError(f"time scale must be a positive number, got {factor!r}")
        return self._replace_arrivals([r.arrival * factor for r in self.requests],
                                      time_scale=self.time_scale * factor)

    def with_rate(self, rate: float) -> Trace:
        """Rescale inter-arrival times so the mean rate is ``rate`` requests/s; the burst pattern
        (relative gaps) is kept and latency targets are not changed: this changes load, not speed."""
        if not rate > 0 or not math.isfinite(rate):
            raise ServingError(f"request rate must be a positive number, got {rate!r}")
        if len(self.requests) < 2:
            return self
        if self.duration <= 0:
            raise ServingError(f"trace {self.name}: all requests arrive at once; its rate cannot be scaled")
        factor = self.rate / rate
        first = self.requests[0].arrival
        return self._replace_arrivals([first + (r.arrival - first) * factor for r in self.requests])

    def head(self, n: int) -> Trace:
        """The first ``n`` requests."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ServingError(f"number of requests must be a positive integer, got {n!r}")
        return dataclasses.replace(self, requests=self.requests[:n])

    def window(self, start: float, end: float) -> Trace:
        """Requests arriving in [start, end) seconds, re-based so the window starts at 0."""
        if not end > start:
            raise ServingError(f"empty trace window [{start}, {end})")
        reqs = [r for r in self.requests if start <= r.arrival < end]
        if not reqs:
            raise ServingError(f"trace {self.name}: no request arrives in [{start}, {end}) s")
        return dataclasses.replace(self, requests=tuple(dataclasses.replace(r, arrival=r.arrival - start)
                                                        for r in reqs))

    def prompt_token_ids(self, index: int) -> np.ndarray:
        """Synthetic prompt of request ``index``: shared blocks for shared prefixes, unique otherwise."""
        req = self.requests[index]
        n = req.prompt_len
        if not req.prefix_blocks:
            start = _UNIQUE_BASE + index * _UNIQUE_STRIDE
            return np.arange(start, start + n, dtype=np.int64)
        b = self.prefix_block_tokens
        ids = np.asarray(req.prefix_blocks, dtype=np.int64)
        tokens = (ids[:, None] * b + np.arange(b, dtype=np.int64)[None, :]).reshape(-1)
        if tokens.size < n:   # blocks do not cover the prompt: the rest is this request's own
            start = _UNIQUE_BASE + index * _UNIQUE_STRIDE
            tokens = np.concatenate([tokens, np.arange(start, start + n - tokens.size, dtype=np.int64)])
        return tokens[:n]


def _positive_int(value, what: str, where: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ServingError(f"{where}: {what} must be an integer, got {value!r}") from None
    if number < 0 or (isinstance(value, float) and value != number):
        raise ServingError(f"{where}: {what} must be a non-negative integer, got {value!r}")
    return number


def _parse_azure_time(text: str, where: str) -> float:
    # Azure writes 7 fractional digits, which datetime does not parse; split them off.
    whole, _, frac = text.strip().partition(".")
    try:
        base = dt.datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.timezone.utc)
        fraction = float(f"0.{frac}") if frac else 0.0
    except ValueError:
        raise ServingError(f"{where}: bad TIMESTAMP {text!r} (want YYYY-MM-DD HH:MM:SS.fffffff)") from None
    return base.timestamp() + fraction


def _finish(name: str, rows: list[tuple[float, int, int, tuple[int, ...]]]) -> Trace:
    if not rows:
        raise ServingError(f"trace {name} has no requests")
    rows.sort(key=lambda r: r[0])   # stable: equal timestamps keep file order
    t0 = rows[0][0]
    reqs = []
    for t, prompt, output, blocks in rows:
        if prompt < 1 or output < 1:
            continue   # a request without prompt or answer cannot be replayed; traces have a few
        reqs.append(TraceRequest(t - t0, prompt, output, blocks))
    if not reqs:
        raise ServingError(f"trace {name} has no request with a prompt and an answer")
    return Trace(name, tuple(reqs))


def load_azure_csv(path: str | Path) -> Trace:
    path = Path(path)
    rows = []
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
            header = {h.strip() for h in (reader.fieldnames or [])}
            if not need <= header:
                raise ServingError(f"{path}: not an Azure trace; columns {sorted(header)} lack "
                                   f"{sorted(need - header)}")
            for line, row in enumerate(reader, start=2):
                row = {k.strip(): v for k, v in row.items() if k is not None}
                where = f"{path}:{line}"
                rows.append((_parse_azure_time(row["TIMESTAMP"] or "", where),
                             _positive_int(row["ContextTokens"], "ContextTokens", where),
                             _positive_int(row["GeneratedTokens"], "GeneratedTokens", where), ()))
    except OSError as exc:
        raise ServingError(f"cannot read trace {path}: {exc.strerror or exc}") from None
    return _finish(path.stem, rows)


def load_mooncake_jsonl(path: str | Path) -> Trace:
    path = Path(path)
    rows = []
    try:
        with path.open() as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ServingError(f"{where}: not JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise ServingError(f"{where}: each line must be a JSON object")
                missing = {"timestamp", "input_length", "output_length"} - obj.keys()
                if missing:
                    raise ServingError(f"{where}: missing {sorted(missing)}")
                ts = obj["timestamp"]
                if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
                    raise ServingError(f"{where}: timestamp must be a number of milliseconds, got {ts!r}")
                blocks = obj.get("hash_ids", [])
                if not isinstance(blocks, list) or any(isinstance(b, bool) or not isinstance(b, int) or b < 0
                                                       for b in blocks):
                    raise ServingError(f"{where}: hash_ids must be a list of non-negative integers")
                rows.append((ts / 1000.0, _positive_int(obj["input_length"], "input_length", where),
                             _positive_int(obj["output_length"], "output_length", where), tuple(blocks)))
    except OSError as exc:
        raise ServingError(f"cannot read trace {path}: {exc.strerror or exc}") from None
    return _finish(path.stem, rows)


def load_trace(path: str | Path) -> Trace:
    """Load a trace by its extension: ``.csv`` (Azure) or ``.jsonl`` (Mooncake)."""
    path = Path(path)
    if not path.exists():
        raise ServingError(f"trace file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return load_azure_csv(path)
    if suffix in (".jsonl", ".json"):
        return load_mooncake_jsonl(path)
    raise ServingError(f"trace {path}: unknown format '{suffix}' (use .csv for Azure, .jsonl for Mooncake)")
