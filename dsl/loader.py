"""Find a user's ``@dsl.op`` from a spec string: ``path/to/file.py:OP`` or ``package.module:OP``.

Used by the CLI and by the tuner, which rebuilds an op from its spec in worker processes (a spec is
plain text, so it crosses process boundaries).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from .errors import KdslError


def _import_file(path: Path):
    mod_name = f"kdsl_user_{abs(hash(str(path.resolve())))}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    try:
        module_spec.loader.exec_module(module)
    except KdslError:
        sys.modules.pop(mod_name, None)
        raise
    except Exception as exc:  # the user's file failed to import: say where, not a traceback
        sys.modules.pop(mod_name, None)
        raise KdslError(f"{path} failed to import: {type(exc).__name__}: {exc}") from None
    return module


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise KdslError(f"no module or file '{name}': {exc}") from None


def load_op(spec: str):
    """``FILE.py:OP`` or ``module.path:OP`` -> (the @dsl.op object, where it was found)."""
    from .trace import Op

    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise KdslError(f"expected FILE.py:OP or module.path:OP, got '{spec}'")
    path = Path(where)
    if where.endswith(".py") or path.is_file():
        if not path.is_file():
            raise KdslError(f"no such file: {path}")
        module, origin = _import_file(path), path
    else:
        module = _import_module(where)
        origin = Path(getattr(module, "__file__", where) or where)
    op = getattr(module, name, None)
    if op is None:
        ops = [k for k, v in vars(module).items() if isinstance(v, Op)]
        raise KdslError(f"{where} has no '{name}' (ops defined there: {', '.join(ops) or 'none'})")
    if not isinstance(op, Op):
        raise KdslError(f"{where}:{name} is not a @dsl.op function")
    return op, origin
