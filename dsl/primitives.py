"""The dense primitives: arithmetic, math, activations, cast/where, reductions, softmax, rmsnorm,
views and matmul. Each has inference, reference semantics (torch) and a vector-Jacobian rule.

User-facing functions (``dsl.exp``, ``dsl.softmax``, ...) live here too; they coerce Python scalars
into constants and call :func:`dsl.registry.emit`.
"""

from __future__ import annotations

import builtins
import math

import torch
import torch.nn.functional as F

from . import dtypes as dt
from . import shapes as sh
from .errors import DSLError
from .graph import Graph, TensorType
from .registry import (ANCHOR, ELEMENTWISE, EXTERN, REDUCTION, ROWWISE, SOURCE, VIEW, Primitive,
                       ShapeError, broadcast_shapes, emit, norm_axis, register, same_dtype, unify_dim,
                       user_line)
from .value import Value

# ---------------------------------------------------------------------------------------------
# helpers


def _fail(graph: Graph, op: str, message: str):
    """A DSLError for a node about to be created: names the op, the node and the user's line."""
    raise DSLError(message, op=graph.name, node=f"%{graph._next} ({op})", line=user_line())


def _graph_of(*args) -> Graph:
    for a in args:
        if isinstance(a, Value):
            return a.graph
    raise DSLError("a dsl primitive needs at least one traced tensor argument; "
                   "call it inside an @dsl.op function")


def const(graph: Graph, value, dtype: dt.DType) -> Value:
    if isinstance(value, bool):
        pass
    elif not dtype.is_float and dtype is not dt.bool_:
        if isinstance(value, float) and not float(value).is_integer():
            _fail(graph, "const", f"the float constant {value} cannot combine with an {dtype.name} tensor; "
                           "use dsl.cast first")
        value = int(value)
    else:
        value = float(value)
    return emit(graph, "const", [], {"value": value, "dtype": dtype})


def _as_values(*args, op="operand"):
    graph = _graph_of(*args)
    dtype = next(a.dtype for a in args if isinstance(a, Value))
    out = []
    for a in args:
        if isinstance(a, Value):
            if a.graph is not graph:
                _fail(graph, op, "operands come from different traced ops")
            out.append(a)
        elif isinstance(a, (bool, int, float)):
            out.append(const(graph, a, dtype))
        else:
            _fail(graph, op, f"unsupported operand of type {type(a).__name__}; expected a dsl tensor or "
                           "a Python number")
    return graph, out


def _emit(op, args, **attrs):
    graph, vals = _as_values(*args, op=op)
    return emit(graph, op, [v.ref for v in vals], attrs)


def _infer_elementwise(types, attrs, out_dtype=None):
    dtype = same_dtype(types, attrs.get("_op", "elementwise op"))
    shape = broadcast_shapes(*(t.shape for t in types))
    return TensorType(shape, out_dtype or dtype)


def _float_only(t: TensorType, op: str):
    if not t.dtype.is_float:
        raise ShapeError(f"{op} needs a floating-point tensor, got {t.dtype.name}")


def unbroadcast(ct: Value, shape: tuple) -> Value:
    """Sum a cotangent back to the shape of the operand that was broadcast."""
    if tuple(ct.shape) == tuple(shape):
        return ct
    lead = ct.ndim - len(shape)
    for _ in range(lead):
        ct = sum(ct, axis=0)
    for axis, d in enumerate(shape):
        if d == 1 and ct.shape[axis] != 1:
            ct = sum(ct, axis=axis, keepdim=True)
    return ct


# ---------------------------------------------------------------------------------------------
# sources


def _no_infer(types, attrs):  # pragma: no cover - sources are added by the tracer directly
    raise ShapeError("source nodes are created by the tracer")


register(Primitive("input", SOURCE, _no_infer, ref=None, vjp=None))
register(Primitive("const", SOURCE, lambda types, a: TensorType((), a["dtype"]),
                   ref=lambda value, dtype: torch.tensor(value, dtype=dtype.torch), vjp=None,
                   differentiable=False))


