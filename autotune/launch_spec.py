"""What a launch of a kernel template hands Triton, recorded without running it, and Triton's own
specialisation of it.

A template's launch (``launch(module, rendered, ins, outs, env, config)``) computes strides, grids and
derived constexprs and then calls ``fn[grid](*args, **kwargs)`` once per ``@triton.jit`` function. The
static check must compile exactly what those calls would compile, so :func:`record_launches` runs the
launch on meta tensors with the module's jit functions swapped for recorders, and :func:`specialise`
binds a recorded call with Triton's own binder and ``_pack_args`` (Triton 3.9's
``JITFunction.run``), which decide the divisibility-by-16 attributes of pointers and ints, the ints
equal to 1 turned into constexprs and the argument types. A meta tensor's ``data_ptr`` is its byte
offset into a storage at address 0: a whole tensor is 16-byte aligned, as the CUDA caching
allocator's blocks are, and a view keeps its offset's alignment, as it does on a GPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

# The alignment Triton's specialisation tests pointers for (``tt.divisibility`` 16).
_TRITON_ALIGNMENT = 16


class LaunchRecordError(RuntimeError):
    """A launch could not be recorded (it failed on meta tensors, or passed an argument we cannot
    describe); the message names the kernel or the argument."""


@dataclasses.dataclass(frozen=True)
class TensorArg:
    """A tensor argument as the launch passed it: its dtype and its pointer's misalignment in bytes
    (``data_ptr() % 16``), all that Triton's specialisation reads from a tensor."""

    dtype: str
    misalign: int = 0

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorArg":
        return cls(str(t.dtype).removeprefix("torch."), int(t.data_ptr()) % _TRITON_ALIGNMENT)

    def to_meta(self) -> torch.Tensor:
        dtype = getattr(torch, self.dtype)
        itemsize = torch.empty((), dtype=dtype, device="meta").element_size()
        base = torch.empty(_TRITON_ALIGNMENT, dtype=dtype, device="meta")
        return base[self.misalign // itemsize:]


def _describe(value, where: str):
    if isinstance(value, torch.Tensor):
        return TensorArg.of(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_describe(v, where) for v in value)
    raise LaunchRecordError(f"{where}: cannot describe a launch argument of type {type(value).__name__}")


def _revive(value):
    if isinstance(value, TensorArg):
        return value.to_meta()
    if isinstance(value, (tuple, list)):
        return type(value)(_revive(v) for v in value)
    return value


def _to_json(value):
    if isinstance(value, TensorArg):
        return {"tensor": value.dtype, "misalign": value.misalign}
    if isinstance(value, tuple):
        return {"tuple": [_to_json(v) for v in value]}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    return value


def _from_json(value):
    if isinstance(value, dict):
        if "tensor" in value:
            return TensorArg(value["tensor"], value["misalign"])
        return tuple(_from_json(v) for v in value["tuple"])
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    """One recorded ``fn[grid](*args, **kwargs)``: the jit function, its arguments (tensors as
    :class:`TensorArg`), and the launch options (``num_warps``, ``num_stages``, ...)."""

    fn: Any
    args: tuple
    kwargs: Mapping[str, Any]
    options: Mapping[str, Any]

    @property
    def name(self) -> str:
        return getattr(self.fn, "fn", self.fn).__name__

    @property
    def arguments(self) -> dict[str, Any]:
        """Every kernel argument by name, defaults applied."""
        import inspect

        sig = inspect.signature(getattr(self.fn, "fn", self.fn))
        bound = sig.bind(*self.args, **self.kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    @property
    def constexprs(self) -> dict[str, Any]:
        """The ``tl.constexpr`` parameters' values (Triton adds ints equal to 1 when it specialises)."""
        jit = compiled_function(self.fn)
        names = {p.name for p in jit.params if p.is_constexpr}
        return {k: v for k, v in self.arguments.items() if k in names}

    @property
    def num_warps(self) -> int:
        return int(self.options.get("num_warps", 4))

    def to_json(self) -> dict:
        return {"args": _to_json(list(self.args)), "kwargs": {k: _to_json(v) for k, v in self.kwargs.items()},
                "options": dict(self.options)}

    @staticmethod
    def revive(fn, data: Mapping) -> "LaunchSpec":
        return LaunchSpec(fn, tuple(_from_json(data["args"])),
                          {k: _from_json(v) for k, v in data["kwargs"].items()}, dict(data["options"]))


def _is_jit(obj) -> bool:
    from triton.runtime.jit import KernelInterface

    return isinstance(obj, KernelInterface) and hasattr(obj, "fn")


def jit_functions(module) -> list[str]:
    """Names of the ``@triton.jit`` functions defined in ``module`` (launched or device helpers)."""
    return [name for name, obj in vars(module).items()
            if _is_jit(obj) and getattr(obj.fn, "__module__", None) == module.__name__]


def record_launches(launch: Callable, module, rendered, inputs: Sequence[torch.Tensor],
                    outputs: Sequence[torch.Tensor], env: Mapping, config: Mapping,
                    kernel_names: Iterable[str] | None = None) -> list[LaunchSpec]:
    """The kernel launches ``launch(module, rendered, ins, outs, env, config)`` makes, in order.

    Inputs and outputs are moved to the meta device and every jit function of ``module`` named in
    ``kernel_names`` (default: every one defined there) is replaced by a recorder for the call, so
    nothing runs; work the launch does besides (allocations, views, auxiliary modules written for
    meta tensors) runs on meta tensors. Raises :class:`LaunchRecordError` when the launch fails.
    """
    names = list(kernel_names) if kernel_names is not None else jit_functions(module)
    originals = {}
    for name in names:
        fn = getattr(module, name, None)
        if fn is None or not _is_jit(fn):
            raise LaunchRecordError(f"module {module.__name__} has no @triton.jit function {name!r}")
        originals[name] = fn
    recorded: list[LaunchSpec] = []

    class _Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def call(*args, **kwargs):
                where = f"launch of {self.fn.fn.__name__}"
                params = set(self.fn.arg_names)
                kernel_kwargs = {k: _describe(v, where) for k, v in kwargs.items() if k in params}
                options = {k: v for k, v in kwargs.items() if k not in params}
                recorded.append(LaunchSpec(self.fn, _describe(tuple(args), where), kernel_kwargs, options))
            return call

    ins = [t.to("meta") for t in inputs]
    outs = [torch.empty_like(t, device="meta") for t in outputs]
    for name, fn in originals.items():
        setattr(module, name, _Recorder(fn))
    try:
        launch(module, rendered, ins, outs, dict(env), dict(config))
    except LaunchRecordError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        raise LaunchRecordError(f"recording the launch of {module.__name__} with {dict(config)} failed: "
                                f"{type(exc).__name__}: {first}") from exc
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)
    if not recorded:
        raise LaunchRecordError(f"the launch of {module.__name__} launched none of {names}")
    return recorded


# -- Triton's specialisation -----------------------------------------------------------------------

_COMPILED: dict[int, Any] = {}


def compiled_function(fn):
    """``fn`` as a ``JITFunction`` (the compiler's view), also where Triton runs it interpreted."""
    from triton.runtime.jit import JITFunction

    if isinstance(fn, JITFunction):
        return fn
    hit = _COMPILED.get(id(fn))
    if hit is None or hit[0] is not fn:
        kw = getattr(fn, "kwargs", {}) or {}
        jit = JITFunction(fn.fn, **{k: kw[k] for k in ("version", "do_not_specialize",
                                                          "do_not_specialize_on_alignment", "debug", "noinline",
                                                          "repr", "launch_metadata") if kw.get(k) is not None})
        hit = _COMPILED[id(fn)] = (fn, jit)
    return hit[1]


_BACKENDS: dict[int, Any] = {}


def cuda_backend(cc: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    if cc not in _BACKENDS:
        _BACKENDS[cc] = make_backend(GPUTarget("cuda", cc, 32))
    return _BACKENDS[cc]


@dataclasses.dataclass(frozen=True)
class Specialisation:
    """What ``JITFunction.run`` would hand ``ASTSource`` and ``triton.compile`` for a launch."""

    options: Any                # the backend's options object (CUDAOptions)
    signature: dict
    constexprs: dict            # {(arg index,): value}, Triton's path keys
    attrs: dict                 # {(arg index,): [[attribute, value]]}

    def key(self) -> str:
        blob = json.dumps([self.signature, sorted((repr(k), repr(v)) for k, v in self.constexprs.items()),
                           sorted((repr(k), repr(v)) for k, v in self.attrs.items()),
                           sorted((k, repr(v)) for k, v in vars(self.options).items())])
        return hashlib.sha256(blob.encode()).hexdigest()


def specialise(spec: LaunchSpec, cc: int) -> Specialisation:
    """Bind ``spec`` as Triton 3.9's launcher does for a CUDA device of compute capability ``cc``."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    jit = compiled_function(spec.fn)
    backend = cuda_backend(cc)
    kwargs = {**{k: _revive(v) for k, v in spec.kwargs.items()}, **dict(spec.options)}
    # JITFunction.run adds these from the environment before binding.
    kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(*_revive(spec.args), **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    return Specialisation(options, signature, constexprs, attrs)


__all__ = ["LaunchSpec", "TensorArg", "LaunchRecordError", "record_launches", "jit_functions", "specialise",
           "Specialisation", "compiled_function", "cuda_backend"]
