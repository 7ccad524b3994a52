"""PyTorch modules built from kdsl's compiled ops."""

from .quant_linear import QuantLinear, quantize_model

__all__ = ["QuantLinear", "quantize_model"]
