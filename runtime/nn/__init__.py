"""PyTorch modules built from kdsl's compiled ops."""

from .attention import Attention, ContiguousKVCache, KVCache, PagedKVCache
from .moe import MoE, SharedExpert
from .norm import RMSNorm
from .quant_linear import QuantLinear, quantize_model

__all__ = ["Attention", "ContiguousKVCache", "KVCache", "MoE", "PagedKVCache", "QuantLinear", "RMSNorm",
           "SharedExpert", "quantize_model"]
