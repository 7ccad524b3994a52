"""Quantized GEMM benchmark: y = x @ W.T for a weight W [N, K] at batch sizes 1..128.

CPU (always): fp32 matmul against, in the same run,
  - bf16 matmul,
  - kdsl's torch path of QuantLinear: unpack + dequantize + matmul on every call (W4 g128, fp32
    activations), the same with the dequantized weight cached (cache_dequantized=True), and
    QuantLinear with bf16 activations (which hands 4-bit grouped weights to torch's int4 kernel),
  - PyTorch's own CPU kernels, when this torch has them: ``torch._weight_int8pack_mm``
    (int8 weights, per-channel scales) and ``torch._weight_int4pack_mm_for_cpu`` (4-bit, group 128),
    both with bf16 activations (their vectorised path).
GPU (only when CUDA is available): kdsl's W4A16 Triton kernel (4-bit, group 128, fp16 activations)
against fp16 ``torch.matmul`` (cuBLAS).

Prints a table of time ratios (method / baseline; < 1 is faster) and writes JSON under
benchmarks/results/. Usage: ``python -m benchmarks.bench_quant [--n 2048 --k 2048 --batches 1,8,128]``
or ``kdsl bench quant ...``.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import median_time, write_results  # noqa: E402

DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)


def _torch_int8_weights(w: torch.Tensor, dtype: torch.dtype):
    if not hasattr(torch, "_weight_int8pack_mm"):
        return None
    from dsl.quantize import quantize_int8_per_channel

    wq, ws = quantize_int8_per_channel(w)
    ws = ws.to(dtype)
    return lambda x: torch._weight_int8pack_mm(x, wq, ws)


def _torch_int4_weights(w: torch.Tensor, group_size: int, dtype: torch.dtype):
    """PyTorch's int4 CPU kernel: asymmetric codes q in [0, 15], w = (q - 8) * scale + zero."""
    if not (
        hasattr(torch, "_convert_weight_to_int4pack_for_cpu")
        and hasattr(torch, "_weight_int4pack_mm_for_cpu")
    ):
        return None
    n, k = w.shape
    if k % group_size:
        return None
    wg = w.reshape(n, k // group_size, group_size)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp_min(1e-10)
    codes = ((wg - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    scale_and_zero = torch.stack([scale.t(), (lo + 8 * scale).t()], dim=-1).contiguous().to(dtype)
    return lambda x: torch._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_and_zero)


# PyTorch's packed CPU kernels are vectorised for bfloat16 activations only (fp32/fp16 inputs take a
# scalar fallback 40-100x slower), so they run in bf16: each method's activation dtype is recorded.
CPU_METHODS = (
    "bf16_matmul",
    "kdsl_dequant_matmul",
    "kdsl_cached_dequant",
    "kdsl_quantlinear_bf16",
    "torch_int8pack_mm_bf16",
    "torch_int4pack_mm_bf16",
)


def run_cpu(n: int, k: int, batches, repeats: int, bits: int, group_size: int) -> dict:
    from runtime.nn.quant_linear import QuantLinear
    from dsl.quantize import sqnr_db

    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n, bias=False)
    w = linear.weight.detach()
    w_bf16 = w.to(torch.bfloat16)
    fresh = QuantLinear.from_linear(linear, bits=bits, group_size=group_size, backend="torch")
    cached = QuantLinear.from_linear(
        linear, bits=bits, group_size=group_size, backend="torch", cache_dequantized=True
    )
    bf16, f32 = torch.bfloat16, torch.float32
    methods = {
        "bf16_matmul": (bf16, lambda x: torch.matmul(x, w_bf16.t())),
        "kdsl_dequant_matmul": (f32, fresh),
        "kdsl_cached_dequant": (f32, cached),
        "kdsl_quantlinear_bf16": (bf16, fresh),
        "torch_int8pack_mm_bf16": (bf16, _torch_int8_weights(w, bf16)),
        "torch_int4pack_mm_bf16": (bf16, _torch_int4_weights(w, 128, bf16)),
    }
    rows = []
    with torch.inference_mode():
        for m in batches:
            x = torch.randn(m, k)
            ref = x @ w.t()
            base = median_time(lambda: torch.matmul(x, w.t()), repeats)[0]
            row = {"batch": m, "fp32_matmul_s": base}
            for name, (dtype, fn) in methods.items():
                if fn is None:
                    row[name] = None
                    continue
                xd = x.to(dtype)
                t = median_time(lambda: fn(xd), repeats)[0]
                row[name] = {
                    "seconds": t,
                    "ratio_to_fp32": t / base,
                    "activations": str(dtype).split(".")[-1],
                    "sqnr_db": round(sqnr_db(ref, fn(xd).float()), 2),
                }
            rows.append(row)
    return {
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "n": n,
        "k": k,
        "bits": bits,
        "group_size": group_size,
        "rows": rows,
        "weight_bytes": {"fp32": w.numel() * 4, "kdsl": fresh.weight_q.nbytes},
    }


def run_gpu(n: int, k: int, batches, tune: bool) -> dict:
    """W4A16 (g128) Triton kernel vs fp16 cuBLAS; `tune` tries a sample of feasible configs per batch."""
    import random

    import triton.testing

    from autotune.devices import local_device
    from codegen.kernels.quant_gemm import QUANT_GEMM_SPACE, default_config
    from runtime.ops.quant import quant_matmul
    from dsl.quantize import quantize_rtn, sqnr_db

    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
    q = quantize_rtn(w.float(), 4, 128).to("cuda", scale_dtype=torch.float16)
    w_deq = q.dequantize(torch.float16).contiguous()
    device = local_device()
    rows = []
    for m in batches:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        shape = {"M": m, "N": n, "K": k, "group_size": 128, "bits": 4, "elem_bytes": 2}
        base = triton.testing.do_bench(lambda: torch.matmul(x, w_deq.t()), warmup=25, rep=100) * 1e-3
        candidates = [default_config("quant_gemm", shape, device)]
        if tune:
            pool = list(QUANT_GEMM_SPACE.enumerate(shape, device))
            random.Random(m).shuffle(pool)
            candidates += pool[:40]
        best_cfg, best = None, float("inf")
        for cfg in candidates:
            try:
                t = triton.testing.do_bench(lambda: quant_matmul(x, q, config=cfg), warmup=10, rep=50) * 1e-3
            except Exception as exc:  # a config that fails to compile is skipped, not fatal
                print(f"  batch {m}: config {cfg} failed: {exc}", file=sys.stderr)
                continue
            if t < best:
                best_cfg, best = cfg, t
        y = quant_matmul(x, q, config=best_cfg)
        rows.append(
            {
                "batch": m,
                "fp16_cublas_s": base,
                "w4a16_s": best,
                "speedup": base / best,
                "config": best_cfg,
                "sqnr_db_vs_fp16_dequant": round(sqnr_db(x.float() @ w_deq.float().t(), y.float()), 2),
            }
        )
    return {"device": torch.cuda.get_device_name(), "n": n, "k": k, "rows": rows}


def _print_cpu(res: dict) -> None:
    print(
        f"CPU, W [N={res['n']}, K={res['k']}], kdsl {res['bits']}-bit g{res['group_size']}, "
        f"{res['threads']} threads: time / fp32 matmul time (< 1 = faster), SQNR vs fp32 in dB"
    )
    short = {
        "bf16_matmul": "bf16 mm",
        "kdsl_dequant_matmul": "kdsl deq+mm",
        "kdsl_cached_dequant": "kdsl cached",
        "kdsl_quantlinear_bf16": "kdsl QL bf16",
        "torch_int8pack_mm_bf16": "torch int8 bf16",
        "torch_int4pack_mm_bf16": "torch int4 bf16",
    }
    print(f"{'batch':>5} {'fp32 ms':>8} " + " ".join(f"{short[n]:>17}" for n in CPU_METHODS))
    for row in res["rows"]:
        cells = [
            f"{row[n]['ratio_to_fp32']:>9.2f} ({row[n]['sqnr_db']:>3.0f}dB)" if row[n] else f"{'n/a':>17}"
            for n in CPU_METHODS
        ]
        print(f"{row['batch']:>5} {row['fp32_matmul_s'] * 1e3:>8.3f} " + " ".join(cells))


def _print_gpu(res: dict) -> None:
    print(f"GPU {res['device']}, W [N={res['n']}, K={res['k']}]: W4A16 g128 vs fp16 cuBLAS")
    print(f"{'batch':>5} {'fp16 us':>9} {'w4a16 us':>9} {'speedup':>8}")
    for row in res["rows"]:
        print(
            f"{row['batch']:>5} {row['fp16_cublas_s'] * 1e6:>9.1f} {row['w4a16_s'] * 1e6:>9.1f} "
            f"{row['speedup']:>8.2f}"
        )


def _batches(text: str):
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"batches must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("batches must be positive integers")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_quant", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2048, help="output features N of the weight (default 2048)")
    p.add_argument("--k", type=int, default=2048, help="input features K of the weight (default 2048)")
    p.add_argument(
        "--batches",
        type=_batches,
        default=DEFAULT_BATCHES,
        help="comma-separated batch sizes M (default 1,2,4,...,128)",
    )
    p.add_argument(
        "--bits", type=int, default=4, choices=(2, 3, 4, 8), help="kdsl weight bits on CPU (default 4)"
    )
    p.add_argument(
        "--group-size", type=int, default=128, help="kdsl group size on CPU, -1 per channel (default 128)"
    )
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement; the median is kept")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--skip-cpu", action="store_true", help="run only the GPU part")
    p.add_argument(
        "--tune", action="store_true", help="GPU: also time a sample of 40 feasible configs per batch"
    )
    p.add_argument(
        "--out",
        default=None,
        help="JSON output path (default benchmarks/results/bench_quant_<cpu|gpu>_<date>.json)",
    )
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"benchmark": "bench_quant"}
    if not args.skip_cpu:
        result["cpu"] = run_cpu(args.n, args.k, args.batches, args.repeats, args.bits, args.group_size)
        _print_cpu(result["cpu"])
    if torch.cuda.is_available():
        result["gpu"] = run_gpu(args.n, args.k, args.batches, args.tune)
        _print_gpu(result["gpu"])
    else:
        print("GPU part skipped: CUDA is not available")
    path = write_results(f"bench_quant_{'gpu' if 'gpu' in result else 'cpu'}", result, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
