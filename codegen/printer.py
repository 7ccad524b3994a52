"""Expression printer: turns elementwise IR nodes into Triton statements for fused code.

Values are computed in the compute type of their dtype (fp32 for 16-bit floats): a cast to a
narrower float rounds through that type and comes back, so fused code matches the reference's
rounding points while keeping arithmetic in fp32.
"""

from __future__ import annotations

import math

from dsl.dtypes import DType, compute_type
from dsl.errors import CodegenError
from dsl.graph import Graph, Node, Ref

from .render import Code


def literal(value, dtype: DType) -> str:
    if dtype.name == "bool":
        return "True" if value else "False"
    if not dtype.is_float:
        return str(int(value))
    value = float(value)
    if math.isnan(value):
        return 'float("nan")'
    if math.isinf(value):
        return 'float("inf")' if value > 0 else 'float("-inf")'
    return repr(value)


def _pow(a: str, b: str, b_const) -> str:
    if b_const is not None and float(b_const).is_integer() and 0 <= b_const <= 4:
        n = int(b_const)
        return "(" + " * ".join([a] * n) + ")" if n else "1.0"
    if b_const == 0.5:
        return f"tl.sqrt({a})"
    # exp2(log2(a) * b): exact for a > 0, which is the domain the reference is real on.
    return f"tl.exp2(tl.log2({a}) * {b})"


_BINARY = {
    "add": "({a} + {b})", "sub": "({a} - {b})", "mul": "({a} * {b})", "div": "({a} / {b})",
    "maximum": "tl.maximum({a}, {b})", "minimum": "tl.minimum({a}, {b})",
    "less": "({a} < {b})", "less_equal": "({a} <= {b})", "greater": "({a} > {b})",
    "greater_equal": "({a} >= {b})", "equal": "({a} == {b})", "not_equal": "({a} != {b})",
}
_UNARY = {
    "neg": "(-{a})", "exp": "tl.exp({a})", "log": "tl.log({a})", "sqrt": "tl.sqrt({a})",
    "rsqrt": "tl.rsqrt({a})", "abs": "tl.abs({a})", "sigmoid": "tl.sigmoid({a})",
    "tanh": "(2.0 * tl.sigmoid(2.0 * {a}) - 1.0)", "relu": "tl.maximum({a}, 0.0)",
    "silu": "({a} * tl.sigmoid({a}))", "erf": "tl.math.erf({a})",
    "gelu": "(0.5 * {a} * (1.0 + tl.math.erf({a} * 0.7071067811865476)))",
}

PRINTABLE = set(_BINARY) | set(_UNARY) | {"cast", "where", "pow"}


def ctype(dtype: DType) -> str:
    return compute_type(dtype).triton


class Printer:
    """Prints a set of elementwise nodes in order. ``names`` maps value refs (already loaded or
    computed, in compute type) to variable names; constants are inlined."""

    def __init__(self, graph: Graph, names: dict[Ref, str]):
        self.graph = graph
        self.names = dict(names)
        self.lines: list[str] = []

    def operand(self, ref: Ref) -> str:
        if ref in self.names:
            return self.names[ref]
        node = self.graph.node(ref.node)
        if node.op == "const":
            return literal(node.attr["value"], node.attr["dtype"])
        raise CodegenError(f"value %{ref.node} is not available inside the fused kernel")

    def const_value(self, ref: Ref):
        node = self.graph.node(ref.node)
        return node.attr["value"] if node.op == "const" else None

    def emit(self, node: Node) -> str:
        if node.op not in PRINTABLE:
            raise CodegenError(f"primitive '{node.op}' cannot be printed into fused code")
        args = [self.operand(r) for r in node.inputs]
        if node.op in _BINARY:
            expr = _BINARY[node.op].format(a=args[0], b=args[1])
        elif node.op in _UNARY:
            expr = _UNARY[node.op].format(a=args[0])
        elif node.op == "pow":
            expr = _pow(args[0], args[1], self.const_value(node.inputs[1]))
        elif node.op == "where":
            expr = f"tl.where({args[0]}, {args[1]}, {args[2]})"
        else:  # cast: round through the target type, compute in its compute type
            src = self.graph.type_of(node.inputs[0]).dtype
            dst: DType = node.attr["dtype"]
            if dst is src:
                expr = args[0]
            elif compute_type(dst) is dst:
                expr = f"{args[0]}.to({dst.triton})"
            else:
                expr = f"{args[0]}.to({dst.triton}).to({ctype(dst)})"
        name = f"v{node.id}"
        self.lines.append(f"{name} = {expr}  # {node.op}")
        self.names[Ref(node.id)] = name
        return name

    def code(self, indent: int) -> Code:
        pad = " " * indent
        return Code("\n".join(pad + line for line in self.lines))
