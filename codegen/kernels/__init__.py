"""Kernel renderers, one module per template family; importing registers their search spaces."""

from __future__ import annotations

from dsl.errors import CodegenError

from . import gemm, pointwise, reduction
from .common import Rendered

RENDERERS = {
    "gemm": gemm.render_gemm,
    "pointwise": pointwise.render_pointwise,
    "reduction": reduction.render_reduction,
}
# How the runtime calls a rendered module: invoke(module, rendered, inputs, outputs, env, config),
# and the problem sizes that key its tuning records: problem(rendered, env) -> {name: int}.
INVOKERS = {"gemm": gemm.invoke, "pointwise": pointwise.invoke, "reduction": reduction.invoke}
PROBLEMS = {"gemm": gemm.problem, "pointwise": pointwise.problem, "reduction": reduction.problem}
# The problem dim that grows with the token count: the nearest-shape lookup may only move along it.
TOKEN_DIMS = {"gemm": "M", "pointwise": "numel", "reduction": "R"}


def register_renderer(template: str, render, invoke, problem, token_dim: str = "M") -> None:
    """Later template families (grouped GEMM, attention) plug in here."""
    RENDERERS[template] = render
    register_invoker(template, invoke, problem, token_dim)


def register_invoker(template: str, invoke, problem, token_dim: str = "M") -> None:
    """A template that no graph renders (the quantized GEMMs, launched by library code and tuned on
    their own): how the tuner launches it and what keys its records."""
    INVOKERS[template] = invoke
    PROBLEMS[template] = problem
    TOKEN_DIMS[template] = token_dim


def render_group(graph, group, op_name: str) -> Rendered:
    try:
        fn = RENDERERS[group.template]
    except KeyError:
        raise CodegenError(f"no renderer for template '{group.template}' (kernel {group.name})") from None
    return fn(graph, group, op_name)


# Template families with their own Python entry points; importing them registers their spaces.
from . import attention, moe, quant_gemm, quant_moe  # noqa: E402,F401

__all__ = ["INVOKERS", "PROBLEMS", "TOKEN_DIMS", "RENDERERS", "Rendered", "register_renderer", "register_invoker",
           "render_group"]
