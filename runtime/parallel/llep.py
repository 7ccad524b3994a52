"""Least-Loaded Expert Parallelism (LLEP, PAPERS.md): spill an overloaded expert's tokens to idle devices.

With P devices and E experts, expert e lives ("is native") on device e // (E / P). Standard expert
parallelism sends all of an expert's tokens to its native device, so one hot expert makes one
device the straggler. LLEP keeps each device's token load under ``cap = alpha * total / P``: experts
are visited in decreasing load; the native device keeps what fits under the cap, and the rest goes
to the currently least-loaded devices in chunks of at least ``m`` tokens (the last piece may be
smaller), each helper receiving a copy of the expert's weights. If no device has room for a chunk,
the least-loaded one takes the remainder. When the device loads are already within ``lam`` of their
mean, the plan is plain expert parallelism.

An expert's tokens are numbered in one global order (source rank, then the order in which that
rank lists them); a plan gives each expert a list of (device, start, end) ranges of that order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from dsl.errors import TrainingError


@dataclasses.dataclass(frozen=True)
class Segment:
    device: int
    start: int   # token range [start, end) in the expert's global token order
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclasses.dataclass(frozen=True)
class Transfer:
    expert: int
    src: int     # native device, owner of the weights (and receiver of their gradient)
    dst: int     # helper device


@dataclasses.dataclass(frozen=True)
class LlepPlan:
    num_devices: int
    experts_per_device: int
    segments: tuple[tuple[Segment, ...], ...]   # per expert, in token order
    transfers: tuple[Transfer, ...]             # sorted by (src, dst, expert)
    device_loads: tuple[int, ...]
    cap: int
    spilled: bool                               # False: the plan is plain expert parallelism

    def native(self, expert: int) -> int:
        return expert // self.experts_per_device

    def device_of(self, expert: int, position: int) -> int:
        for seg in self.segments[expert]:
            if seg.start <= position < seg.end:
                return seg.device
        raise IndexError(f"token {position} is outside expert {expert}'s {self.segments[expert][-1].end} tokens")

    def experts_on(self, device: int) -> list[int]:
        """Experts that ``device`` computes for, native or borrowed, in increasing id."""
        return sorted({e for e, segs in enumerate(self.segments) for s in segs if s.device == device and s.size})

    def imbalance(self) -> float:
        mean = sum(self.device_loads) / self.num_devices
        return max(self.device_loads) / mean if mean else 1.0


def plain_ep_plan(loads: Sequence[int], num_devices: int) -> LlepPlan:
    per = _experts_per_device(len(loads), num_devices)
    dev_loads = [0] * num_devices
    segments = []
    for e, load in enumerate(loads):
        dev_loads[e // per] += int(load)
        segments.append((Segment(e // per, 0, int(load)),))
    total = sum(int(x) for x in loads)
    return LlepPlan(num_devices, per, tuple(segments), (), tuple(dev_loads),
                    math.ceil(total / num_devices), False)


def _experts_per_device(num_experts: int, num_devices: int) -> int:
    if num_devices < 1 or num_experts < 1 or num_experts % num_devices:
        raise TrainingError(f"{num_experts} experts cannot be sharded evenly over {num_devices} devices")
    return num_experts // num_devices


def plan(loads: Sequence[int], num_devices: int, alpha: float = 1.0, m: int = 1024, lam: float = 1.3) -> LlepPlan:
    """The LLEP assignment of each expert's tokens to devices for global per-expert ``loads``."""
    loads = [int(x) for x in loads]
    if any(x < 0 for x in loads):
        raise TrainingError("expert loads must be non-negative token counts")
    if alpha < 1.0 or m < 1 or lam < 1.0:
        raise TrainingError(f"LLEP needs alpha >= 1, m >= 1 and lambda >= 1, got {alpha}, {m}, {lam}")
    per = _experts_per_device(len(loads), num_devices)
    total = sum(loads)
    native_loads = [sum(loads[d * per:(d + 1) * per]) for d in range(num_devices)]
    mean = total / num_devices
    if total == 0 or max(native_loads) / mean < lam:
        return plain_ep_plan(loads, num_devices)

    cap = math.ceil(alpha * total / num_devices)
    assigned = [0] * num_devices
    segments: list[list[Segment]] = [[] for _ in loads]
    transfers: set[tuple[int, int, int]] = set()
    # Stable on ties so every rank computes the same plan from the same loads.
    for e in sorted(range(len(loads)), key=lambda i: (-loads[i], i)):
        home, remaining, pos = e // per, loads[e], 0
        keep = min(remaining, max(0, cap - assigned[home]))
        if keep:
            segments[e].append(Segment(home, 0, keep))
            assigned[home] += keep
            remaining -= keep
            pos = keep
        while remaining:
            need = min(m, remaining)
            roomy = [d for d in range(num_devices) if cap - assigned[d] >= need]
            if roomy:
                dev = min(roomy, key=lambda d: (assigned[d], d))
                take = min(remaining, cap - assigned[dev])
            else:
                dev = min(range(num_devices), key=lambda d: (assigned[d], d))
                take = remaining
            if segments[e] and segments[e][-1].device == dev:   # merge with a piece already there
                last = segments[e].pop()
                segments[e].append(Segment(dev, last.start, pos + take))
            else:
                segments[e].append(Segment(dev, pos, pos + take))
            if dev != home:
                transfers.add((home, dev, e))
            assigned[dev] += take
            pos += take
            remaining -= take
        if not segments[e]:
            segments[e].append(Segment(home, 0, 0))
    return LlepPlan(num_devices, per, tuple(tuple(s) for s in segments),
                    tuple(Transfer(e, src, dst) for src, dst, e in sorted(transfers)),
                    tuple(assigned), cap, True)
