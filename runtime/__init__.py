"""kdsl's runtime: compile dsl ops into PyTorch ops, and the MoE stacks built from them.

Attributes load on first use, so `kdsl --help` and other light commands do not import torch.
"""

import importlib

import codegen as _codegen  # noqa: F401  (chooses the Triton interpreter on machines without a GPU)

# The function lives in runtime.compiler: a submodule named "compile" would shadow it once imported.
_LAZY = {"compile": ("runtime.compiler", "compile"), "CompiledOp": ("runtime.compiler", "CompiledOp")}
_SUBMODULES = {"ops", "nn", "model", "train", "serve", "parallel", "quantize", "hf", "demo", "executor", "compiler",
               "configs"}

__all__ = ["CompiledOp", "compile", *sorted(_SUBMODULES)]


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"runtime.{name}")
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
