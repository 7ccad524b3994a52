"""`kdsl demo`: compile the example ops, run them on both backends, check them against
independent PyTorch computations."""

from __future__ import annotations

import dataclasses
import importlib
import time

import torch

from .compile import compile

# Modules that contribute demo cases (each has demo_cases()); later packages append theirs.
DEMO_MODULES = ["runtime.ops.dense", "runtime.ops.moe", "runtime.ops.attention", "runtime.ops.quant"]


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
            f = compile(op, backend=backend)
            start = time.perf_counter()
            with torch.no_grad():
                got = f(*args, **kwargs)
            seconds = time.perf_counter() - start
            kernels = "reference" if backend == "torch" else ", ".join(
                k.template for k in f.kernels_for(*args, **kwargs))
            err = _error(got, want)
            results.append(DemoResult(name, backend, kernels, err, seconds, err <= tol))
            if progress is not None:
                progress()
    return results, len(cases) * len(backends)
