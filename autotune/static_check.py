"""Static check of a candidate config without a GPU: compile for the target, read its resources.

Triton compiles a ``@triton.jit`` function for any NVIDIA target on a machine without a GPU
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``). From the result we read the
shared memory Triton allocates (``metadata.shared``) and, with the ``cuobjdump`` shipped in the triton
wheel, the registers, stack and local memory ptxas assigned. A candidate is rejected when it would
not launch (shared memory above the per-block limit, more registers than a block may hold) or when
ptxas spilled registers to the stack (slow, and a sign the tile is too big for the warps).

The compile runs in a worker process (``python -m autotune.static_check``, one per batch of
candidates): without ``TRITON_INTERPRET``, which makes Triton's own library uncompilable, and where
a crashing compiler cannot take the tuner down. Facts about a compile depend only on the kernel, its specialisation, the options, the compute
capability and the Triton version (the kernel is identified by its whole defining file), so they are cached on disk under that key (SQLite, in
``KDSL_CACHE_DIR`` or the user cache dir); the verdict against a device's limits is recomputed from
them, so one compile serves every device of the same architecture.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from .devices import Device

CACHE_FILE = "static_check.sqlite"
# Bump when the facts recorded per compile change meaning.
FACTS_VERSION = 1
_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclasses.dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str
    shared_bytes: int | None = None
    registers: int | None = None
    spill_bytes: int | None = None
    compile_s: float = 0.0
    cached: bool = dataclasses.field(default=False, compare=False)
    # Per kernel of a multi-kernel launch (:func:`check_launches`): (kernel name, its verdict).
    kernels: tuple = dataclasses.field(default=(), compare=False)


def cache_path() -> Path:
    from dsl.paths import cache_root

    return cache_root() / CACHE_FILE


def _function_file(fn) -> tuple[Path, str]:
    """The Python file defining a jit function's body, and the function's name in that module."""
    inner = getattr(fn, "fn", fn)
    path = inspect.getsourcefile(inner)
    if path is None or not os.path.exists(path):
        raise TypeError(f"kernel {getattr(inner, '__name__', inner)!r} has no source file to compile from")
    return Path(path), inner.__name__


def _kernel_identity(jit_fn) -> str:
    """The whole defining module's text plus the function name: helpers and constants it uses live there."""
    path, name = _function_file(jit_fn)
    return hashlib.sha256(path.read_bytes() + b"\0" + name.encode()).hexdigest()


def _full_signature(jit_fn, signature: Mapping[str, str], constexprs: Mapping[str, Any]) -> dict:
    """Triton wants every argument in the signature; constexpr ones may be left to us."""
    sig = dict(signature)
    for name in constexprs:
        sig.setdefault(name, "constexpr")
    arg_names = getattr(jit_fn, "arg_names", None)
    if arg_names is None:
        arg_names = list(inspect.signature(getattr(jit_fn, "fn", jit_fn)).parameters)
    missing = [a for a in arg_names if a not in sig]
    if missing:
        raise ValueError(f"signature lacks argument(s) {missing} of kernel "
                         f"'{_function_file(jit_fn)[1]}'")
    unknown = [a for a in sig if a not in arg_names]
    if unknown:
        raise ValueError(f"signature names argument(s) {unknown} the kernel does not have")
    return {a: sig[a] for a in arg_names}


def _triton_version() -> str:
    # Imported here, not at module level: the compile worker (python -m autotune.static_check) must
    # not import codegen, whose import switches Triton to its interpreter on a machine without a GPU.
    from codegen.render import triton_version

    return triton_version()


def _cache_key(jit_fn, signature, constexprs, options, cc) -> str:
    blob = json.dumps([FACTS_VERSION, _kernel_identity(jit_fn), signature,
                       sorted((str(k), repr(v)) for k, v in constexprs.items()),
                       sorted((k, repr(v)) for k, v in options.items()), cc, _triton_version()])
    return hashlib.sha256(blob.encode()).hexdigest()


