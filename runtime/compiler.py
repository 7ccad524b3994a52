"""``runtime.compile`` (defined here): turn a dsl op into a PyTorch-callable, differentiable, torch.compile-friendly
op backed by generated Triton kernels (or by the reference semantics on the torch backend)."""

from __future__ import annotations

import ast
import dataclasses
import itertools
import os
import threading

import torch

from dsl import autodiff
from dsl import shapes as sh
from dsl.errors import DSLError, KdslError
from dsl.graph import Graph
from dsl.reference import plan as reference_plan
from dsl.reference import run as run_reference
from dsl.trace import Op, bind_shapes

from codegen.program import KernelInfo, TritonProgram

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
        self._reference_plan: list | None = None
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

    def execute(self, tensors: list[torch.Tensor], env: dict[str, int] | None = None) -> list[torch.Tensor]:
        if env is None:
            env = bind_shapes(self.graph, tensors, self.owner.name)
        backend = self.owner.backend_for(tensors)
        if backend == "torch":
            if self._reference_plan is None:
                self._reference_plan = reference_plan(self.graph)
            outs = run_reference(self.graph, tensors, env, self._reference_plan)
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
        self.key = f"{op.name}#{next(_counter)}"
        _REGISTRY[self.key] = self

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

    def config_for(self, kernel: KernelInfo, problem: dict, env: dict | None = None) -> dict:
        return self.resolver.resolve(kernel, problem, env)[0]

    # -- variants -------------------------------------------------------------------------------
    def variant(self, tensors, statics: dict) -> _Variant:
        """The trace for these input dtypes and static attributes (validated, cached)."""
        return self.bind_variant(tensors, statics)[0]

    def bind_variant(self, tensors, statics: dict) -> tuple[_Variant, dict[str, int]]:
        """The variant and the shape symbols these tensors bind (checked once per call)."""
        graph, tensors, env = self.op.bind(tensors, statics)
        full = self.op.check_statics(statics)
        key = id(graph)
        with _lock:
            v = self._variants.get(key)
            if v is None:
                v = self._variants[key] = _Variant(self, graph, full)
        return v, env

    # -- calling ----------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        # Only this thin layer is traced by torch.compile: the op is named by a string and the
        # static attributes travel as text, so dynamo sees one custom op and never the binding code.
        statics = _SEP.join(f"{k}={v!r}" for k, v in sorted(kwargs.items()))
        outs = torch.ops.kdsl.call(self.key, statics, list(args))
        return outs[0] if len(outs) == 1 else tuple(outs)

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
        return self.variant(args, kwargs).program.infos

    def explain(self, *args, **kwargs) -> Explanation:
        """Per kernel: the problem sizes, the config that will be used and where it came from."""
        variant = self.variant(args, kwargs)
        tensors = list(args)
        rows = Explanation()
        if self.backend_for(tensors) == "torch":
            return rows
        env = bind_shapes(variant.graph, tensors, self.name)
        program = variant.program
        for info in program.infos:
            problem = program.problem(info.name, env)
            config, source, detail = self.resolver.resolve(info, problem, env)
            rows.append(ExplainRow(info.name, info.template, problem, config, source, detail))
        return rows


# -- the one custom op every CompiledOp dispatches through -------------------------------------

_SEP = "\x1f"   # separates static attributes in the text key; repr() never emits it raw
_REGISTRY: dict[str, CompiledOp] = {}


def _lookup(key: str, statics_text: str) -> tuple[CompiledOp, dict]:
    compiled = _REGISTRY.get(key)
    if compiled is None:
        raise KdslError(f"no compiled op '{key}' in this process")
    statics = {}
    if statics_text:
        for item in statics_text.split(_SEP):
            name, _, value = item.partition("=")
            statics[name] = ast.literal_eval(value)
    return compiled, statics


def _empty_outputs(graph: Graph, tensors, name: str):
    env = bind_shapes(graph, tensors, name)
    like = tensors[0]
    return [like.new_empty(tuple(sh.evaluate(d, env) for d in t.shape), dtype=t.dtype.torch)
            for t in graph.output_types()]


@torch.library.custom_op("kdsl::call", mutates_args=())
def _call(op: str, statics: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    compiled, kw = _lookup(op, statics)
    variant, env = compiled.bind_variant(inputs, kw)
    return variant.execute(list(inputs), env)


@_call.register_fake
def _call_fake(op, statics, inputs):
    compiled, kw = _lookup(op, statics)
    return _empty_outputs(compiled.variant(inputs, kw).graph, inputs, compiled.name)


@torch.library.custom_op("kdsl::call_backward", mutates_args=())
def _call_backward(op: str, statics: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    compiled, kw = _lookup(op, statics)
    n = len(compiled.op.params)
    return compiled.variant(inputs[:n], kw).backward.execute(list(inputs))


@_call_backward.register_fake
def _call_backward_fake(op, statics, inputs):
    compiled, kw = _lookup(op, statics)
    n = len(compiled.op.params)
    bwd = compiled.variant(inputs[:n], kw).backward
    return _empty_outputs(bwd.graph, inputs, compiled.name)


def _setup_context(ctx, inputs, output):
    ctx.op_key, ctx.statics = inputs[0], inputs[1]
    ctx.save_for_backward(*inputs[2])


def _backward(ctx, grads):
    compiled, kw = _lookup(ctx.op_key, ctx.statics)
    tensors = list(ctx.saved_tensors)
    variant = compiled.variant(tensors, kw)
    diff = autodiff.differentiable_inputs(variant.graph)
    result: list = [None] * len(tensors)
    if not diff:
        return None, None, result
    outs = _empty_outputs(variant.graph, tensors, compiled.name)
    cts = [g.contiguous() if g is not None else torch.zeros_like(o) for g, o in zip(grads, outs)]
    for pos, g in zip(diff, torch.ops.kdsl.call_backward(ctx.op_key, ctx.statics, tensors + cts)):
        result[pos] = g
    return None, None, result


_call.register_autograd(_backward, setup_context=_setup_context)


def compile(op: Op, backend: str = "auto", db=None, configs: dict | None = None) -> CompiledOp:  # noqa: A001
    """Compile a ``@dsl.op`` function. ``backend``: "auto" (triton for CUDA tensors, torch for CPU),
    "triton" (generated kernels; on a CPU-only machine under Triton's interpreter) or "torch"
    (reference semantics). ``db``: a tuning-database URL (default: KDSL_DB or the user cache).
    ``configs``: explicit per-template config overrides, e.g. {"gemm": {...}}."""
    return CompiledOp(op, backend=backend, db=db, configs=configs)
