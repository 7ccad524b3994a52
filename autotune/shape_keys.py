"""Shape keys: the canonical text of a problem shape, and how far apart two shapes are.

A tuning record is keyed by the exact shape it was measured at. When no record exists for a shape,
the lookup may borrow one from a *near* shape, but only along the token-count dimension (the batch of
rows, e.g. ``M`` of a GEMM), only when every other dimension is equal, and only across a bounded
ratio: a config tuned for M=128 says little about M=8192.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

from dsl.errors import TuningError

DIM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}")
# Far above any real problem size, far below anything that would overflow a 64-bit column.
MAX_DIM = 1 << 40
DEFAULT_MAX_RATIO = 2.0


def check_shape(shape: Mapping[str, int], where: str = "shape") -> dict[str, int]:
    """A clean copy of ``shape`` after checking names and sizes; raises TuningError."""
    if not isinstance(shape, Mapping) or not shape:
        raise TuningError(f"{where}: expected a non-empty mapping of dimension name to size, got {shape!r}")
    out = {}
    for name, size in shape.items():
        if not isinstance(name, str) or not DIM_NAME.fullmatch(name):
            raise TuningError(f"{where}: dimension name {name!r} is not an identifier")
        if isinstance(size, bool) or not isinstance(size, int):
            raise TuningError(f"{where}: {name}={size!r}: sizes must be integers")
        if size < 1:
            raise TuningError(f"{where}: {name}={size}: sizes must be >= 1")
        if size > MAX_DIM:
            raise TuningError(f"{where}: {name}={size}: sizes must be <= 2**{MAX_DIM.bit_length() - 1}")
        out[name] = size
    return out


def shape_key(shape: Mapping[str, int]) -> str:
    """Canonical key, dimensions sorted by name: ``{"M": 128, "N": 256, "K": 512}`` -> ``"K=512,M=128,N=256"``."""
    clean = check_shape(shape)
    return ",".join(f"{name}={clean[name]}" for name in sorted(clean))


def parse_shape_key(key: str) -> dict[str, int]:
    """Inverse of :func:`shape_key`; raises TuningError on anything that is not a canonical key."""
    shape: dict[str, int] = {}
    for part in key.split(","):
        name, sep, value = part.partition("=")
        if not sep or not value.isdigit():
            raise TuningError(f"malformed shape key {key!r} (expected NAME=INT,...)")
        shape[name] = int(value)
    check_shape(shape, where=f"shape key {key!r}")
    if shape_key(shape) != key:
        raise TuningError(f"shape key {key!r} is not canonical (expected {shape_key(shape)!r})")
    return shape


def parse_shape_arg(text: str) -> dict[str, int]:
    """Parse a user's ``M=128,N=256,K=512`` (any order, spaces allowed) into a shape."""
    shape: dict[str, int] = {}
    for part in text.split(","):
        name, sep, value = (p.strip() for p in part.partition("="))
        if not sep or not value.isdigit():
            raise TuningError(f"bad shape {text!r}: expected NAME=INT[,NAME=INT...]")
        if name in shape:
            raise TuningError(f"bad shape {text!r}: dimension {name} given twice")
        shape[name] = int(value)
    return check_shape(shape, where=f"shape {text!r}")


def shape_distance(a: Mapping[str, int], b: Mapping[str, int]) -> float:
    """Euclidean distance in log2 space; infinite when the two shapes do not name the same dims.

    Log space because kernel behaviour scales with ratios: 64 -> 128 is as large a step as 4096 -> 8192.
    """
    if set(a) != set(b):
        return math.inf
    return math.sqrt(sum((math.log2(a[d]) - math.log2(b[d])) ** 2 for d in sorted(a)))


def within_token_gap(a: Mapping[str, int], b: Mapping[str, int], token_dim: str,
                     max_ratio: float = DEFAULT_MAX_RATIO) -> bool:
    """True when b may stand in for a: same dims, equal except ``token_dim``, which differs by <= max_ratio."""
    if set(a) != set(b) or token_dim not in a:
        return False
    if any(a[d] != b[d] for d in a if d != token_dim):
        return False
    lo, hi = sorted((a[token_dim], b[token_dim]))
    return hi <= lo * max_ratio


T = TypeVar("T")


def nearest_shape(shape: Mapping[str, int], candidates: Iterable[tuple[Mapping[str, int], T]], token_dim: str,
                  max_ratio: float = DEFAULT_MAX_RATIO) -> tuple[Mapping[str, int], T] | None:
    """The candidate (shape, payload) closest to ``shape`` that is within the token gap, or None.

    Ties (one shape above, one below at the same log distance) go to the larger shape: a config tuned
    for more rows rarely fails on fewer, the reverse is where tiles run out of work. The shape key
    breaks any remaining tie, so the answer never depends on the order of the candidates.
    """
    best = None
    best_rank = None
    for cand_shape, payload in candidates:
        if not within_token_gap(shape, cand_shape, token_dim, max_ratio):
            continue
        rank = (shape_distance(shape, cand_shape), -cand_shape[token_dim], shape_key(cand_shape))
        if best_rank is None or rank < best_rank:
            best, best_rank = (cand_shape, payload), rank
    return best
