"""Ready compiled ops as functions (each a dsl op compiled on first use). The modules are named
*_ops so a submodule never shadows the function of the same name."""

from .attention_ops import attention, attention_varlen, paged_attention, rope_tables, rotary
from .dense import linear
from .moe_ops import moe, moe_experts, route
from .quant import int8_linear, quant_linear

__all__ = ["attention", "attention_varlen", "int8_linear", "linear", "moe", "moe_experts", "paged_attention",
           "quant_linear", "rope_tables", "rotary", "route"]
