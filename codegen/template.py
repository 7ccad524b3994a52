"""One object per kernel family: :class:`KernelTemplate`, and the registry of all of them.

A template is everything kdsl knows of one kernel family, declared in one codegen module beside its
Jinja source (``codegen/templates/*.j2``): how to render it from a kernel group of the IR, how the
runtime launches it, the problem sizes that key its tuning records (and which of them grows with the
token count), its search space, its shape-aware default, and its cost function (what one launch
does, :mod:`codegen.work`). autotune and runtime read templates through :func:`get_template`; no
other registry of templates exists, and ``tests/codegen/test_templates.py`` checks every template
has every piece.

The static check needs no extra declaration: it records the arguments of ``launch`` on meta
tensors and compiles exactly what Triton's launcher would for them (``autotune.launch_spec``), so
the compile it judges is the one the runtime gets.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from dsl.errors import CodegenError

from .space import SearchSpace

# render(graph, group, op_name) -> Rendered; launch(module, rendered, ins, outs, env, config);
# problem(rendered, env) -> {name: int}; work(problem, config, device) -> TiledWork.
RenderFn = Callable[..., Any]
LaunchFn = Callable[..., None]
ProblemFn = Callable[[Any, Mapping], dict]
WorkFn = Callable[[Mapping, Mapping, Any], Any]


@dataclasses.dataclass(frozen=True)
class KernelTemplate:
    name: str
    sources: tuple[str, ...]          # Jinja files under codegen/templates/
    space: SearchSpace
    launch: LaunchFn
    problem: ProblemFn
    work: WorkFn                      # the cost function's input: what one launch does
    token_dim: str = "M"              # the problem dim the nearest-shape lookup may move along
    render: RenderFn | None = None    # None: launched by library code (no IR anchor yet)
    anchors: tuple[str, ...] = ()     # IR ops this template anchors in the partitioner
    # Shape-aware default config for a problem on a device; the space's static default otherwise.
    default: Callable[[Mapping, Any], dict] | None = None
    # Names of the @triton.jit functions ``launch`` may call (all are statically checked); every
    # jit function of the rendered module when None.
    jit_functions: Callable[[Any], tuple[str, ...]] | None = None
    # The cost model's compute dtype is read from the task's inputs unless the problem says it.
    doc: str = ""

    def __post_init__(self):
        if self.space.template != self.name:
            raise CodegenError(f"template '{self.name}' declares the space of '{self.space.template}'")

    def default_config(self, problem: Mapping, device) -> dict:
        if self.default is not None:
            return dict(self.default(problem, device))
        return dict(self.space.default)

    def kernel_names(self, rendered) -> tuple[str, ...] | None:
        return tuple(self.jit_functions(rendered)) if self.jit_functions else None


_TEMPLATES: dict[str, KernelTemplate] = {}


def register_template(template: KernelTemplate) -> KernelTemplate:
    if template.name in _TEMPLATES and _TEMPLATES[template.name] is not template:
        raise CodegenError(f"template '{template.name}' is declared twice")
    _TEMPLATES[template.name] = template
    return template


def _load() -> None:
    import codegen.kernels  # noqa: F401  (each family module declares its templates on import)


def templates() -> dict[str, KernelTemplate]:
    _load()
    return dict(_TEMPLATES)


def get_template(name: str) -> KernelTemplate:
    if name not in _TEMPLATES:
        _load()
    try:
        return _TEMPLATES[name]
    except KeyError:
        from dsl.errors import TuningError

        raise TuningError(f"unknown template '{name}' (known: {', '.join(sorted(_TEMPLATES))})") from None


def get_space(name: str) -> SearchSpace:
    return get_template(name).space


def anchor_templates() -> dict[str, str]:
    """IR op -> the template that anchors a kernel on it (the partitioner's table)."""
    return {op: t.name for t in templates().values() for op in t.anchors}