# ---------------------------------------------------------------------------------------------
# elementwise


def _binary(name, ref, vjp, out_bool=False, float_only=False):
    def infer(types, attrs):
        if float_only:
            for t in types:
                _float_only(t, name)
        return _infer_elementwise(types, {"_op": name}, dt.bool_ if out_bool else None)

    register(Primitive(name, ELEMENTWISE, infer, ref, vjp, differentiable=not out_bool))


def _unary(name, ref, vjp, float_only=True):
    def infer(types, attrs):
        if float_only:
            _float_only(types[0], name)
        return types[0]

    register(Primitive(name, ELEMENTWISE, infer, ref, vjp))


def _vjp_add(inputs, outputs, cts):
    a, b = inputs
    return [unbroadcast(cts[0], a.shape), unbroadcast(cts[0], b.shape)]


def _vjp_sub(inputs, outputs, cts):
    a, b = inputs
    return [unbroadcast(cts[0], a.shape), unbroadcast(-cts[0], b.shape)]


def _vjp_mul(inputs, outputs, cts):
    a, b = inputs
    return [unbroadcast(cts[0] * b, a.shape), unbroadcast(cts[0] * a, b.shape)]


def _vjp_div(inputs, outputs, cts):
    a, b = inputs
    ga = cts[0] / b
    return [unbroadcast(ga, a.shape), unbroadcast(-ga * outputs[0], b.shape)]


def _vjp_pow(inputs, outputs, cts):
    a, b = inputs
    ga = cts[0] * b * pow(a, b - 1.0)
    # d(a^b)/db = a^b log a; where a <= 0 torch gives nan/0 too, keep the same formula.
    gb = cts[0] * outputs[0] * log(a)
    return [unbroadcast(ga, a.shape), unbroadcast(gb, b.shape)]


def _vjp_minmax(pick_first_when):
    def vjp(inputs, outputs, cts):
        a, b = inputs
        ct = cts[0]
        first = pick_first_when(a, b)
        tie = equal(a, b)
        ga = where(first, ct, where(tie, ct * 0.5, 0.0))
        gb = where(first, 0.0, where(tie, ct * 0.5, ct))
        return [unbroadcast(ga, a.shape), unbroadcast(gb, b.shape)]
    return vjp


_binary("add", torch.add, _vjp_add)
_binary("sub", torch.sub, _vjp_sub)
_binary("mul", torch.mul, _vjp_mul)
_binary("div", torch.div, _vjp_div, float_only=True)
_binary("pow", torch.pow, _vjp_pow, float_only=True)
_binary("maximum", torch.maximum, _vjp_minmax(lambda a, b: greater(a, b)))
_binary("minimum", torch.minimum, _vjp_minmax(lambda a, b: less(a, b)))
for _name, _fn in [("less", torch.lt), ("less_equal", torch.le), ("greater", torch.gt),
                   ("greater_equal", torch.ge), ("equal", torch.eq), ("not_equal", torch.ne)]:
    _binary(_name, _fn, None, out_bool=True)


def _sigmoid_ref(x):
    return torch.sigmoid(x)


_unary("neg", torch.neg, lambda i, o, c: [-c[0]], float_only=False)
_unary("exp", torch.exp, lambda i, o, c: [c[0] * o[0]])
_unary("log", torch.log, lambda i, o, c: [c[0] / i[0]])
_unary("sqrt", torch.sqrt, lambda i, o, c: [c[0] * 0.5 / o[0]])
_unary("rsqrt", torch.rsqrt, lambda i, o, c: [c[0] * -0.5 * o[0] * o[0] * o[0]])
_unary("abs", torch.abs, lambda i, o, c: [where(greater(i[0], 0.0), c[0],
                                                where(less(i[0], 0.0), -c[0], 0.0))], float_only=False)
