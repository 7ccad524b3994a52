"""``runtime.compile``: turn a dsl op into a PyTorch-callable, differentiable, torch.compile-friendly
op backed by generated Triton kernels (or by the reference semantics on the torch backend)."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import itertools
import os
import threading
import typing

import torch

from dsl import autodiff
from dsl.errors import DSLError, KdslError
from dsl.graph import Graph
from dsl.reference import run as run_reference
from dsl.trace import Op, bind_shapes

from .executor import KernelInfo, TritonProgram

BACKENDS = ("auto", "triton", "torch")
_counter = itertools.count()
_lock = threading.Lock()


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@dataclasses.dataclass
class ExplainRow:
    kernel: str
    template: str
    problem: dict
    config: dict
    source: str
    detail: str = ""


class Explanation(list):
    def __str__(self) -> str:
        if not self:
            return "no kernels: the torch backend runs the graph's reference semantics"
        lines = []
        for r in self:
            prob = ", ".join(f"{k}={v}" for k, v in r.problem.items())
            cfg = ", ".join(f"{k}={v}" for k, v in r.config.items())
            lines.append(f"{r.kernel} [{r.template}] {prob}: {cfg}  <- {r.source}"
                         + (f" ({r.detail})" if r.detail else ""))
        return "\n".join(lines)


class _Variant:
    """One trace of the op (per input dtypes and static attributes) and its custom op."""

    def __init__(self, owner: "CompiledOp", graph: Graph, statics: dict):
        self.owner = owner
        self.graph = graph
        self.statics = statics
        self._program: TritonProgram | None = None
        self._bwd: _Variant | None = None
        self.custom_op = None

    @property
    def program(self) -> TritonProgram:
        if self._program is None:
            self._program = TritonProgram(self.graph, self.owner.name)
        return self._program

    @property
    def backward(self) -> "_Variant":
        if self._bwd is None:
            self._bwd = _Variant(self.owner, autodiff.grad(self.graph), self.statics)
        return self._bwd

    def execute(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        env = bind_shapes(self.graph, tensors, self.owner.name)
        backend = self.owner.backend_for(tensors)
        if backend == "torch":
            outs = run_reference(self.graph, tensors, env)
        else:
            if tensors and tensors[0].device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
                raise KdslError("the triton backend on CPU tensors needs Triton's interpreter: set "
                                "TRITON_INTERPRET=1 before importing triton (kdsl does this when no "
                                "CUDA device is present and it is imported first)")
            outs = self.program.run(tensors, env, self.owner.config_for)
        # Custom ops may not return inputs or aliases of each other.
        seen: set[int] = {t.untyped_storage().data_ptr() for t in tensors if t.numel()}
        result = []
        for o in outs:
            ptr = o.untyped_storage().data_ptr() if o.numel() else None
            if ptr is not None and ptr in seen:
                o = o.clone()
            elif not o.is_contiguous():
                o = o.contiguous()
            if ptr is not None:
                seen.add(o.untyped_storage().data_ptr())
            result.append(o)
        return result


class CompiledOp:
    """A dsl op compiled for a backend. Call it with torch tensors and static keywords."""

    def __init__(self, op: Op, backend: str = "auto", db=None, configs: dict | None = None):
        if not isinstance(op, Op):
            raise DSLError(f"runtime.compile expects a function decorated with @dsl.op, got {type(op).__name__}")
        if backend not in BACKENDS:
            raise DSLError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})", op=op.name)
        if backend == "triton" and not triton_available():
            raise KdslError("the triton backend needs the 'triton' package (Linux); use backend='torch'")
        self.op = op
        self.name = op.name
        self.backend = backend
        self.db = db
        self.overrides = dict(configs or {})
        self._variants: dict[tuple, _Variant] = {}
        self._resolver = None
        self._uid = next(_counter)

    def __repr__(self) -> str:
        return f"<CompiledOp {self.name} backend={self.backend}>"

    # -- backend and configs ------------------------------------------------------------------
    def backend_for(self, tensors) -> str:
        if self.backend != "auto":
            return self.backend
        if tensors and all(t.is_cuda for t in tensors) and triton_available():
            return "triton"
        return "torch"

    @property
    def resolver(self):
        if self._resolver is None:
            from .configs import resolver_for

            self._resolver = resolver_for(self)
        return self._resolver

    def config_for(self, kernel: KernelInfo, problem: dict) -> dict:
        return self.resolver.resolve(kernel, problem)[0]

    # -- variants -------------------------------------------------------------------------------
    def _variant(self, args, kwargs) -> tuple[_Variant, list[torch.Tensor]]:
        graph, tensors, _env = self.op.bind(args, kwargs)
        statics = self.op.check_statics(kwargs)
        key = (id(graph),)
        with _lock:
            variant = self._variants.get(key)
            if variant is None:
                variant = _Variant(self, graph, statics)
                variant.custom_op = self._register(variant)
                self._variants[key] = variant
        return variant, tensors

    def _register(self, variant: _Variant):
        graph = variant.graph
        digest = hashlib.sha256(str(graph).encode()).hexdigest()[:10]
        qualname = f"kdsl::{self.name}_{digest}_{self._uid}"
        names = [graph.node(n).attr["name"] for n in graph.inputs]
        n_out = len(graph.outputs)
        out_types = graph.output_types()

        def impl(*tensors):
            outs = variant.execute(list(tensors))
            return outs[0] if n_out == 1 else tuple(outs)

        params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=torch.Tensor)
                  for n in names]
        ret = torch.Tensor if n_out == 1 else typing.Tuple[tuple([torch.Tensor] * n_out)]
        impl.__signature__ = inspect.Signature(params, return_annotation=ret)
        custom = torch.library.custom_op(qualname, impl, mutates_args=())

        def fake(*tensors):
            env = bind_shapes(graph, tensors, self.name)
            from dsl import shapes as sh

            outs = [tensors[0].new_empty(tuple(sh.evaluate(d, env) for d in t.shape), dtype=t.dtype.torch)
                    for t in out_types]
            return outs[0] if n_out == 1 else tuple(outs)

        custom.register_fake(fake)
        diff = autodiff.differentiable_inputs(graph)
        if not diff:
            return custom
        bwd_op = None

        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs)

        def backward(ctx, *grads):
            nonlocal bwd_op
            inputs = ctx.saved_tensors
            if bwd_op is None:
                bwd_op = self._register_backward(variant)
            cts = [g if g is not None else torch.zeros(o.shape if hasattr(o, "shape") else (), dtype=o.dtype,
                                                       device=inputs[0].device)
                   for g, o in zip(grads, _output_templates(inputs, graph, self.name))]
            res = bwd_op(*inputs, *[c.contiguous() for c in cts])
            res = (res,) if isinstance(res, torch.Tensor) else tuple(res)
            out = [None] * len(inputs)
            for pos, g in zip(diff, res):
                out[pos] = g
            return tuple(out)

        custom.register_autograd(backward, setup_context=setup_context)
        return custom

    def _register_backward(self, variant: _Variant):
        bwd = variant.backward
        graph = bwd.graph
        digest = hashlib.sha256(str(graph).encode()).hexdigest()[:10]
        qualname = f"kdsl::{self.name}_bwd_{digest}_{self._uid}"
        n_out = len(graph.outputs)
        names = [graph.node(n).attr["name"] for n in graph.inputs]
        out_types = graph.output_types()

        def impl(*tensors):
            outs = bwd.execute(list(tensors))
            return outs[0] if n_out == 1 else tuple(outs)

        params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=torch.Tensor)
                  for n in names]
        ret = torch.Tensor if n_out == 1 else typing.Tuple[tuple([torch.Tensor] * n_out)]
        impl.__signature__ = inspect.Signature(params, return_annotation=ret)
        custom = torch.library.custom_op(qualname, impl, mutates_args=())

        def fake(*tensors):
            env = bind_shapes(graph, tensors, self.name)
            from dsl import shapes as sh

            outs = [tensors[0].new_empty(tuple(sh.evaluate(d, env) for d in t.shape), dtype=t.dtype.torch)
                    for t in out_types]
            return outs[0] if n_out == 1 else tuple(outs)

        custom.register_fake(fake)
        return custom

    # -- calling ----------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        variant, tensors = self._variant(args, kwargs)
        return variant.custom_op(*tensors)

    def reference(self, *args, **kwargs):
        """The graph's reference semantics (the oracle), whatever the backend."""
        graph, tensors, env = self.op.bind(args, kwargs)
        outs = run_reference(graph, tensors, env)
        return outs[0] if len(outs) == 1 else tuple(outs)

    @property
    def graph(self) -> Graph:
        return self.op.graph

    @property
    def kernels(self) -> list[KernelInfo]:
        """The generated kernels of the op's default trace (default dtypes and static attributes)."""
        return TritonProgram(self.op.graph, self.name).infos

    def kernels_for(self, *args, **kwargs) -> list[KernelInfo]:
        variant, _ = self._variant(args, kwargs)
        return variant.program.infos

    def explain(self, *args, **kwargs) -> Explanation:
        """Per kernel: the problem sizes, the config that will be used and where it came from."""
        variant, tensors = self._variant(args, kwargs)
        rows = Explanation()
        if self.backend_for(tensors) == "torch":
            return rows
        env = bind_shapes(variant.graph, tensors, self.name)
        program = variant.program
        for info in program.infos:
            problem = program.problem(info.name, env)
            config, source, detail = self.resolver.resolve(info, problem)
            rows.append(ExplainRow(info.name, info.template, problem, config, source, detail))
        return rows


def _output_templates(inputs, graph: Graph, name: str):
    from dsl import shapes as sh

    env = bind_shapes(graph, inputs, name)
    return [torch.empty(tuple(sh.evaluate(d, env) for d in t.shape), dtype=t.dtype.torch, device="meta")
            for t in graph.output_types()]


def compile(op: Op, backend: str = "auto", db=None, configs: dict | None = None) -> CompiledOp:  # noqa: A001
    """Compile a ``@dsl.op`` function. ``backend``: "auto" (triton for CUDA tensors, torch for CPU),
    "triton" (generated kernels; on a CPU-only machine under Triton's interpreter) or "torch"
    (reference semantics). ``db``: a tuning-database URL (default: KDSL_DB or the user cache).
    ``configs``: explicit per-template config overrides, e.g. {"gemm": {...}}."""
    return CompiledOp(op, backend=backend, db=db, configs=configs)
