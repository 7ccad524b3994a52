"""Device descriptors: what the cost model, the constraints and the simulator know of a GPU.

Numbers are vendor datasheet values (dense, no sparsity). ``peak_flops`` is per dtype in FLOP/s.
"""

from __future__ import annotations

import dataclasses
import re
import functools
import hashlib
import json

from dsl.errors import TuningError


@dataclasses.dataclass(frozen=True)
class Device:
    name: str                     # short key used on the CLI: "h100", "a100", ...
    full_name: str
    vendor: str                   # "nvidia" | "amd" | "cpu"
    arch: str                     # triton target arch: "sm_90", "gfx942", "cpu"
    compute_capability: int       # 90 for sm_90, 0 where it does not apply
    sm_count: int                 # SMs / CUs / cores
    warp_size: int
    smem_per_block: int           # bytes of shared memory a block may use (opt-in maximum)
    regs_per_sm: int              # 32-bit registers per SM
    max_regs_per_thread: int
    memory_bytes: int
    mem_bandwidth: float          # bytes/s
    l2_bytes: int
    peak_flops: dict[str, float]  # dtype name -> FLOP/s

    def flops(self, dtype: str) -> float:
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        return self.peak_flops["f32"]

    def fingerprint(self) -> str:
        """Stable identity of the device for tuning keys (the name, arch and SM count)."""
        blob = json.dumps([self.full_name, self.arch, self.sm_count, self.memory_bytes])
        return f"{self.name}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


T = 1e12
GiB = 1 << 30
KiB = 1 << 10

DEVICES: dict[str, Device] = {d.name: d for d in [
    Device("a100", "NVIDIA A100-SXM4-80GB", "nvidia", "sm_80", 80, 108, 32, 163 * KiB, 65536, 255,
           80 * GiB, 2.039e12, 40 * 1024 * KiB,
           {"f32": 19.5 * T, "tf32": 156 * T, "f16": 312 * T, "bf16": 312 * T, "i8": 624 * T}),
    Device("h100", "NVIDIA H100 80GB HBM3", "nvidia", "sm_90", 90, 132, 32, 227 * KiB, 65536, 255,
           80 * GiB, 3.35e12, 50 * 1024 * KiB,
           {"f32": 67 * T, "tf32": 494.5 * T, "f16": 989.5 * T, "bf16": 989.5 * T, "f8e4m3": 1979 * T,
            "i8": 1979 * T}),
    Device("h200", "NVIDIA H200", "nvidia", "sm_90", 90, 132, 32, 227 * KiB, 65536, 255,
           141 * GiB, 4.8e12, 50 * 1024 * KiB,
           {"f32": 67 * T, "tf32": 494.5 * T, "f16": 989.5 * T, "bf16": 989.5 * T, "f8e4m3": 1979 * T,
            "i8": 1979 * T}),
    Device("l40s", "NVIDIA L40S", "nvidia", "sm_89", 89, 142, 32, 99 * KiB, 65536, 255,
           48 * GiB, 0.864e12, 96 * 1024 * KiB,
           {"f32": 91.6 * T, "tf32": 183 * T, "f16": 362 * T, "bf16": 362 * T, "f8e4m3": 733 * T,
            "i8": 733 * T}),
    Device("rtx4090", "NVIDIA GeForce RTX 4090", "nvidia", "sm_89", 89, 128, 32, 99 * KiB, 65536, 255,
           24 * GiB, 1.008e12, 72 * 1024 * KiB,
           {"f32": 82.6 * T, "tf32": 82.6 * T, "f16": 165 * T, "bf16": 165 * T, "f8e4m3": 330 * T,
            "i8": 660 * T}),
    Device("mi300x", "AMD Instinct MI300X", "amd", "gfx942", 0, 304, 64, 64 * KiB, 131072, 512,
           192 * GiB, 5.3e12, 256 * 1024 * KiB,
           {"f32": 163.4 * T, "tf32": 653.7 * T, "f16": 1307 * T, "bf16": 1307 * T, "f8e4m3": 2615 * T,
            "i8": 2615 * T}),
    Device("cpu", "CPU", "cpu", "cpu", 0, 2, 1, 1 << 30, 0, 0, 24 * GiB, 20e9, 32 * 1024 * KiB,
           {"f32": 100e9, "f16": 50e9, "bf16": 50e9, "i8": 100e9}),
]}


def get_device(name: str) -> Device:
    key = name.lower().replace("-", "").replace("_", "")
    if key in DEVICES:
        return DEVICES[key]
    raise TuningError(f"unknown device '{name}'; known: {', '.join(sorted(DEVICES))}")


@functools.lru_cache(maxsize=None)
def cpu_device() -> Device:
    """This machine's CPU as a tuning device (Triton's interpreter); its records key by core count."""
    import os

    return dataclasses.replace(DEVICES["cpu"], sm_count=os.cpu_count() or 1)


@functools.lru_cache(maxsize=None)
def local_device() -> Device:
    """The device kernels run on here: the current CUDA device if any, else the CPU descriptor."""
    import torch

    if not torch.cuda.is_available():
        return cpu_device()
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return match_nvidia(props.name, props.major * 10 + props.minor, props.multi_processor_count, props.total_memory)


def match_nvidia(name: str, cc: int, sm_count: int, memory_bytes: int) -> Device:
    """The descriptor of a CUDA device from what the driver reports. An H200 and an H100 SXM share
    sm_90 and 132 SMs; the name and the memory (141 GB against 80 GB) tell them apart."""
    same_chip = [d for d in DEVICES.values()
                 if d.vendor == "nvidia" and d.compute_capability == cc and d.sm_count == sm_count]
    if same_chip:
        # Whole words only: a board called "GH100 ..." is not named H100; its memory decides.
        words = set(re.findall(r"[a-z0-9]+", name.lower()))
        named = [d for d in same_chip if d.name in words]
        dev = named[0] if named else min(same_chip, key=lambda d: abs(d.memory_bytes - memory_bytes))
        return dataclasses.replace(dev, full_name=name, memory_bytes=memory_bytes)
    # An unlisted GPU: keep what the driver tells us, borrow rates from the closest architecture.
    base = min((d for d in DEVICES.values() if d.vendor == "nvidia"), key=lambda d: abs(d.compute_capability - cc))
    return dataclasses.replace(base, name=name.lower().replace(" ", "_"), full_name=name, compute_capability=cc,
                               arch=f"sm_{cc}", sm_count=sm_count, memory_bytes=memory_bytes)