_unary("sigmoid", _sigmoid_ref, lambda i, o, c: [c[0] * o[0] * (1.0 - o[0])])
_unary("tanh", torch.tanh, lambda i, o, c: [c[0] * (1.0 - o[0] * o[0])])
_unary("relu", torch.relu, lambda i, o, c: [where(greater(i[0], 0.0), c[0], 0.0)], float_only=False)
_unary("erf", torch.erf, lambda i, o, c: [c[0] * (2.0 / math.sqrt(math.pi)) * exp(-(i[0] * i[0]))])


def _vjp_silu(inputs, outputs, cts):
    x = inputs[0]
    s = sigmoid(x)
    return [cts[0] * s * (1.0 + x * (1.0 - s))]


def _vjp_gelu(inputs, outputs, cts):
    x = inputs[0]
    cdf = 0.5 * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))
    pdf = exp(x * x * -0.5) * (1.0 / math.sqrt(2.0 * math.pi))
    return [cts[0] * (cdf + x * pdf)]


_unary("silu", F.silu, _vjp_silu)
_unary("gelu", F.gelu, _vjp_gelu)


def _infer_cast(types, attrs):
    return TensorType(types[0].shape, attrs["dtype"])


def _vjp_cast(inputs, outputs, cts):
    if not inputs[0].dtype.is_float:
        return [None]
    return [cast(cts[0], inputs[0].dtype)]


register(Primitive("cast", ELEMENTWISE, _infer_cast,
                   ref=lambda x, dtype: x.to(dtype.torch), vjp=_vjp_cast))


def _infer_where(types, attrs):
    c, a, b = types
    if c.dtype is not dt.bool_:
        raise ShapeError(f"where's condition must be bool, got {c.dtype.name}")
    dtype = same_dtype([a, b], "where")
    return TensorType(broadcast_shapes(c.shape, a.shape, b.shape), dtype)


def _vjp_where(inputs, outputs, cts):
    c, a, b = inputs
    ct = cts[0]
    return [None, unbroadcast(where(c, ct, 0.0), a.shape), unbroadcast(where(c, 0.0, ct), b.shape)]


register(Primitive("where", ELEMENTWISE, _infer_where, ref=torch.where, vjp=_vjp_where))


# ---------------------------------------------------------------------------------------------
# reductions and row-wise normalisations


def _infer_reduce(types, attrs):
    t = types[0]
    axis = attrs["axis"]
    if not 0 <= axis < t.rank:
        raise ShapeError(f"axis {axis} out of range for rank {t.rank}")
    shape = t.shape[:axis] + t.shape[axis + 1:]
    dtype = t.dtype
    if attrs["_kind"] == "mean":
        _float_only(t, "mean")
    if attrs["_kind"] == "sum" and not dtype.is_float:
        dtype = dt.i64
    return TensorType(shape, dtype)


def _expand_back(ct: Value, in_shape: tuple, axis: int) -> Value:
    kept = tuple(ct.shape[:axis]) + (1,) + tuple(ct.shape[axis:])
    return expand(reshape(ct, kept), in_shape)


def _vjp_sum(inputs, outputs, cts, axis, _kind):
    return [_expand_back(cts[0], inputs[0].shape, axis)]


def _vjp_mean(inputs, outputs, cts, axis, _kind):
    x = inputs[0]
    n = dim_size(x, axis)
    return [_expand_back(cts[0], x.shape, axis) / n]


def _vjp_max(inputs, outputs, cts, axis, _kind):
    x = inputs[0]
    m = _expand_back(outputs[0], x.shape, axis)
    hit = cast(equal(x, m), x.dtype)
    count = _expand_back(sum(hit, axis=axis), x.shape, axis)
    return [_expand_back(cts[0], x.shape, axis) * hit / count]


register(Primitive("sum", REDUCTION, _infer_reduce,
                   ref=lambda x, axis, _kind: torch.sum(x, dim=axis, dtype=torch.int64 if not
                                                        x.dtype.is_floating_point else None),
                   vjp=_vjp_sum))
register(Primitive("mean", REDUCTION, _infer_reduce,
                   ref=lambda x, axis, _kind: torch.mean(x, dim=axis), vjp=_vjp_mean))
