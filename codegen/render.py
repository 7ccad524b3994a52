"""Render Jinja templates into Triton modules, validate what goes in, cache what comes out.

Every value that reaches generated source passes :func:`validate_context`: ints in range, bools,
identifiers, or :class:`Code` fragments that kdsl's own expression printer built from the IR.
Free text (from a database, a JSON file, a user string) is rejected before anything is rendered.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import math
import os
import re
import sys
import threading
from pathlib import Path
from types import ModuleType

import jinja2

from dsl.errors import CodegenError

TEMPLATE_DIR = Path(__file__).parent / "templates"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
INT_LIMIT = 1 << 62


@dataclasses.dataclass(frozen=True)
class Code:
    """A fragment of Triton source produced by kdsl itself (expression printer, templates)."""

    text: str

    def __str__(self) -> str:
        return self.text

    def __html__(self) -> str:  # jinja: never escape
        return self.text


def validate_context(value, path: str = "context"):
    """Raise CodegenError unless every leaf is an int in range, a bool, an identifier or Code."""
    if isinstance(value, Code) or value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if not -INT_LIMIT < value < INT_LIMIT:
            raise CodegenError(f"{path}: integer {value} out of range for generated source")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CodegenError(f"{path}: non-finite float {value} cannot be placed into source")
        return
    if isinstance(value, str):
        if not _DOTTED.match(value):
            raise CodegenError(f"{path}: {value!r} is not an identifier; refusing to place it into source")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str) or not _IDENT.match(k):
                raise CodegenError(f"{path}: key {k!r} is not an identifier")
            validate_context(v, f"{path}.{k}")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            validate_context(v, f"{path}[{i}]")
        return
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            validate_context(getattr(value, f.name), f"{path}.{f.name}")
        return
    raise CodegenError(f"{path}: value of type {type(value).__name__} cannot be placed into source")


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    return env


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:  # pragma: no cover - triton is a Linux-only dependency
        return "none"


def render(template: str, **context) -> str:
    """Render ``codegen/templates/<template>`` with a validated context."""
    validate_context(context)
    try:
        return environment().get_template(template).render(**context)
    except jinja2.TemplateNotFound as exc:
        raise CodegenError(f"unknown template '{template}'") from exc
    except jinja2.UndefinedError as exc:
        raise CodegenError(f"template '{template}': {exc}") from exc


def source_hash(source: str) -> str:
    """Hash of a rendered module together with the Triton version that will compile it."""
    return hashlib.sha256(f"{triton_version()}\0{source}".encode()).hexdigest()[:16]


def cache_dir() -> Path:
    from dsl.paths import cache_root

    return cache_root("kernels")


_modules: dict[str, ModuleType] = {}
_lock = threading.Lock()


def load_module(source: str, name_hint: str = "kernel") -> ModuleType:
    """Write ``source`` to the on-disk cache (keyed by hash) and import it.

    Triton's ``@jit`` reads the function's source through ``inspect``, so modules must live in
    real files; the same hash in another process reuses the file.
    """
    digest = source_hash(source)
    with _lock:
        if digest in _modules:
            return _modules[digest]
        if not _IDENT.match(name_hint):
            raise CodegenError(f"invalid module name {name_hint!r}")
        mod_name = f"kdsl_gen_{name_hint}_{digest}"
        path = cache_dir() / f"{mod_name}.py"
        if not path.exists() or path.read_text() != source:
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(source)
            os.replace(tmp, path)
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise CodegenError(f"generated module {path} failed to import: {exc}") from exc
        module.SOURCE_HASH = digest
        module.SOURCE_PATH = str(path)
        _modules[digest] = module
        return module