class _FactsCache:
    """Compile facts on disk. A cache problem never fails a check: it only costs a recompile."""

    def __init__(self):
        self._memory: dict[str, dict] = {}
        self._lock = threading.Lock()

    def _connect(self):
        conn = sqlite3.connect(cache_path(), timeout=30)
        conn.execute("CREATE TABLE IF NOT EXISTS facts (key TEXT PRIMARY KEY, facts TEXT NOT NULL)")
        return conn

    def get(self, key: str) -> dict | None:
        with self._lock:
            if key in self._memory:
                return self._memory[key]
        try:
            with contextlib.closing(self._connect()) as conn:
                row = conn.execute("SELECT facts FROM facts WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error:
            return None
        if row is None:
            return None
        try:
            facts = json.loads(row[0])
        except ValueError:
            return None
        with self._lock:
            self._memory[key] = facts
        return facts

    def put(self, key: str, facts: dict) -> None:
        with self._lock:
            self._memory[key] = facts
        try:
            with contextlib.closing(self._connect()) as conn, conn:
                conn.execute("INSERT OR REPLACE INTO facts (key, facts) VALUES (?, ?)", (key, json.dumps(facts)))
        except sqlite3.Error:
            pass

    def clear_memory(self) -> None:
        with self._lock:
            self._memory.clear()


_CACHE = _FactsCache()


def _cuobjdump() -> str | None:
    try:
        import triton.knobs

        path = triton.knobs.nvidia.cuobjdump.path
        if path and os.path.exists(path):
            return path
    except Exception:  # knobs layout differs between Triton versions; fall back to the wheel path
        pass
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else None


def resource_usage(cubin: bytes) -> dict | None:
    """Registers, stack, static shared and local memory of the first kernel in a cubin (cuobjdump)."""
    tool = _cuobjdump()
    if tool is None:
        return None
    with tempfile.TemporaryDirectory(prefix="kdsl_cubin_") as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        try:
            out = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
    match = _RES_USAGE.search(out.stdout)
    if out.returncode != 0 or match is None:
        return None
    reg, stack, shared, local = (int(x) for x in match.groups())
    return {"registers": reg, "stack": stack, "static_shared": shared, "local": local}


def _compile_source(src, cc: int, options: Mapping[str, Any]) -> dict:
    """Compile ``src`` in *this* process (the worker) and collect the facts."""
    from triton.backends.compiler import GPUTarget

    import triton

    start = time.perf_counter()
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(options))
    except Exception as exc:  # any compile failure is a verdict, never an exception to the tuner
        return _failure(exc, start)
    facts = {"error": None, "shared": int(getattr(compiled.metadata, "shared", 0) or 0),
             "compile_s": time.perf_counter() - start}
    usage = resource_usage(compiled.asm["cubin"]) if "cubin" in compiled.asm else None
    if usage is not None:
        facts.update(usage)
    # Without cuobjdump the facts are partial; a later run with the tool should look again.
    facts["keep"] = usage is not None
    return facts


def _failure(exc: BaseException, start: float) -> dict:
    text = str(exc).strip() or type(exc).__name__
    # Errors of the machine (disk, memory) say nothing about the candidate: do not keep them.
    return {"error": f"{type(exc).__name__}: {text[:1500]}", "compile_s": time.perf_counter() - start,
            "keep": not isinstance(exc, (OSError, MemoryError))}


def _compile_job(fn, job: dict) -> dict:
    """One job of a worker request: a recorded launch (``launch``), specialised by Triton's own
    binder, or an explicit signature with constexprs (``signature``)."""
    from triton.compiler import ASTSource

    start = time.perf_counter()
    try:
        if "launch" in job:
            from .launch_spec import LaunchSpec, specialise

            spec = specialise(LaunchSpec.revive(fn, job["launch"]), job["cc"])
            src = ASTSource(fn, spec.signature, spec.constexprs, spec.attrs)
            options = vars(spec.options)
        else:
            src = ASTSource(fn=fn, signature=job["signature"], constexprs=dict(job["constexprs"]))
            options = job["options"]
    except Exception as exc:
        return _failure(exc, start)
    return _compile_source(src, job["cc"], options)