register(Primitive("max", REDUCTION, _infer_reduce,
                   ref=lambda x, axis, _kind: torch.amax(x, dim=axis), vjp=_vjp_max))


def _infer_softmax(types, attrs):
    t = types[0]
    _float_only(t, "softmax")
    return t


def _vjp_softmax(inputs, outputs, cts, axis):
    y = outputs[0]
    inner = sum(cts[0] * y, axis=axis, keepdim=True)
    return [y * (cts[0] - inner)]


def _softmax_ref(x, axis):
    # Accumulate in fp32 like the kernel does, then return the input dtype.
    return torch.softmax(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, dim=axis).to(x.dtype)


register(Primitive("softmax", ROWWISE, _infer_softmax, ref=_softmax_ref, vjp=_vjp_softmax))


def _infer_rmsnorm(types, attrs):
    x, w = types
    _float_only(x, "rmsnorm")
    if w.rank != 1:
        raise ShapeError(f"rmsnorm weight must be 1-D, got rank {w.rank}")
    unify_dim(x.shape[-1], w.shape[0], "rmsnorm weight length vs the last dim of x")
    same_dtype([x, w], "rmsnorm")
    return x


def _rmsnorm_ref(x, w, eps):
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * r * w.to(xf.dtype)).to(x.dtype)


def _vjp_rmsnorm(inputs, outputs, cts, eps):
    x, w = inputs
    ct = cts[0]
    r = rsqrt(mean(x * x, axis=-1, keepdim=True) + eps)
    g = ct * w
    gx = r * g - x * (r * r * r) * mean(g * x, axis=-1, keepdim=True)
    gw = ct * x * r
    lead = x.ndim - 1
    for _ in range(lead):
        gw = sum(gw, axis=0)
    return [gx, gw]


register(Primitive("rmsnorm", ROWWISE, _infer_rmsnorm, ref=_rmsnorm_ref, vjp=_vjp_rmsnorm))


# ---------------------------------------------------------------------------------------------
# views


def _infer_reshape(types, attrs):
    t = types[0]
    shape = list(attrs["shape"])
    total = sh.mul(*t.shape) if t.shape else 1
    if shape.count(-1) > 1:
        raise ShapeError("reshape takes at most one -1")
    if -1 in shape:
        known = sh.mul(*[d for d in shape if d != -1]) if len(shape) > 1 else 1
        rest = sh.div(total, known)
        if rest is None:
            raise ShapeError(f"cannot infer -1: [{', '.join(map(str, t.shape))}] is not divisible by {known}")
        shape[shape.index(-1)] = rest
    new_total = sh.mul(*shape) if shape else 1
    if sh.factors(new_total) != sh.factors(total):
        if isinstance(new_total, int) and isinstance(total, int):
            raise ShapeError(f"cannot reshape [{', '.join(map(str, t.shape))}] ({total} elements) "
                             f"into [{', '.join(map(str, shape))}] ({new_total} elements)")
        unify_dim(total, new_total, "element count of reshape")
    return TensorType(tuple(shape), t.dtype)


def _vjp_reshape(inputs, outputs, cts, shape):
    return [reshape(cts[0], inputs[0].shape)]


register(Primitive("reshape", VIEW, _infer_reshape,
                   ref=lambda x, shape, _env=None: x.reshape(_resolve(shape, x, _env)), vjp=_vjp_reshape))


def _resolve(shape, x, env):
    if env is None:
        return tuple(d if isinstance(d, int) else -1 for d in shape)
    return tuple(sh.evaluate(d, env) for d in shape)


def _infer_transpose(types, attrs):
    t = types[0]
    a, b = attrs["a"], attrs["b"]
    shape = list(t.shape)
    shape[a], shape[b] = shape[b], shape[a]
    return TensorType(tuple(shape), t.dtype)


register(Primitive("transpose", VIEW, _infer_transpose,
                   ref=lambda x, a, b: x.transpose(a, b),
                   vjp=lambda i, o, c, a, b: [transpose(c[0], a, b)]))


