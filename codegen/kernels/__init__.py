"""Kernel families, one module each; importing a module declares its KernelTemplates
(``codegen.template``): gemm, pointwise, reduction, moe (route, grouped GEMM, wgrad, combine),
attention (forward, backward, paged, rotary), quant_gemm (W2/3/4/8, int8, fp8) and quant_moe."""

from __future__ import annotations

from dsl.errors import CodegenError

from ..template import get_template, templates
from . import gemm, pointwise, reduction  # noqa: F401
from .common import Rendered


def render_group(graph, group, op_name: str) -> Rendered:
    template = get_template(group.template) if group.template in templates() else None
    if template is None or template.render is None:
        raise CodegenError(f"no renderer for template '{group.template}' (kernel {group.name})")
    return template.render(graph, group, op_name)


from . import attention, moe, quant_gemm, quant_moe  # noqa: E402,F401

__all__ = ["Rendered", "render_group"]
