"""Choosing each kernel's launch config at run time (the lookup chain of DESIGN.md)."""

from __future__ import annotations

from autotune.space import get_space


class DefaultResolver:
    """Explicit overrides, else the template default."""

    def __init__(self, overrides: dict):
        self.overrides = overrides
        self._cache: dict[tuple, tuple] = {}

    def resolve(self, kernel, problem: dict):
        key = (kernel.source_hash, tuple(sorted(problem.items())))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        space = get_space(kernel.template)
        override = self.overrides.get(kernel.name) or self.overrides.get(kernel.template)
        if override is not None:
            result = (space.validate(override, where=f"config override for {kernel.name}"), "override", "")
        else:
            result = (dict(space.default), "default", "")
        self._cache[key] = result
        return result


def resolver_for(compiled):
    return DefaultResolver(compiled.overrides)