def _infer_expand(types, attrs):
    t = types[0]
    shape = tuple(attrs["shape"])
    try:
        out = broadcast_shapes(t.shape, shape)
    except ShapeError as exc:
        raise ShapeError(f"cannot expand: {exc}") from None
    if out != shape:
        raise ShapeError(f"cannot expand [{', '.join(map(str, t.shape))}] to [{', '.join(map(str, shape))}]")
    return TensorType(shape, t.dtype)


register(Primitive("expand", VIEW, _infer_expand,
                   ref=lambda x, shape, _env=None: x.expand(_resolve(shape, x, _env)),
                   vjp=lambda i, o, c, shape: [unbroadcast(c[0], i[0].shape)]))


def _infer_slice(types, attrs):
    t = types[0]
    start, stop, step = attrs["start"], attrs["stop"], attrs["step"]
    last = t.shape[-1]
    if isinstance(last, int):
        stop = min(stop, last)
        if start >= stop:
            raise ShapeError(f"empty slice {start}:{stop} of a last dim of {last}")
    n = builtins.max(0, (stop - start + step - 1) // step)
    return TensorType(t.shape[:-1] + (n,), t.dtype)


def _slice_ref(x, start, stop, step):
    return x[..., start:stop:step]


def _vjp_slice(inputs, outputs, cts, start, stop, step):
    return [emit(cts[0].graph, "slice_grad", [cts[0].ref],
                 {"size": inputs[0].shape[-1], "start": start, "step": step})]


register(Primitive("slice", VIEW, _infer_slice, ref=_slice_ref, vjp=_vjp_slice))


def _infer_slice_grad(types, attrs):
    t = types[0]
    return TensorType(t.shape[:-1] + (attrs["size"],), t.dtype)


def _slice_grad_ref(ct, size, start, step, _env=None):
    n = size if isinstance(size, int) else sh.evaluate(size, _env)
    out = ct.new_zeros(ct.shape[:-1] + (n,))
    out[..., start:start + step * ct.shape[-1]:step] = ct
    return out


register(Primitive("slice_grad", EXTERN, _infer_slice_grad, ref=_slice_grad_ref,
                   vjp=lambda i, o, c, size, start, step: [_slice_value(c[0], start, start + step * i[0].shape[-1], step)]))


# ---------------------------------------------------------------------------------------------
# matmul


def _infer_matmul(types, attrs):
    a, b = types
    if a.rank < 2 or b.rank < 2:
        raise ShapeError(f"matmul needs operands of rank >= 2, got ranks {a.rank} and {b.rank}")
    dtype = same_dtype([a, b], "matmul")
    if not dtype.is_float:
        raise ShapeError(f"matmul needs floating-point operands, got {dtype.name} "
                         "(int8 GEMMs are quantized ops)")
    unify_dim(a.shape[-1], b.shape[-2], "the contraction dim of matmul (a's last vs b's second-to-last)")
    if b.rank == 2:
        batch = a.shape[:-2]
    elif b.rank == a.rank:
        batch = tuple(unify_dim(x, y, f"batch dim {i} of matmul")
                      for i, (x, y) in enumerate(zip(a.shape[:-2], b.shape[:-2])))
    else:
        raise ShapeError(f"matmul of rank {a.rank} by rank {b.rank}: b must be 2-D or of a's rank")
    return TensorType(batch + (a.shape[-2], b.shape[-1]), dtype)


def _vjp_matmul(inputs, outputs, cts):
    a, b = inputs
    ct = cts[0]
    ga = matmul(ct, transpose(b))
    if b.ndim == 2 and a.ndim > 2:
        a2 = reshape(a, (-1, a.shape[-1]))
        ct2 = reshape(ct, (-1, ct.shape[-1]))
        gb = matmul(transpose(a2), ct2)
    else:
        gb = matmul(transpose(a), ct)
    return [ga, gb]


def _matmul_ref(a, b):
    if a.dtype in (torch.float16, torch.bfloat16) and a.device.type == "cpu":
        return torch.matmul(a.float(), b.float()).to(a.dtype)
    return torch.matmul(a, b)


register(Primitive("matmul", ANCHOR, _infer_matmul, ref=_matmul_ref, vjp=_vjp_matmul))


# ---------------------------------------------------------------------------------------------
# the user-facing functions


def add(a, b): return _emit("add", (a, b))
def sub(a, b): return _emit("sub", (a, b))
def mul(a, b): return _emit("mul", (a, b))
def div(a, b): return _emit("div", (a, b))
def pow(a, b): return _emit("pow", (a, b))  # noqa: A001 - numpy-style name
def maximum(a, b): return _emit("maximum", (a, b))
def minimum(a, b): return _emit("minimum", (a, b))
def less(a, b): return _emit("less", (a, b))
def less_equal(a, b): return _emit("less_equal", (a, b))
def greater(a, b): return _emit("greater", (a, b))
def greater_equal(a, b): return _emit("greater_equal", (a, b))
def equal(a, b): return _emit("equal", (a, b))
def not_equal(a, b): return _emit("not_equal", (a, b))
def neg(x): return _emit("neg", (x,))
def exp(x): return _emit("exp", (x,))
def log(x): return _emit("log", (x,))
def sqrt(x): return _emit("sqrt", (x,))
def rsqrt(x): return _emit("rsqrt", (x,))
def abs(x): return _emit("abs", (x,))  # noqa: A001
def silu(x): return _emit("silu", (x,))
def gelu(x): return _emit("gelu", (x,))
def relu(x): return _emit("relu", (x,))
def sigmoid(x): return _emit("sigmoid", (x,))
def tanh(x): return _emit("tanh", (x,))
def erf(x): return _emit("erf", (x,))


def clamp(x, lo=None, hi=None):
    if lo is not None:
        x = maximum(x, lo)
    if hi is not None:
        x = minimum(x, hi)
    return x


def cast(x, dtype: dt.DType):
    if not isinstance(dtype, dt.DType):
        raise DSLError(f"cast needs a dsl dtype such as dsl.f16, got {dtype!r}", op=_graph_of(x).name)
    if x.dtype is dtype:
        return x
    return _emit("cast", (x,), dtype=dtype)


def where(cond, a, b):
    graph = _graph_of(cond, a, b)
    ref = a if isinstance(a, Value) else b if isinstance(b, Value) else None
    if not isinstance(cond, Value):
        _fail(graph, "where", "where's condition must be a traced bool tensor")
    if ref is None:
        _fail(graph, "where", "where needs a traced tensor for a or b to take its dtype")
    a = a if isinstance(a, Value) else const(graph, a, ref.dtype)
    b = b if isinstance(b, Value) else const(graph, b, ref.dtype)
    return emit(graph, "where", [cond.ref, a.ref, b.ref])


def _reduce(kind, x, axis, keepdim):
    graph = _graph_of(x)
    try:
        ax = norm_axis(axis, x.ndim)
    except ShapeError as exc:
        _fail(graph, kind, str(exc))
    out = emit(graph, kind, [x.ref], {"axis": ax, "_kind": kind})
    if keepdim:
        out = reshape(out, tuple(x.shape[:ax]) + (1,) + tuple(x.shape[ax + 1:]))
    return out


def sum(x, axis=-1, keepdim=False): return _reduce("sum", x, axis, keepdim)  # noqa: A001
def mean(x, axis=-1, keepdim=False): return _reduce("mean", x, axis, keepdim)
def max(x, axis=-1, keepdim=False): return _reduce("max", x, axis, keepdim)  # noqa: A001


def softmax(x, axis=-1):
    graph = _graph_of(x)
    try:
        ax = norm_axis(axis, x.ndim)
    except ShapeError as exc:
        _fail(graph, "softmax", str(exc))
    return emit(graph, "softmax", [x.ref], {"axis": ax})


def rmsnorm(x, weight, eps=1e-6):
    _graph_of(x)
    return _emit("rmsnorm", (x, weight), eps=float(eps))


def reshape(x, shape):
    shape = tuple(shape)
    for d in shape:
        if not (isinstance(d, int) or sh.is_symbol(d) or isinstance(d, str)):
            raise DSLError(f"reshape dims must be ints or symbols, got {d!r}", op=_graph_of(x).name)
    if tuple(x.shape) == shape:
        return x
    return _emit("reshape", (x,), shape=shape)


def transpose(x, a=-2, b=-1):
    graph = _graph_of(x)
    try:
        a, b = norm_axis(a, x.ndim), norm_axis(b, x.ndim)
    except ShapeError as exc:
        _fail(graph, "transpose", str(exc))
    if a == b:
        return x
    a, b = builtins.min(a, b), builtins.max(a, b)
    producer = x.graph.node(x.ref.node)
    if producer.op == "transpose" and producer.attr == {"a": a, "b": b}:
        return Value(x.graph, producer.inputs[0])  # (x.T).T is x
    return _emit("transpose", (x,), a=a, b=b)


def expand(x, shape):
    shape = tuple(shape)
    if tuple(x.shape) == shape:
        return x
    return _emit("expand", (x,), shape=shape)


def dim_size(x: Value, axis: int):
    """A dim's size as a traced scalar (constant when static, a bound symbol otherwise)."""
    d = x.shape[axis]
    if isinstance(d, int):
        return float(d)
    return emit(x.graph, "dim", [], {"dim": d, "dtype": x.dtype})


register(Primitive("dim", SOURCE, lambda types, a: TensorType((), a["dtype"]),
                   ref=lambda dim, dtype, _env=None: torch.tensor(float(sh.evaluate(dim, _env)),
                                                                  dtype=dtype.torch),
                   vjp=None, differentiable=False))


def matmul(a, b):
    graph = _graph_of(a, b)
    if not (isinstance(a, Value) and isinstance(b, Value)):
        _fail(graph, "matmul", "matmul needs two traced tensors")
    return emit(graph, "matmul", [a.ref, b.ref])


def _slice_value(x, start, stop, step=1):
    graph = _graph_of(x)
    last = x.shape[-1]
    step = 1 if step is None else step
    start = 0 if start is None else start
    if isinstance(last, int):
        start = start + last if start < 0 else start
        stop = last if stop is None else (stop + last if stop < 0 else stop)
    elif stop is None:
        if start == 0 and step == 1:
            return x
        _fail(graph, "slice", f"slicing a symbolic dim ({last}) needs an explicit stop")
    elif start < 0 or stop < 0:
        _fail(graph, "slice", f"negative slice bounds on a symbolic dim ({last}) are not supported")
    if step <= 0:
        _fail(graph, "slice", "slice step must be positive")
    if isinstance(last, int) and start == 0 and stop >= last and step == 1:
        return x
    return emit(graph, "slice", [x.ref], {"start": int(start), "stop": int(stop), "step": int(step)})


def getitem(x, index):
    graph = _graph_of(x)
    if not isinstance(index, tuple):
        index = (index,)
    if Ellipsis in index:
        pos = index.index(Ellipsis)
        fill = x.ndim - (len(index) - 1)
        index = index[:pos] + (slice(None),) * fill + index[pos + 1:]
    if len(index) > x.ndim:
        _fail(graph, "slice", f"too many indices for a tensor of rank {x.ndim}")
    index = index + (slice(None),) * (x.ndim - len(index))
    for i, idx in enumerate(index[:-1]):
        if idx != slice(None):
            _fail(graph, "slice", "only slicing on the last axis is supported (x[..., a:b]); "
                           f"got {idx!r} at axis {i}")
    last = index[-1]
    if not isinstance(last, slice):
        _fail(graph, "slice", f"index the last axis with a slice a:b, not {last!r}")
    for v in (last.start, last.stop, last.step):
        if v is not None and not isinstance(v, int):
            _fail(graph, "slice", f"slice bounds must be Python ints, got {v!r}")
    return _slice_value(x, last.start, last.stop, last.step)
