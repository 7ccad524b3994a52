"""QTensor: a weight matrix quantized to packed low-bit integer codes with group-wise scales.

A QTensor stands for a weight ``W`` of shape ``[N, K]`` (``nn.Linear`` convention: N output
features, K input features) such that ``W[n, k] ~ (code[n, k] - zero[g, n]) * scale[g, n]`` with
``g = k // group_size``.

Layout ``"k_packed"`` (the one the kernels read)
------------------------------------------------
- ``data``: int32 ``[ceil(K / V), N]`` with ``V = values_per_word(bits)``. Code ``(n, k)`` lives in
  word ``data[k // V, n]`` at bit offset ``(k % V) * bits``. Packing runs along K so that a GEMM's
  K loop reads whole words, and N is the contiguous axis so that neighbouring output columns (the
  threads of a tile) read neighbouring words.
- ``V = 32 // bits``: 16 codes per word at 2 bits, 8 at 4 bits, 4 at 8 bits, and 10 at 3 bits.
  3-bit codes leave the top two bits of each word unused (3.2 stored bits per code): this keeps
  one unpack rule, ``(word >> (k % V) * bits) & (2**bits - 1)``, for every width, instead of codes
  that straddle words or bit-plane arithmetic in the kernel.
- The last word of a column is padded with zero codes when V does not divide K.
- ``scales``: float ``[G, N]`` (G = K // group_size, or 1 for per-channel scales).
- ``zeros``: uint8 ``[G, N]`` integer zero points for asymmetric formats, ``None`` when symmetric;
  the symmetric zero point is fixed at ``2**(bits-1)`` (the MARLIN convention
  ``q = clamp(round(w / s) + 2**(bits-1), 0, 2**bits - 1)``).
"""

from __future__ import annotations

import dataclasses

import torch

from dsl.errors import DSLError

LAYOUT = "k_packed"
SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)
PER_CHANNEL = -1
_FORMAT_FIELDS = 6  # bits, group_size, N, K, symmetric, layout version


def values_per_word(bits: int) -> int:
    """How many codes one int32 word holds (10 for 3 bits, see the module docstring)."""
    _check_bits(bits)
    return 32 // bits


def _check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise DSLError(f"QTensor: bits={bits!r} is not supported; choose one of {list(SUPPORTED_BITS)}")


