"""PyTorch modules built from kdsl's compiled ops."""

from .attention import Attention, ContiguousKVCache, KVCache, PagedKVCache
from .moe import MoE, SharedExpert
from .norm import RMSNorm
from .quant_experts import QuantExperts
from .quant_linear import QuantLinear, quantize_model

__all__ = ["Attention", "ContiguousKVCache", "KVCache", "MoE", "PagedKVCache", "QuantExperts", "QuantLinear", "RMSNorm",
           "SharedExpert", "quantize_model"]
