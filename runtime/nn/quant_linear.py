"""QuantLinear: an ``nn.Linear`` whose weight is a packed low-bit QTensor, and ``quantize_model``.

Forward: on CUDA tensors (or with ``backend="triton"``) the fused dequantize-GEMM Triton kernel;
on CPU the reference path, dequantize then one matmul (vectorised; with
``cache_dequantized=True`` the dequantized weight is kept between calls, trading memory for speed),
except bf16 activations with a 4-bit grouped weight, which go to PyTorch's packed int4 CPU kernel.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from dsl.errors import DSLError
from dsl.qtensor import PER_CHANNEL, QTensor, check_format, values_per_word
from dsl.quantize import HessianAccumulator, quantize_weight

BACKENDS = ("auto", "torch", "triton")


class QuantLinear(nn.Module):
    """``y = x @ dequantize(W).T + b`` with W stored as a :class:`dsl.QTensor`.

    Buffers (all in ``state_dict``): ``qweight`` (int32 packed codes, layout "k_packed"),
    ``scales`` [G, N], ``zeros`` [G, N] uint8 (asymmetric formats only) and ``bias`` [N].
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = True,
        scale_dtype: torch.dtype = torch.float32,
        device=None,
        backend: str = "auto",
        cache_dequantized: bool = False,
    ):
        super().__init__()
        check_format(bits, group_size, (out_features, in_features))
        if backend not in BACKENDS:
            raise DSLError(f"QuantLinear: backend must be one of {BACKENDS}, got {backend!r}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.backend, self.cache_dequantized = backend, cache_dequantized
        self.config: dict | None = None  # a kernel config for the triton path (None: default)
        groups = 1 if group_size == PER_CHANNEL else in_features // group_size
        words = -(-in_features // values_per_word(bits))
        self.register_buffer("qweight", torch.zeros(words, out_features, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(groups, out_features, dtype=scale_dtype, device=device))
        self.register_buffer(
            "zeros", None if sym else torch.zeros(groups, out_features, dtype=torch.uint8, device=device)
        )
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self._dequantized: tuple[tuple, torch.Tensor] | None = None
        # bf16 activations on CPU with a 4-bit grouped weight use torch's packed int4 kernel.
        self.use_torch_int4 = True
        self._int4pack: tuple[tuple, tuple] | None = None

    @property
    def weight_q(self) -> QTensor:
        return QTensor(
            self.qweight,
            self.scales,
            self.zeros,
            self.bits,
            self.group_size,
            (self.out_features, self.in_features),
            self.sym,
        )

    def set_qweight(self, q: QTensor) -> None:
        if (q.shape, q.bits, q.group_size, q.symmetric) != (
            (self.out_features, self.in_features),
            self.bits,
            self.group_size,
            self.sym,
        ):
            raise DSLError(
                f"QuantLinear: {q!r} does not match this layer's format "
                f"({self.bits}-bit, group {self.group_size}, sym={self.sym}, "
                f"[{self.out_features}, {self.in_features}])"
            )
        self.qweight, self.scales, self.zeros = q.data, q.scales, q.zeros
        self._dequantized = self._int4pack = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: int = 4,
        group_size: int = 128,
        method: str = "rtn",
        sym: bool = True,
        calib: torch.Tensor | None = None,
        *,
        hessian: torch.Tensor | None = None,
        clip_search: bool = False,
        scale_dtype: torch.dtype = torch.float32,
        backend: str = "auto",
        cache_dequantized: bool = False,
    ) -> "QuantLinear":
        """Quantize an ``nn.Linear``: method "rtn" (round to nearest) or "gptq" (needs ``calib``,
        the layer's input activations [..., in_features], or their ``hessian``)."""
        if not isinstance(linear, nn.Linear):
            raise DSLError(f"QuantLinear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        module = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            bits=bits,
            group_size=group_size,
            sym=sym,
            scale_dtype=scale_dtype,
            device=weight.device,
            backend=backend,
            cache_dequantized=cache_dequantized,
        )
        extra = {"clip_search": clip_search, "scale_dtype": scale_dtype}
        if method == "gptq" and hessian is not None:
            extra["hessian"] = hessian
        module.set_qweight(quantize_weight(weight.float(), bits, group_size, sym, method, calib, **extra))
        if linear.bias is not None:
            module.bias = linear.bias.detach().float().clone()
        return module

    def _apply(self, fn, recurse=True):
        self._dequantized = self._int4pack = None  # moved or cast: caches belong to the old tensors
        return super()._apply(fn, recurse)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``[N, K]`` weight in ``dtype`` (cached when ``cache_dequantized``)."""
        key = (dtype, self.qweight.data_ptr(), self.qweight._version, self.scales._version)
        if self._dequantized is not None and self._dequantized[0] == key:
            return self._dequantized[1]
        w = self.weight_q.dequantize_kn(torch.float32).to(dtype).t()
        if self.cache_dequantized:
            self._dequantized = (key, w)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_triton = self.backend == "triton" or (self.backend == "auto" and x.is_cuda)
        if use_triton:
            from runtime.ops.quant import quant_matmul

            return quant_matmul(x, self.weight_q, self.bias, config=self.config)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self._torch_int4_applies(x):
            y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features), *self._torch_int4_weight())
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if bias is None else y + bias
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    # PyTorch ships a vectorised CPU kernel for 4-bit group-wise weights with bf16 activations; it
    # reads the packed weight directly, where dequantize-then-matmul first rebuilds all of it.
    def _torch_int4_applies(self, x: torch.Tensor) -> bool:
        return (
            self.use_torch_int4
            and x.device.type == "cpu"
            and x.dtype == torch.bfloat16
            and self.bits == 4
            and self.group_size in (32, 64, 128, 256)
            and self.out_features % 16 == 0
            and hasattr(torch, "_weight_int4pack_mm_for_cpu")
        )

    def _torch_int4_weight(self):
        key = (self.qweight.data_ptr(), self.qweight._version, self.scales._version)
        if self._int4pack is None or self._int4pack[0] != key:
            q = self.weight_q
            packed = torch._convert_weight_to_int4pack_for_cpu(q.unpack(), 1)
            # torch's convention is w = (q - 8) * scale + offset; ours w = (q - zero) * scale.
            scale = q.scales.to(torch.float32)
            offset = (8.0 - q.zero_points()) * scale
            scale_and_offset = torch.stack([scale, offset], dim=-1).to(torch.bfloat16).contiguous()
            self._int4pack = (key, (packed, self.group_size, scale_and_offset))
        return self._int4pack[1]

    def extra_repr(self) -> str:
        gs = "per-channel" if self.group_size == PER_CHANNEL else self.group_size
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={gs}, sym={self.sym}, backend={self.backend}"
        )


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) or name.endswith("." + p) for p in patterns)


def _run_calibration(model: nn.Module, targets: dict[str, nn.Linear], calib_data) -> dict[str, torch.Tensor]:
    """One pass of the float model over ``calib_data``; the Hessian of every target's inputs."""
    accs = {
        name: HessianAccumulator(lin.in_features, device=lin.weight.device) for name, lin in targets.items()
    }
    hooks = [
        lin.register_forward_pre_hook(lambda mod, args, acc=accs[name]: acc.add(args[0]))
        for name, lin in targets.items()
    ]
    batches = [calib_data] if isinstance(calib_data, torch.Tensor) else calib_data
    try:
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, dict):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: acc.hessian() for name, acc in accs.items()}


