"""kdsl's runtime: compile dsl ops into PyTorch ops, and the MoE stacks built from them."""

import codegen as _codegen  # noqa: F401  (chooses the Triton interpreter on CPU-only machines)
from .compile import CompiledOp, compile  # noqa: A004

__all__ = ["CompiledOp", "compile"]