def check_format(bits: int, group_size: int, shape) -> None:
    """Raise DSLError unless (bits, group_size) is a valid format for a weight of ``shape`` [N, K]."""
    _check_bits(bits)
    if len(shape) != 2:
        raise DSLError(f"QTensor: a quantized weight must be 2-D [N, K]; got shape {tuple(shape)}")
    n, k = (int(d) for d in shape)
    if n <= 0 or k <= 0:
        raise DSLError(f"QTensor: weight shape {tuple(shape)} must have positive dimensions")
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or (group_size != PER_CHANNEL and group_size not in SUPPORTED_GROUP_SIZES)
    ):
        raise DSLError(
            f"QTensor: group_size={group_size!r} is not supported; choose one of "
            f"{list(SUPPORTED_GROUP_SIZES)} or -1 for one scale per output channel"
        )
    if group_size != PER_CHANNEL and k % group_size:
        raise DSLError(
            f"QTensor: group_size={group_size} does not divide K={k} (the weight's input "
            f"features); pick a group size that divides {k} or use -1 (per channel)"
        )


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[N, K]`` (each in ``[0, 2**bits)``) into int32 words ``[ceil(K/V), N]``."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise DSLError(f"QTensor: codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise DSLError(f"QTensor: codes must be an integer tensor, got {codes.dtype}")
    n, k = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise DSLError(
            f"QTensor: codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing; "
            f"got range [{int(c.min())}, {int(c.max())}]"
        )
    vpw = values_per_word(bits)
    words = -(-k // vpw)
    c = torch.nn.functional.pad(c.t(), (0, 0, 0, words * vpw - k))  # [words*V, N]
    shifts = (torch.arange(vpw, device=c.device, dtype=torch.int64) * bits).view(1, vpw, 1)
    packed = (c.view(words, vpw, n) << shifts).sum(dim=1)  # fields are disjoint
    # Two's-complement wrap so that bit 31 survives the narrowing to int32.
    packed = torch.where(packed >= (1 << 31), packed - (1 << 32), packed)
    return packed.to(torch.int32).contiguous()


def unpack_codes(data: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`, transposed: int32 codes ``[K, N]`` (the kernels' B operand)."""
    vpw = values_per_word(bits)
    words, n = data.shape
    shifts = (torch.arange(vpw, device=data.device, dtype=torch.int32) * bits).view(1, vpw, 1)
    codes = (data.unsqueeze(1) >> shifts) & ((1 << bits) - 1)  # [words, V, N]
    return codes.reshape(words * vpw, n)[:k]


@dataclasses.dataclass
class QTensor:
    """A packed quantized weight; see the module docstring for the layout."""

    data: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    shape: tuple[int, int]
    symmetric: bool
    layout: str = LAYOUT

    def __post_init__(self):
        self.shape = tuple(int(d) for d in self.shape)
        check_format(self.bits, self.group_size, self.shape)
        n, k = self.shape
        if self.layout != LAYOUT:
            raise DSLError(f"QTensor: unknown layout {self.layout!r}; only {LAYOUT!r} exists")
        want_words = (-(-k // self.values_per_word), n)
        if self.data.dtype != torch.int32 or tuple(self.data.shape) != want_words:
            raise DSLError(
                f"QTensor: data must be int32 of shape {list(want_words)} for a {self.bits}-bit "
                f"[{n}, {k}] weight; got {self.data.dtype} {list(self.data.shape)}"
            )
        want_groups = (self.num_groups, n)
        if not self.scales.dtype.is_floating_point or tuple(self.scales.shape) != want_groups:
            raise DSLError(
                f"QTensor: scales must be floating point of shape {list(want_groups)}; got "
                f"{self.scales.dtype} {list(self.scales.shape)}"
            )
        if self.symmetric:
            if self.zeros is not None:
                raise DSLError(
                    "QTensor: a symmetric format has no zero points (zero is 2**(bits-1)); "
                    "pass zeros=None or symmetric=False"
                )
        else:
            if self.zeros is None:
                raise DSLError("QTensor: an asymmetric format needs zero points (zeros=[G, N] uint8)")
            if self.zeros.dtype != torch.uint8 or tuple(self.zeros.shape) != want_groups:
                raise DSLError(
                    f"QTensor: zeros must be uint8 of shape {list(want_groups)}; got "
                    f"{self.zeros.dtype} {list(self.zeros.shape)}"
                )
            if self.bits < 8 and self.zeros.numel() and int(self.zeros.max()) >= (1 << self.bits):
                raise DSLError(f"QTensor: zero points must lie in [0, {(1 << self.bits) - 1}]")
        devices = {t.device for t in (self.data, self.scales, self.zeros) if t is not None}
        if len(devices) != 1:
            raise DSLError(
                f"QTensor: data, scales and zeros must live on one device; got {sorted(map(str, devices))}"
            )

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def pack(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None = None,
        *,
        bits: int,
        group_size: int,
        symmetric: bool | None = None,
    ) -> "QTensor":
        """Build from unpacked codes ``[N, K]``, scales ``[G, N]`` and optional zero points ``[G, N]``."""
        check_format(bits, group_size, tuple(codes.shape))
        if symmetric is None:
            symmetric = zeros is None
        if zeros is not None:
            if zeros.dtype.is_floating_point and not torch.equal(zeros, zeros.round()):
                raise DSLError("QTensor: zero points must be integers")
            if zeros.numel() and (float(zeros.min()) < 0 or float(zeros.max()) > 255):
                raise DSLError(
                    f"QTensor: zero points must lie in [0, 255]; got range "
                    f"[{float(zeros.min()):g}, {float(zeros.max()):g}]"
                )
            zeros = zeros.to(torch.uint8)
        return cls(
            pack_codes(codes, bits),
            scales.contiguous(),
            None if zeros is None else zeros.contiguous(),
            bits,
            group_size,
            tuple(codes.shape),
            bool(symmetric),
        )

    # ---- format facts -------------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def values_per_word(self) -> int:
        return values_per_word(self.bits)

    @property
    def effective_group_size(self) -> int:
        """Columns per scale: K for per-channel scales."""
        return self.in_features if self.group_size == PER_CHANNEL else self.group_size

    @property
    def num_groups(self) -> int:
        return self.in_features // self.effective_group_size

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in (self.data, self.scales, self.zeros) if t is not None
        )

    def zero_points(self) -> torch.Tensor:
        """Zero points ``[G, N]`` as float32 (the constant ``2**(bits-1)`` when symmetric)."""
        if self.zeros is None:
            return torch.full(self.scales.shape, float(1 << (self.bits - 1)), device=self.device)
        return self.zeros.to(torch.float32)

    # ---- reference semantics ------------------------------------------------------------------
    def unpack(self) -> torch.Tensor:
        """Integer codes ``[N, K]`` (int32)."""
        return unpack_codes(self.data, self.bits, self.in_features).t()

    def dequantize_kn(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight transposed, ``[K, N]``: what ``x @ W.T`` multiplies by."""
        k, n = self.in_features, self.out_features
        g, gs = self.num_groups, self.effective_group_size
        codes = unpack_codes(self.data, self.bits, k).to(torch.float32).view(g, gs, n)
        w = (codes - self.zero_points().unsqueeze(1)) * self.scales.to(torch.float32).unsqueeze(1)
        return w.view(k, n).to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight ``[N, K]``."""
        return self.dequantize_kn(dtype).t()

    # ---- movement and serialisation -----------------------------------------------------------
    def to(self, device=None, *, scale_dtype: torch.dtype | None = None) -> "QTensor":
        def move(t):
            return None if t is None else t.to(device)

        scales = move(self.scales)
        if scale_dtype is not None:
            scales = scales.to(scale_dtype)
        return dataclasses.replace(self, data=move(self.data), scales=scales, zeros=move(self.zeros))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-friendly): the format travels as a small int64 tensor."""
        fmt = torch.tensor(
            [self.bits, self.group_size, *self.shape, int(self.symmetric), 1], dtype=torch.int64
        )
        out = {"data": self.data, "scales": self.scales, "format": fmt}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "QTensor":
        missing = {"data", "scales", "format"} - set(state)
        if missing:
            raise DSLError(f"QTensor: state dict lacks {sorted(missing)}")
        fmt = [int(v) for v in state["format"].tolist()]
        if len(fmt) != _FORMAT_FIELDS or fmt[5] != 1:
            raise DSLError(f"QTensor: unrecognised format record {fmt}")
        bits, group_size, n, k, sym, _ = fmt
        return cls(state["data"], state["scales"], state.get("zeros"), bits, group_size, (n, k), bool(sym))

    def __repr__(self) -> str:
        gs = "per-channel" if self.group_size == PER_CHANNEL else f"g{self.group_size}"
        kind = "sym" if self.symmetric else "asym"
        return (
            f"QTensor(shape={list(self.shape)}, bits={self.bits}, {gs}, {kind}, layout={self.layout}, "
            f"scales={self.scales.dtype}, device={self.device}, nbytes={self.nbytes})"
        )