def quantize_model(
    model: nn.Module,
    bits: int = 4,
    group_size: int = 128,
    *,
    method: str | None = None,
    sym: bool = True,
    skip: Iterable[str] = ("lm_head",),
    calib_data=None,
    clip_search: bool = False,
    scale_dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a :class:`QuantLinear`.

    ``skip``: module names or fnmatch patterns left in float ("lm_head" also matches
    "model.lm_head"). ``method`` defaults to "gptq" when ``calib_data`` is given (a tensor, or an
    iterable of model inputs: tensors, tuples of positional args, or dicts of keyword args), else
    "rtn". GPTQ Hessians come from one calibration pass of the float model. Returns the new
    modules by name.
    """
    method = method or ("gptq" if calib_data is not None else "rtn")
    if method not in ("rtn", "gptq"):
        raise DSLError(f"quantize_model: method must be 'rtn' or 'gptq', got {method!r}")
    if method == "gptq" and calib_data is None:
        raise DSLError("quantize_model: method='gptq' needs calib_data (inputs to run the model on)")
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    targets = {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and not _matches(name, skip)
    }
    for name, lin in targets.items():
        try:
            check_format(bits, group_size, (lin.out_features, lin.in_features))
        except DSLError as exc:
            raise DSLError(
                f"quantize_model: layer '{name}' cannot be quantized: {exc}; add it to skip= "
                f"or use group_size=-1"
            ) from None
    if "" in targets:
        raise DSLError("quantize_model: the model is itself an nn.Linear; use QuantLinear.from_linear(model)")
    hessians = _run_calibration(model, targets, calib_data) if method == "gptq" else {}
    for name, lin in targets.items():
        qlin = QuantLinear.from_linear(
            lin,
            bits,
            group_size,
            method,
            sym,
            hessian=hessians.get(name),
            clip_search=clip_search,
            scale_dtype=scale_dtype,
            backend=backend,
        )
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, qlin)
    return model
