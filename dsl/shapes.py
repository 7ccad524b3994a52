"""Symbolic dims: an int, a symbol ("M"), or a product of symbols and an int ("4*B*S").

Products appear when a reshape merges dims; they are evaluated once symbols are bound at call time.
"""

from __future__ import annotations

import math
import re

_SYMBOL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def is_symbol(d) -> bool:
    return isinstance(d, str) and bool(_SYMBOL.match(d))


def factors(d) -> tuple[int, list[str]]:
    if isinstance(d, int):
        return d, []
    coef, syms = 1, []
    for part in d.split("*"):
        if part.isdigit():
            coef *= int(part)
        else:
            syms.append(part)
    return coef, sorted(syms)


def make(coef: int, syms: list[str]):
    if not syms:
        return coef
    body = "*".join(sorted(syms))
    return body if coef == 1 else f"{coef}*{body}"


def mul(*dims):
    coef, syms = 1, []
    for d in dims:
        c, s = factors(d)
        coef *= c
        syms += s
    return make(coef, syms)


def div(a, b):
    """a / b if it is exact symbolically, else None."""
    ca, sa = factors(a)
    cb, sb = factors(b)
    if ca % cb:
        return None
    rest = list(sa)
    for s in sb:
        if s not in rest:
            return None
        rest.remove(s)
    return make(ca // cb, rest)


def evaluate(d, env: dict[str, int]) -> int:
    coef, syms = factors(d)
    return coef * math.prod(env[s] for s in syms)


def free_symbols(d) -> list[str]:
    return factors(d)[1]
