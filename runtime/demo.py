"""`kdsl demo`: compile the example ops, run them on both backends, check them against
independent PyTorch computations."""

from __future__ import annotations

import dataclasses
import importlib
import time

import torch

from .compiler import compile

# Modules that contribute demo cases (each has demo_cases()); later packages append theirs.
DEMO_MODULES = ["runtime.ops.dense", "runtime.ops.moe_ops", "runtime.ops.attention_ops", "runtime.ops.quant"]


@dataclasses.dataclass
class DemoResult:
    name: str
    backend: str
    kernels: str
    max_error: float
    seconds: float
    ok: bool


def collect_cases():
    cases = []
    for name in DEMO_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        cases.extend(_normalise(module.demo_cases()))
    return cases


def _normalise(cases):
    out = []
    for case in cases:
        if len(case) == 4:  # (name, op or compiled op, args, reference)
            name, op, args, ref = case
            kwargs = {}
        else:
            name, op, args, kwargs, ref = case
        op = getattr(op, "op", op)  # a CompiledOp carries its dsl op
        out.append((name, op, args, kwargs, ref))
    return out


def _runner(op, backend):
    """A dsl op compiles for the backend; a plain function is called as fn(backend, *args)."""
    from dsl.trace import Op

    if isinstance(op, Op):
        f = compile(op, backend=backend)
        return f, (lambda *a, **k: f(*a, **k))
    return None, (lambda *a, **k: op(backend, *a, **k))


def _error(got, want) -> float:
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    err = 0.0
    for g, w in zip(got, want):
        if g.numel():
            scale = max(1.0, w.float().abs().max().item())
            err = max(err, ((g.float() - w.float()).abs().max() / scale).item())
    return err


def run_demo(backends=("triton", "torch"), only: str | None = None, progress=None, tol: float = 1e-3):
    results = []
    cases = [c for c in collect_cases() if only is None or only in c[0]]
    for name, op, args, kwargs, ref in cases:
        want = ref(*args, **kwargs)
        for backend in backends:
            f, call = _runner(op, backend)
            start = time.perf_counter()
            with torch.no_grad():
                got = call(*args, **kwargs)
            seconds = time.perf_counter() - start
            if backend == "torch":
                kernels = "reference"
            elif f is not None:
                kernels = ", ".join(k.template for k in f.kernels_for(*args, **kwargs))
            else:
                kernels = getattr(op, "__kdsl_templates__", "fused kernel")
            err = _error(got, want)
            results.append(DemoResult(name, backend, kernels, err, seconds, err <= tol))
            if progress is not None:
                progress()
    return results, len(cases) * len(backends)
