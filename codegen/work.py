"""What one launch of a kernel does: programs, padded FLOPs, operand and DRAM bytes, resources.

Each kernel template declares a ``work(problem, config, device) -> TiledWork`` function (its cost
function: the template knows its own tiling); ``autotune.cost_model`` turns a TiledWork into seconds
with the device's roofline. The accounting rules shared by the templates live here:

- **tile waste**: a program computes a full ``BLOCK_M x BLOCK_N x ceil(K/BLOCK_K)*BLOCK_K`` tile even
  when the problem edge leaves it mostly masked;
- **memory**: each wave reads the A rows and B columns its tiles touch (GROUP_M ordering makes a
  wave touch fewer rows than a row-major order); if both operands fit in L2 they are read once;
- **shared memory** as Triton allocates it: ``num_stages`` buffers of each pipelined operand tile
  (checked against sm_90 compiles: 128x128x64 fp16 with 5 stages is 160 KiB + epilogue scratch);
- **penalties**: small per-warp tiles and BLOCK_K=16 underuse the tensor cores, Hopper's wgmma needs
  64 rows per warpgroup, an estimated register need above the limit means spills.

The device argument is a descriptor read by attribute (``autotune.devices.Device``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from dsl.errors import TuningError

Config = Mapping[str, int]
Problem = Mapping[str, object]
Device = Any

MAX_BLOCKS_PER_SM = 32
DTYPE_BYTES = {"f32": 4, "tf32": 4, "f16": 2, "bf16": 2, "f8e4m3": 1, "i8": 1, "i32": 4, "i64": 8}


@dataclasses.dataclass(frozen=True)
class TiledWork:
    programs: int                 # grid size, all tiles over batch and split-K
    flops_per_program: float      # padded work of one program (tile waste included)
    load_bytes_per_program: float  # operand bytes one program streams in (served by L2 or DRAM)
    dram_bytes: float             # DRAM traffic of the whole launch after L2 reuse, stores included
    k_iters: int                  # inner-loop trips of one program
    smem_bytes: int               # shared memory of one program
    regs_per_thread: int          # estimated register need
    threads: int                  # threads per program
    dtype: str                    # compute dtype for the peak rate
    efficiency: float = 1.0       # fraction of peak FLOP/s the tile shape can reach
    overlap: float = 1.0          # how much of load time hides under compute (pipelining), 0..1
    latency_hiding: int = 1       # loads in flight per program (num_stages - 1)
    launches: int = 1
    extra_s: float = 0.0          # e.g. a split-K reduction pass
    alu_ops_per_program: float = 0.0  # CUDA-core work beside the MMAs (a dequantizing prologue)


def _max_threads_per_sm(device: Device) -> int:
    if device.vendor == "amd":
        return 2560
    return 2048 if device.compute_capability in (70, 80, 90, 100) else 1536


def occupancy_of(work: TiledWork, device: Device) -> int:
    """Programs resident per SM (0: a program does not fit at all)."""
    if device.vendor == "cpu":
        return 1
    # Per-SM shared memory is the per-block opt-in limit plus the 1 KiB the driver reserves per block.
    smem_per_sm = device.smem_per_block + 1024
    by_smem = smem_per_sm // (work.smem_bytes + 1024) if work.smem_bytes else MAX_BLOCKS_PER_SM
    regs = min(device.max_regs_per_thread, max(16, work.regs_per_thread))
    regs = -(-regs // 8) * 8  # allocation granularity
    by_regs = device.regs_per_sm // (regs * work.threads) if device.regs_per_sm else MAX_BLOCKS_PER_SM
    by_threads = _max_threads_per_sm(device) // work.threads
    if work.smem_bytes > device.smem_per_block:
        return 0
    return max(0, min(by_smem, by_regs, by_threads, MAX_BLOCKS_PER_SM))


def dim(problem: Problem, *names: str, default: int | None = None) -> int:
    for n in names:
        if n in problem:
            value = problem[n]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TuningError(f"problem dimension {n}={value!r} must be a non-negative int")
            return value
    if default is None:
        raise TuningError(f"problem lacks dimension {'/'.join(names)} (got {sorted(problem)})")
    return default


def dtype_of(problem: Problem) -> tuple[str, int]:
    dtype = str(problem.get("dtype", "f16"))
    if dtype not in DTYPE_BYTES:
        raise TuningError(f"unknown dtype {dtype!r} in problem (known: {sorted(DTYPE_BYTES)})")
    return dtype, DTYPE_BYTES[dtype]


def param(config: Config, name: str, default: int | None = None) -> int:
    if name in config:
        return int(config[name])
    if default is None:
        raise TuningError(f"config lacks {name} (got {sorted(config)})")
    return default


def _wave_footprint(wave_tiles: int, tiles_m: int, tiles_n: int, group_m: int) -> tuple[int, int]:
    """Distinct (row tiles, column tiles) the first ``wave_tiles`` programs of a launch touch."""
    if wave_tiles >= tiles_m * tiles_n:
        return tiles_m, tiles_n
    g = min(max(1, group_m), tiles_m)
    if g == 1:  # row-major: n varies fastest
        return -(-wave_tiles // tiles_n), min(wave_tiles, tiles_n)
    group_size = g * tiles_n
    if wave_tiles >= group_size:  # whole groups of g rows
        return min(tiles_m, -(-wave_tiles // group_size) * g), tiles_n
    return min(g, wave_tiles), -(-wave_tiles // g)


def gemm_work(problem: Problem, config: Config, device: Device) -> TiledWork:
    """C[b] = A[b] (M x K) @ B[b] (K x N): the kdsl ``gemm`` template's accounting.

    Optional problem entries for weight formats narrower than the compute dtype: ``b_bytes``, B's
    bytes per element (a fraction for packed low-bit weights, scales included), and
    ``dequant_ops``, ALU operations per B element a program unpacks before its MMA."""
    batch = dim(problem, "B", "batch", default=1)
    m, n, k = dim(problem, "M"), dim(problem, "N"), dim(problem, "K")
    dtype, in_bytes = dtype_of(problem)
    out_bytes = int(problem.get("out_bytes", in_bytes))
    b_elem = float(problem.get("b_bytes", in_bytes))
    dequant_ops = float(problem.get("dequant_ops", 0.0))
    bm, bn, bk = param(config, "BLOCK_M"), param(config, "BLOCK_N"), param(config, "BLOCK_K")
    split_k = max(1, param(config, "SPLIT_K", 1))
    warps, stages = param(config, "num_warps", 4), param(config, "num_stages", 3)
    group_m = param(config, "GROUP_M", 1)
    threads = warps * device.warp_size

    tiles_m, tiles_n = max(1, -(-m // bm)), max(1, -(-n // bn))
    k_chunk = -(-max(k, 1) // split_k)
    k_iters = -(-k_chunk // bk)
    programs = batch * tiles_m * tiles_n * split_k if m and n else 0
    flops = 2.0 * bm * bn * k_iters * bk
    tile_bytes = bm * in_bytes + bn * b_elem  # one K step of both operand tiles
    load = tile_bytes * k_iters * bk
    smem = int(tile_bytes * bk * max(1, stages))  # Triton allocates num_stages buffers

    # DRAM: if one batch's operands fit in (half) the L2 they are read once; otherwise each wave
    # reads the rows and columns its tiles touch.
    a_bytes, b_bytes = m * k * in_bytes, k * n * b_elem
    compulsory = batch * (a_bytes + b_bytes)
    if a_bytes + b_bytes <= device.l2_bytes / 2 or device.vendor == "cpu":
        operand_dram = compulsory
    else:
        occ_guess = max(1, occupancy_of(TiledWork(1, flops, load, 0, k_iters, smem, 0, threads, dtype), device))
        wave_tiles = max(1, device.sm_count * occ_guess // split_k)
        tiles = tiles_m * tiles_n
        waves = -(-tiles // wave_tiles)
        rows, cols = _wave_footprint(wave_tiles, tiles_m, tiles_n, group_m)
        per_wave = (rows * bm * in_bytes + cols * bn * b_elem) * k
        operand_dram = batch * min(waves * per_wave, tiles * tile_bytes * k)
        operand_dram = max(operand_dram, compulsory)
    store = batch * m * n * (4 * split_k if split_k > 1 else out_bytes)
    extra = 0.0
    launches = 1
    if split_k > 1:
        # fp32 partials reduced by a second pass: read them back, write the output.
        launches = 2
        extra = batch * m * n * (4 * split_k + out_bytes) / device.mem_bandwidth

    # Tensor cores want enough MMA work per warp and per K step.
    warp_tile = bm * bn / warps
    efficiency = min(1.0, math.sqrt(warp_tile / 1024.0))
    if bk < 32:
        efficiency *= 0.8
    if device.vendor == "nvidia" and device.compute_capability >= 90 and bm < 64 * max(1, warps // 4):
        efficiency *= 0.6  # no wgmma: falls back to the older MMA path
    # Accumulators, plus operand tiles staged through registers twice (global->reg->shared while the
    # previous tile feeds the MMA), plus addressing: calibrated on sm_90 compiles, where
    # 128x256x32 fp32 with 8 warps is the first that spills.
    acc_regs = bm * bn / threads
    if dtype == "f32":
        # kdsl's fp32 GEMM is exact (input_precision="ieee"): the FMA path keeps, per thread, the A rows
        # and B columns of its accumulator block for the whole BLOCK_K; 64x32x32 on 2 warps spills.
        regs = int(acc_regs + 2 * math.sqrt(acc_regs) * bk + 32)
    else:
        # The fused epilogue holds a value and a 64-bit address per accumulator element when it
        # stores, so the accumulator counts about twice: 128x256 on 8 warps (128 accumulators per
        # thread) spills on sm_90 with a bias+GELU epilogue, 128x128 does not.
        regs = int(2 * acc_regs + 2 * tile_bytes * bk / 4 / threads + 32)
    if dequant_ops:
        # The unpacked weight tile in fp32 next to its words; calibrated on sm_90 compiles of W4
        # quant_gemm: 128x128x64 on 8 warps is the largest that does not spill, 64x64x128 on 4 does.
        regs += int(1.5 * bk * bn / threads)
    overlap = {1: 0.0, 2: 0.7}.get(stages, 1.0)
    return TiledWork(programs=programs, flops_per_program=flops, load_bytes_per_program=load,
                     dram_bytes=operand_dram + store, k_iters=k_iters, smem_bytes=smem,
                     regs_per_thread=regs, threads=threads, dtype=dtype, efficiency=efficiency,
                     overlap=overlap, latency_hiding=max(1, stages - 1), launches=launches, extra_s=extra,
                     alu_ops_per_program=dequant_ops * bn * bk * k_iters)


def stream_work(elements: int, tile: int, warps: int, bytes_per_elem: float, device: Device,
                 dtype: str, flops_per_elem: float = 1.0) -> TiledWork:
    programs = -(-elements // tile) if elements else 0
    threads = warps * device.warp_size
    per_thread = tile / threads
    return TiledWork(programs=programs, flops_per_program=flops_per_elem * tile,
                     load_bytes_per_program=bytes_per_elem * tile,
                     dram_bytes=bytes_per_elem * programs * tile, k_iters=1, smem_bytes=0,
                     regs_per_thread=int(16 + 2 * per_thread), threads=threads, dtype=dtype,
                     efficiency=min(1.0, per_thread / 4.0), overlap=1.0, latency_hiding=1)


def pointwise_work(problem: Problem, config: Config, device: Device) -> TiledWork:
    numel = dim(problem, "numel")
    dtype, size = dtype_of(problem)
    bytes_per_elem = float(problem.get("bytes_per_elem", 3 * size))   # two inputs, one output
    work = stream_work(numel, param(config, "BLOCK"), param(config, "num_warps", 4), bytes_per_elem,
                        device, "f32")
    return work


def reduction_work(problem: Problem, config: Config, device: Device) -> TiledWork:
    rows, cols = dim(problem, "R"), dim(problem, "C")
    dtype, size = dtype_of(problem)
    br, bc = param(config, "BLOCK_R"), param(config, "BLOCK_C")
    warps = param(config, "num_warps", 4)
    col_iters = -(-cols // bc)
    padded_cols = col_iters * bc  # tile waste along the reduced axis
    programs = -(-rows // br) if rows else 0
    threads = warps * device.warp_size
    work = TiledWork(programs=programs, flops_per_program=2.0 * br * padded_cols,
                     load_bytes_per_program=br * padded_cols * size,
                     dram_bytes=float(rows * cols * size + rows * size), k_iters=col_iters, smem_bytes=0,
                     regs_per_thread=int(16 + 2 * br * bc / threads), threads=threads, dtype="f32",
                     efficiency=min(1.0, br * bc / threads / 4.0), overlap=1.0, latency_hiding=2)
    return work


