"""Attention benchmark: kdsl's attention op against PyTorch's scaled_dot_product_attention.

CPU (always): kdsl's torch backend (``runtime.ops.attention(..., backend="torch")``) against
``torch.nn.functional.scaled_dot_product_attention`` in the same run, forward and backward, fp32.
GPU (only when CUDA is available): kdsl's generated Triton flash-attention kernels against SDPA
restricted to its flash backend, forward and backward, in TFLOP/s (bf16 by default).

FLOPs: forward 4 * B * H * D * (visible query-key pairs), backward 2.5x the forward (five
matmuls against two), the convention of flash-attention's benchmarks. Backward time is measured as
(forward + backward) - forward for both methods alike. Prints a table with time ratios
(kdsl / SDPA; < 1 means kdsl is faster) and writes JSON under benchmarks/results/.

Usage: ``kdsl bench attention [--shapes B,H,HKV,S,D,causal;...] [--dtype bf16] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import median_time, write_results  # noqa: E402

CPU_SHAPES = "1,8,8,512,64,1;1,8,2,1024,64,1;2,16,16,256,128,0;1,8,8,1024,64,0"
GPU_SHAPES = ("4,16,16,2048,128,1;4,16,16,2048,128,0;2,32,8,4096,128,1;8,16,16,1024,64,1;"
              "1,16,16,8192,128,1;4,32,32,2048,80,1")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_shapes(text: str):
    shapes = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        parts = [int(p) for p in item.split(",")]
        if len(parts) != 6:
            raise SystemExit(f"bad shape {item!r}: expected B,H,HKV,S,D,causal")
        b, h, h_kv, s, d, causal = parts
        if h % h_kv:
            raise SystemExit(f"bad shape {item!r}: H must be a multiple of HKV")
        shapes.append((b, h, h_kv, s, d, bool(causal)))
    return shapes


def attention_flops(b, h, s_q, s_k, d, causal) -> float:
    if causal:   # bottom-right: query i sees min(s_k, i + s_k - s_q + 1) keys
        pairs = sum(min(s_k, max(0, i + s_k - s_q + 1)) for i in range(s_q))
    else:
        pairs = s_q * s_k
    return 4.0 * b * h * d * pairs


def _sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])


def _measure(fn, inputs, dout, repeats):
    """(forward seconds, backward seconds) by median timing."""
    fwd, _ = median_time(lambda: fn(*inputs), repeats=repeats, warmup=2)
    leaves = [t.detach().requires_grad_() for t in inputs]

    def step():
        out = fn(*leaves)
        out.backward(dout)
        for t in leaves:
            t.grad = None

    both, _ = median_time(step, repeats=repeats, warmup=2)
    return fwd, max(both - fwd, 1e-9)


def run_shape(shape, dtype, device, repeats, kdsl_backend):
    from runtime.ops.attention_ops import attention

    b, h, h_kv, s, d, causal = shape
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda *dims: torch.randn(*dims, generator=g, device=device).to(dtype)  # noqa: E731
    q, k, v, dout = mk(b, h, s, d), mk(b, h_kv, s, d), mk(b, h_kv, s, d), mk(b, h, s, d)
    flops = attention_flops(b, h, s, s, d, causal)

    def kdsl_fn(q, k, v):
        return attention(q, k, v, causal=causal, backend=kdsl_backend)

    def sdpa_fn(q, k, v):
        if device == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return _sdpa(q, k, v, causal)
        return _sdpa(q, k, v, causal)

    # Both must agree before their times mean anything.
    with torch.no_grad():
        err = (kdsl_fn(q, k, v).float() - sdpa_fn(q, k, v).float()).abs().max().item()
    rows = []
    times = {name: _measure(fn, (q, k, v), dout, repeats)
             for name, fn in (("kdsl", kdsl_fn), ("sdpa", sdpa_fn))}
    for i, pass_name in enumerate(("forward", "backward")):
        work = flops if pass_name == "forward" else 2.5 * flops
        kd, sd = times["kdsl"][i], times["sdpa"][i]
        rows.append({"B": b, "H": h, "H_kv": h_kv, "S": s, "D": d, "causal": causal, "pass": pass_name,
                     "kdsl_ms": kd * 1e3, "sdpa_ms": sd * 1e3, "kdsl_tflops": work / kd / 1e12,
                     "sdpa_tflops": work / sd / 1e12, "time_ratio": kd / sd, "max_abs_diff": err})
    return rows


def print_table(title, rows, unit="TFLOP/s"):
    scale = {"TFLOP/s": 1.0, "GFLOP/s": 1e3}[unit]
    short = unit.split("/")[0][0] + "F/s"
    print(f"\n{title}")
    head = f"{'B':>3} {'H':>3} {'Hkv':>4} {'S':>6} {'D':>4} {'causal':>6} {'pass':>8} " \
           f"{'kdsl ms':>9} {'SDPA ms':>9} {'kdsl ' + short:>10} {'SDPA ' + short:>10} {'kdsl/SDPA':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['B']:>3} {r['H']:>3} {r['H_kv']:>4} {r['S']:>6} {r['D']:>4} {str(r['causal']):>6} "
              f"{r['pass']:>8} {r['kdsl_ms']:>9.3f} {r['sdpa_ms']:>9.3f} {r['kdsl_tflops'] * scale:>10.2f} "
              f"{r['sdpa_tflops'] * scale:>10.2f} {r['time_ratio']:>9.2f}")
    print("(kdsl/SDPA: time ratio, < 1 means kdsl is faster)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kdsl bench attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-shapes", default=CPU_SHAPES,
                        help="CPU shapes 'B,H,HKV,S,D,causal;...' (default: %(default)s)")
    parser.add_argument("--gpu-shapes", default=GPU_SHAPES,
                        help="GPU shapes 'B,H,HKV,S,D,causal;...' (default: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="GPU dtype (default bf16)")
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions per measurement")
    parser.add_argument("--skip-cpu", action="store_true", help="only run the GPU part")
    parser.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/...)")
    args = parser.parse_args(argv)

    payload = {"benchmark": "attention", "cpu": [], "gpu": []}
    if not args.skip_cpu:
        for shape in parse_shapes(args.cpu_shapes):
            payload["cpu"].extend(run_shape(shape, torch.float32, "cpu", args.repeats, "torch"))
        print_table("CPU, fp32: kdsl torch backend vs torch.nn.functional.scaled_dot_product_attention",
                    payload["cpu"], unit="GFLOP/s")
    if torch.cuda.is_available():
        dtype = DTYPES[args.dtype]
        for shape in parse_shapes(args.gpu_shapes):
            payload["gpu"].extend(run_shape(shape, dtype, "cuda", args.repeats, "triton"))
        print_table(f"GPU ({torch.cuda.get_device_name()}), {args.dtype}: kdsl Triton kernels vs SDPA flash "
                    "backend", payload["gpu"])
    else:
        print("\nno CUDA device: GPU comparison skipped")
    path = write_results("attention", payload, args.out)
    print(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
