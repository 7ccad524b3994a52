"""The public names of the dsl package (loaded on first use by dsl/__init__.py)."""

from . import primitives as _primitives  # noqa: F401  (registers the dense primitives)
from .autodiff import grad
from .dtypes import bf16, bool_, f8e4m3, f16, f32, f64, i8, i32, i64, DType
from .errors import (CodegenError, DatabaseError, DSLError, KdslError, ServingError, TrainingError,
                     TuningError)
from .graph import Graph, Node, Ref, TensorType
from .passes import cse, dce, fold_constants, optimize, verify
from .primitives import (abs, add, cast, clamp, div, equal, erf, exp, expand, gelu, greater,
                         greater_equal, less, less_equal, log, matmul, max, maximum, mean, minimum,
                         mul, neg, not_equal, pow, relu, reshape, rmsnorm, rsqrt, sigmoid, silu,
                         softmax, sqrt, sub, sum, tanh, transpose, where)
from .registry import Primitive, register as register_primitive, emit
from .trace import Op, Tensor, TensorSpec, op
from .value import Value

bool = bool_  # noqa: A001 - the DSL spells it dsl.bool

from .qtensor import QTensor
from .moe import (combine, grouped_matmul, grouped_matmul_combine, grouped_matmul_dw, moe_ffn, route,
                  swiglu_experts, topk)
from .attention_prims import attention, attention_varlen, paged_attention, rotary

__all__ = [n for n in dir() if not n.startswith("_")]
