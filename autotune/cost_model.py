"""Cost model: predicted kernel time from a roofline with wave quantisation and tile waste.

Used to rank candidates before measuring (warm start of the tuner) and to write ``predicted``
records for a device one does not have (``kdsl tune --target h100 --offline``). It ranks; it does
not promise absolute times.

Every kernel template declares what one launch does (``KernelTemplate.work`` -> a
:class:`codegen.work.TiledWork`: programs, padded work, bytes, resources); this module turns that
into time. The time is the sum over waves of the slowest of compute, DRAM, L2 and exposed latency,
plus launch overhead:

- **wave quantisation**: programs run in waves of ``sm_count * occupancy``; a last, partial wave
  costs as long as its busiest SM, so one program past a full wave adds a whole per-SM slot;
- **occupancy** from shared memory, registers and threads per SM; it hides latency, not compute;
- a missing pipeline (num_stages 1-2) exposes load latency; spills slow a program bluntly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

from codegen.template import get_template
from codegen.work import TiledWork, occupancy_of

from .devices import Device

Config = Mapping[str, int]
Problem = Mapping[str, object]

LAUNCH_S = 4e-6              # launch overhead per kernel
ITER_LATENCY_S = 0.6e-6      # global-load latency a K-loop iteration exposes without pipelining
L2_BANDWIDTH_FACTOR = 3.0    # L2 -> SM bandwidth relative to DRAM (A100/H100 are ~3x)


def roofline_time(work: TiledWork, device: Device) -> float:
    """Seconds for a :class:`TiledWork` on ``device`` (``inf`` if a program cannot be resident)."""
    occ = occupancy_of(work, device)
    if occ == 0 or work.programs <= 0:
        return math.inf if work.programs > 0 else LAUNCH_S * work.launches
    peak_per_sm = device.flops(work.dtype) / device.sm_count * work.efficiency
    t_program = work.flops_per_program / peak_per_sm
    if work.alu_ops_per_program:
        # The prologue feeds each MMA step, so its ALU time adds to the tensor-core time rather than
        # hiding under it. fp32 peak counts an FMA as two operations.
        t_program += work.alu_ops_per_program / (device.flops("f32") / 2 / device.sm_count)
    if work.regs_per_thread > device.max_regs_per_thread > 0:
        # Spilled accumulators go through local memory: a large, blunt slowdown.
        t_program *= 3.0 + (work.regs_per_thread - device.max_regs_per_thread) / device.max_regs_per_thread * 4
    latency = work.k_iters * ITER_LATENCY_S / max(1, work.latency_hiding)
    dram_per_program = work.dram_bytes / work.programs
    l2_bandwidth = device.mem_bandwidth * L2_BANDWIDTH_FACTOR

    slots = device.sm_count * occ
    full_waves, tail = divmod(work.programs, slots)

    def wave(programs_in_wave: int) -> float:
        per_sm = -(-programs_in_wave // device.sm_count)   # programs on the busiest SM
        compute = per_sm * t_program
        dram = programs_in_wave * dram_per_program / device.mem_bandwidth
        l2 = programs_in_wave * work.load_bytes_per_program / l2_bandwidth
        memory = max(dram, l2)
        return max(compute, memory, latency) + (1.0 - work.overlap) * min(compute, memory)

    total = full_waves * wave(slots) + (wave(tail) if tail else 0.0)
    return total + LAUNCH_S * work.launches + work.extra_s


def predict(template: str, problem: Problem, config: Config, device: Device) -> float:
    """Predicted seconds of ``config`` for ``problem`` on ``device`` (``inf``: cannot run there)."""
    return float(roofline_time(get_template(template).work(problem, config, device), device))


@dataclasses.dataclass(frozen=True)
class Ranked:
    seconds: float
    config: dict


def rank(space, problem: Problem, device: Device, top: int | None = None) -> list[Ranked]:
    """Feasible configs of ``space`` for ``problem``, fastest predicted first (ties in a stable order)."""
    shape = {k: v for k, v in problem.items() if isinstance(v, int) and not isinstance(v, bool)}
    scored = []
    for config in space.enumerate(shape, device):
        t = predict(space.template, problem, config, device)
        if math.isfinite(t):
            scored.append(Ranked(t, dict(config)))
    scored.sort(key=lambda r: (r.seconds, tuple(sorted(r.config.items()))))
    return scored if top is None else scored[:top]
