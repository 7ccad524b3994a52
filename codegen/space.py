"""Search spaces: per template, the tunable parameters, their values, and constraints as code.

A space is a property of its kernel template (declared beside it in ``codegen.kernels``), not of
the tuner. A config is a plain dict of ints: template constexprs (BLOCK_M, ...) plus the launch
options ``num_warps`` and ``num_stages``. Constraints see the config, the problem shape and the
device descriptor (``autotune.devices.Device``, read by attribute: vendor, smem_per_block, ...).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Mapping

from dsl.errors import TuningError

Config = dict[str, int]
Shape = Mapping[str, int]
Device = Any  # a device descriptor; codegen reads its attributes and never imports autotune
Constraint = Callable[[Config, Shape, Device], bool]


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    template: str
    params: dict[str, tuple[int, ...]]
    default: Config
    constraints: tuple[tuple[str, Constraint], ...] = ()
    # Estimated shared-memory bytes of a config (for the static filter before compiling).
    smem_bytes: Callable[[Config, Shape, int], int] | None = None

    def __post_init__(self):
        self.validate(self.default, where=f"default of template '{self.template}'")

    def validate(self, config: Mapping, where: str = "config") -> Config:
        """Check names, types and allowed values; return a clean copy. Raises TuningError."""
        unknown = set(config) - set(self.params)
        if unknown:
            raise TuningError(f"{where}: unknown parameter(s) {sorted(unknown)} for template "
                              f"'{self.template}' (known: {sorted(self.params)})")
        missing = set(self.params) - set(config)
        if missing:
            raise TuningError(f"{where}: missing parameter(s) {sorted(missing)} for '{self.template}'")
        out = {}
        for name, value in config.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise TuningError(f"{where}: parameter {name} must be an int, got {value!r}")
            if value not in self.params[name]:
                raise TuningError(f"{where}: {name}={value} not in {list(self.params[name])}")
            out[name] = value
        return out

    def violations(self, config: Config, shape: Shape, device: Device) -> list[str]:
        return [name for name, check in self.constraints if not check(config, shape, device)]

    def feasible(self, config: Config, shape: Shape, device: Device) -> bool:
        return not self.violations(config, shape, device)

    def enumerate(self, shape: Shape, device: Device):
        names = list(self.params)
        for values in itertools.product(*(self.params[n] for n in names)):
            config = dict(zip(names, values))
            if self.feasible(config, shape, device):
                yield config

    def size(self) -> int:
        n = 1
        for values in self.params.values():
            n *= len(values)
        return n


def smem_fits(config: Config, shape: Shape, device: Device, space: SearchSpace, elem_bytes: int = 2) -> bool:
    if space.smem_bytes is None or device.vendor == "cpu":
        return True
    return space.smem_bytes(config, shape, elem_bytes) <= device.smem_per_block