def _worker_main() -> int:
    """``python -m autotune.static_check``: compile the jobs of a JSON request on stdin.

    The compile runs here, in a fresh process without ``TRITON_INTERPRET`` (under the interpreter
    Triton's own library functions are not compilable) and where a crashing compiler cannot take the
    tuner down. One JSON line per job is written as soon as it is done.
    """
    import importlib.util

    request = json.loads(sys.stdin.read())
    sys.path[:0] = [p for p in request["sys_path"] if p not in sys.path]
    modules = {}
    for job in request["jobs"]:
        path = job["module_path"]
        if path not in modules:
            spec = importlib.util.spec_from_file_location(f"kdsl_static_{len(modules)}_{os.getpid()}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            modules[path] = module
        facts = _compile_job(getattr(modules[path], job["function"]), job)
        print(json.dumps({"id": job["id"], "facts": facts}), flush=True)
    return 0


def _compile_in_worker(jobs: list[dict], timeout_s: float) -> dict[int, dict]:
    """Run ``jobs`` in one worker process; jobs without an answer get an error that is not kept."""
    request = json.dumps({"sys_path": [p for p in sys.path if p], "jobs": jobs})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns without it; keep its default
    results: dict[int, dict] = {}
    problem = None
    try:
        out = subprocess.run([sys.executable, "-m", "autotune.static_check"], input=request,
                             capture_output=True, text=True, timeout=timeout_s * len(jobs) + 30, env=env,
                             cwd=str(Path(__file__).resolve().parents[1]))
        stdout, stderr, code = out.stdout, out.stderr, out.returncode
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr, code = "", None
        problem = f"compile timed out after {timeout_s:.0f} s per candidate"
    for line in stdout.splitlines():
        try:
            answer = json.loads(line)
            results[int(answer["id"])] = answer["facts"]
        except (ValueError, KeyError, TypeError):
            continue
    if problem is None and code != 0:
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        problem = f"compiler process failed (exit {code}): {tail[:500]}"
    for job in jobs:
        results.setdefault(job["id"], {"error": problem or "compiler gave no answer", "compile_s": 0.0,
                                       "keep": False})
    return results


def _judge(facts: dict, device: Device, num_warps: int, cached: bool) -> Verdict:
    compile_s = float(facts.get("compile_s", 0.0))
    if facts.get("error"):
        return Verdict(False, f"compile error for {device.arch}: {facts['error']}", compile_s=compile_s,
                       cached=cached)
    # Triton's launcher asks for metadata.shared as dynamic shared memory; the cubin may add static
    # shared memory on top, and the driver checks the sum against the per-block opt-in limit.
    shared = facts["shared"] + facts.get("static_shared", 0)
    regs = facts.get("registers")
    spills = None if regs is None else facts.get("stack", 0) + facts.get("local", 0)
    common = dict(shared_bytes=shared, registers=regs, spill_bytes=spills, compile_s=compile_s, cached=cached)
    if shared > device.smem_per_block:
        return Verdict(False, f"shared memory {shared} B exceeds {device.name}'s {device.smem_per_block} B "
                              f"per block", **common)
    if regs is None:
        return Verdict(True, "shared memory fits; registers and spills unknown (cuobjdump unavailable)", **common)
    if regs > device.max_regs_per_thread:
        return Verdict(False, f"{regs} registers per thread exceed {device.max_regs_per_thread}", **common)
    threads = num_warps * device.warp_size
    if regs * threads > device.regs_per_sm:
        return Verdict(False, f"{regs} registers x {threads} threads exceed {device.regs_per_sm} "
                              f"registers per SM", **common)
    if spills:
        return Verdict(False, f"register spills: {spills} B of stack/local memory ({regs} registers)", **common)
    return Verdict(True, f"ok: {shared} B shared, {regs} registers, no spills", **common)


LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def check_configs(jit_fn, signature: Mapping[str, str], configs: Sequence[Mapping[str, Any]], target: Device, *,
                  use_cache: bool = True, timeout_s: float = 300.0) -> list[Verdict]:
    """Static verdicts for many kdsl configs of one kernel; uncached ones compile in one worker process.

    A config holds the kernel's constexprs plus the launch options ``num_warps``/``num_stages``
    (and optionally ``num_ctas``/``maxnreg``). Never raises for a bad candidate.
    """
    if target.vendor != "nvidia" or target.compute_capability <= 0:
        return [Verdict(True, f"not checkable statically: {target.name} ({target.vendor}) is not an NVIDIA "
                              f"target; constraints only") for _ in configs]
    verdicts: list[Verdict | None] = [None] * len(configs)
    jobs, keys = [], {}
    for i, config in enumerate(configs):
        constexprs = {k: v for k, v in config.items() if k not in LAUNCH_OPTIONS}
        options = {k: int(v) for k, v in config.items() if k in LAUNCH_OPTIONS}
        options.setdefault("num_warps", 4)
        options.setdefault("num_stages", 3)
        try:
            sig = _full_signature(jit_fn, signature, constexprs)
            key = _cache_key(jit_fn, sig, constexprs, options, target.compute_capability)
        except Exception as exc:  # a kernel or config we cannot even describe is a rejected candidate
            verdicts[i] = Verdict(False, f"cannot prepare the compile: {type(exc).__name__}: {exc}")
            continue
        facts = _CACHE.get(key) if use_cache else None
        if facts is not None:
            verdicts[i] = _judge(facts, target, options["num_warps"], cached=True)
            continue
        try:
            json.dumps([sig, constexprs])
        except TypeError:
            verdicts[i] = Verdict(False, f"constexprs and signature must be plain ints/floats/strings: {config}")
            continue
        keys[i] = (key, options["num_warps"])
        path, name = _function_file(jit_fn)
        jobs.append({"id": i, "module_path": str(path), "function": name, "signature": sig,
                     "constexprs": constexprs, "options": options, "cc": target.compute_capability})
    if jobs:
        answers = _compile_in_worker(jobs, timeout_s)
        for i, facts in answers.items():
            key, warps = keys[i]
            if use_cache and facts.get("keep"):
                _CACHE.put(key, facts)
            verdicts[i] = _judge(facts, target, warps, cached=False)
    return verdicts  # type: ignore[return-value]


def static_check(jit_fn, signature: Mapping[str, str], constexprs: Mapping[str, Any], num_warps: int,
                 num_stages: int, target: Device, *, options: Mapping[str, Any] | None = None,
                 use_cache: bool = True) -> Verdict:
    """Compile ``jit_fn`` for ``target`` and judge its resources; never raises for a bad candidate.

    ``signature`` maps argument names to Triton types (``"*fp16"``, ``"i32"``, ...); arguments in
    ``constexprs`` may be omitted from it. ``options`` adds compile options (``num_ctas``, ``maxnreg``).
    Non-NVIDIA targets cannot be checked statically: they get ``ok=True`` with a reason saying so.
    """
    config = {**dict(constexprs), "num_warps": num_warps, "num_stages": num_stages, **dict(options or {})}
    return check_configs(jit_fn, signature, [config], target, use_cache=use_cache)[0]


def _launch_key(spec, cc: int) -> str:
    from .launch_spec import specialise

    blob = json.dumps([FACTS_VERSION, "launch", _kernel_identity(spec.fn), specialise(spec, cc).key(), cc,
                       _triton_version()])
    return hashlib.sha256(blob.encode()).hexdigest()


def _launch_verdict(kernels: list[tuple[str, Verdict]]) -> Verdict:
    """A launch passes when every kernel it launches passes; it reports the first failure, else the
    largest resources of its kernels."""
    cached = all(v.cached for _, v in kernels)
    compile_s = sum(v.compile_s for _, v in kernels)
    for name, v in kernels:
        if not v.ok:
            return dataclasses.replace(v, reason=f"{name}: {v.reason}", compile_s=compile_s, cached=cached,
                                       kernels=tuple(kernels))
    def most(field):
        values = [getattr(v, field) for _, v in kernels if getattr(v, field) is not None]
        return max(values) if values else None
    unknown = [name for name, v in kernels if v.registers is None]
    reason = "; ".join(f"{name}: {v.reason}" for name, v in kernels)
    return Verdict(True, reason if len(kernels) > 1 else kernels[0][1].reason, shared_bytes=most("shared_bytes"),
                   registers=most("registers"), spill_bytes=None if unknown else most("spill_bytes"),
                   compile_s=compile_s, cached=cached, kernels=tuple(kernels))


def check_launches(candidates: Sequence[Sequence[Any]], target: Device, *, use_cache: bool = True,
                   timeout_s: float = 300.0) -> list[Verdict]:
    """Static verdicts for candidates given as their recorded launches
    (``autotune.launch_spec.record_launches``): each kernel is compiled for ``target`` exactly as
    Triton's launcher would specialise it, uncached ones in one worker process for the batch. A
    candidate passes when every kernel it launches passes. Never raises for a bad candidate.
    """
    if target.vendor != "nvidia" or target.compute_capability <= 0:
        return [Verdict(True, f"not checkable statically: {target.name} ({target.vendor}) is not an NVIDIA "
                              f"target; constraints only") for _ in candidates]
    cc = target.compute_capability
    per_kernel: list[list] = []         # per candidate: [name, key, warps, facts-or-None, cached]
    jobs, job_of_key = [], {}
    for launches in candidates:
        rows = []
        for spec in launches:
            try:
                key = _launch_key(spec, cc)
                path, name = _function_file(spec.fn)
                payload = spec.to_json()
                json.dumps(payload)
            except Exception as exc:  # a launch we cannot even describe is a rejected candidate
                rows.append([spec.name, None, spec.num_warps,
                             {"error": f"cannot prepare the compile: {type(exc).__name__}: {exc}",
                              "compile_s": 0.0, "keep": False}, False])
                continue
            facts = _CACHE.get(key) if use_cache else None
            rows.append([spec.name, key, spec.num_warps, facts, facts is not None])
            if facts is None and key not in job_of_key:
                job_of_key[key] = len(jobs)
                jobs.append({"id": len(jobs), "module_path": str(path), "function": name, "launch": payload,
                             "cc": cc})
        per_kernel.append(rows)
    answers = _compile_in_worker(jobs, timeout_s) if jobs else {}
    for key, i in job_of_key.items():
        if use_cache and answers[i].get("keep"):
            _CACHE.put(key, answers[i])
    verdicts = []
    for rows in per_kernel:
        kernels = []
        for name, key, warps, facts, cached in rows:
            facts = facts if facts is not None else answers[job_of_key[key]]
            kernels.append((name, _judge(facts, target, warps, cached=cached)))
        verdicts.append(_launch_verdict(kernels) if kernels else
                        Verdict(False, "the launch recorded no kernel"))
    return verdicts


if __name__ == "__main__":
    raise SystemExit(_worker_main())
