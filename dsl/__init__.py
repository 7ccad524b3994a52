"""kdsl's op language: declare ops with ``@dsl.op`` over ``dsl.Tensor[...]`` annotations; tracing
turns them into a typed graph IR (see DESIGN.md).

The names load on first use (they need torch), so importing ``dsl.errors`` stays light: the CLI
answers ``--help`` and argument errors without importing torch.
"""

import importlib as _importlib
import importlib.util  # noqa: F401  (find_spec)

from .errors import (CodegenError, DatabaseError, DSLError, KdslError, ServingError, TrainingError,  # noqa: F401
                     TuningError)


def __getattr__(name):
    if _importlib.util.find_spec(f"dsl.{name}") is not None:  # a submodule (``from . import x``)
        return _importlib.import_module(f"dsl.{name}")
    api = _importlib.import_module("dsl.api")
    try:
        value = getattr(api, name)
    except AttributeError:
        raise AttributeError(f"module 'dsl' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_importlib.import_module("dsl.api").__all__))
