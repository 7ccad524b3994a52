"""The built-in kernels by name, for `kdsl tune NAME --shape ...`: each name is a module-level
@dsl.op of ``runtime.ops`` (spec ``module:OP``), whether its backward kernels are meant, and the
``--shape`` symbols it takes with an LLM-sized example (Mixtral-8x7B / Qwen3-30B-A3B, head dim 128,
32 query and 8 KV heads). Together with the quantized templates tuned on their own
(``autotune.template_tasks``), they reach every kernel template (tests/codegen/test_templates.py)."""

from __future__ import annotations

import dataclasses

import dsl
from dsl import Tensor as T

from .attention_ops import _rotary


@dsl.op
def rotary_op(x: T["T", "H", "D"], cos: T["T", 1, "D"], sin: T["T", 1, "D"]):
    """Rotary embedding of one layer's queries (or keys): [tokens, heads, head dim]."""
    return _rotary(x, cos, sin)


@dataclasses.dataclass(frozen=True)
class Tunable:
    spec: str
    example: str
    backward: bool = False
    attrs: tuple[tuple[str, object], ...] = ()
    doc: str = ""


TUNABLES: dict[str, Tunable] = {
    "linear": Tunable("runtime.ops.dense:linear_op", "M=4096,N=14336,K=4096", doc="dense GEMM with bias epilogue"),
    "moe": Tunable("runtime.ops.moe_ops:moe_op", "T=4096,D=4096,E=8,H2=28672,H=14336",
                   doc="routing + two grouped GEMMs (Mixtral-8x7B)"),
    "moe_qwen3": Tunable("runtime.ops.moe_ops:moe_op", "T=4096,D=2048,E=128,H2=1536,H=768",
                         attrs=(("top_k", 8),), doc="routing + grouped GEMMs (Qwen3-30B-A3B, top-8 of 128)"),
    "moe_backward": Tunable("runtime.ops.moe_ops:moe_op", "T=4096,D=2048,E=128,H2=1536,H=768", backward=True,
                            attrs=(("top_k", 8),), doc="routing, grouped dX and per-expert dW kernels (Qwen3-30B-A3B)"),
    "rmsnorm": Tunable("runtime.ops.dense:residual_rmsnorm_op", "M=4096,D=4096", doc="residual add + RMSNorm"),
    "softmax": Tunable("runtime.ops.dense:softmax_op", "M=4096,N=32000", doc="row softmax"),
    "attention": Tunable("runtime.ops.attention_ops:attention_op", "B=1,H=32,HKV=8,S=4096,SK=4096,D=128",
                         doc="flash attention forward, GQA"),
    "attention_backward": Tunable("runtime.ops.attention_ops:attention_op", "B=1,H=32,HKV=8,S=4096,SK=4096,D=128",
                                  backward=True, doc="flash attention dQ/dK/dV"),
    "paged_attention": Tunable("runtime.ops.attention_ops:paged_attention_op",
                               "B=16,H=32,HKV=8,D=128,NB=1024,P=16,MB=64", doc="decode over a paged KV cache"),
    "rotary": Tunable("runtime.ops.tunables:rotary_op", "T=4096,H=32,D=128", doc="rotary embedding"),
}


@dsl.op
def combine_op(y: T["T", "K", "N"], weights: T["T", "K"]):
    """The fixed-order weighted sum of each token's k expert outputs (when it is not fused)."""
    return dsl.combine(y, weights)


TUNABLES["combine"] = Tunable("runtime.ops.tunables:combine_op", "T=4096,K=8,N=2048",
                              doc="weighted combine of k expert outputs")
