"""Templates tuned without a DSL op: the quantized GEMMs, whose weights are not yet a graph type.

Each entry says which ``--shape`` sizes the template takes, its other options (each a flag of
``kdsl tune`` of the same name) and how to build its tasks: random weights quantized the way the
runtime's are (``dsl.quantize``), the reference outputs, and the kernel variant to launch.
"""

from __future__ import annotations

import torch

from codegen.kernels import quant_gemm as K
from codegen.kernels.common import Rendered
from dsl import quantize as Q
from dsl.errors import TuningError

from .tuner import KernelTask, TemplateTasks


def _dtype_option(value, choices: dict, template: str, what: str) -> str:
    if value not in choices:
        raise TuningError(f"{template}: --dtype {value} is not a supported {what} dtype "
                          f"(choose from {', '.join(choices)})")
    return value

def _task(kernel: K.KernelVariant, m: int, n: int, k: int, inputs: list, expected: torch.Tensor, tolerance=None):
    problem = kernel.problem(m, n, k)
    return KernelTask(kernel.template, kernel.name, kernel.template, kernel.key_hash, problem, kernel.module,
                      kernel.rendered, inputs, [expected], {"M": m, "N": n, "K": k},
                      default=lambda device: K.default_config(kernel.template, problem, device), tolerance=tolerance)

def _quant_gemm_tasks(shape: dict, options: dict, device, seed: int) -> list:
    m, n, k = shape["M"], shape["N"], shape["K"]
    bits, group_size, asym = options["bits"], options["group_size"], options["asym"]
    act = _dtype_option(options["dtype"], K._ACT_DTYPES, "quant_gemm", "activation")
    Q.check_format(bits, group_size, (n, k))
    g = torch.Generator().manual_seed(seed)
    qweight = Q.quantize_rtn(torch.randn(n, k, generator=g), bits, group_size, not asym).to(device)
    x = torch.randn(m, k, generator=g).to(K._ACT_DTYPES[act]).to(device)
    kernel = K.quant_kernel(bits, group_size, not asym, False, act)
    inputs = [x, qweight.data, qweight.scales] + ([qweight.zeros] if asym else [])
    # TF32 keeps 10 mantissa bits, as float16 does: the gate takes the half-precision tolerance.
    return [_task(kernel, m, n, k, inputs, Q.quant_matmul_reference(x, qweight), 2e-2 if act == "tf32" else None)]

def _scaled_gemm_tasks(template: str):
    def build(shape: dict, options: dict, device, seed: int) -> list:
        m, n, k = shape["M"], shape["N"], shape["K"]
        out = _dtype_option(options["dtype"], K._DTYPES, template, "output")
        g = torch.Generator().manual_seed(seed)
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
        # Per-token and per-channel scales: what int8_linear and row-wise fp8 produce.
        if template == "int8_gemm":
            (a, sa), (b, sb) = Q.quantize_int8_per_token(x), Q.quantize_int8_per_channel(w)
            expected = Q.int8_matmul_reference(a, sa, b, sb, None, K._DTYPES[out])
        else:
            (a, sa), (b, sb) = Q.quantize_fp8(x, "row"), Q.quantize_fp8(w, "row")
            expected = Q.fp8_matmul_reference(a, sa, b, sb, None, K._DTYPES[out])
        kernel = K.scaled_kernel(template, True, True, False, out)
        return [_task(kernel, m, n, k, [t.to(device) for t in (a, b, sa, sb)], expected.to(device))]

    return build


TEMPLATE_TASKS: dict[str, TemplateTasks] = {spec.template: spec for spec in (
    TemplateTasks("quant_gemm", ("M", "N", "K"), {"bits": 4, "group_size": 128, "asym": False, "dtype": "f16"},
                  _quant_gemm_tasks),
    TemplateTasks("int8_gemm", ("M", "N", "K"), {"dtype": "f32"}, _scaled_gemm_tasks("int8_gemm")),
    TemplateTasks("fp8_gemm", ("M", "N", "K"), {"dtype": "f32"}, _scaled_gemm_tasks("fp8_gemm")),
)}


def _quant_moe_tasks(shape: dict, options: dict, device, seed: int) -> list:
    """One grouped GEMM of a quantized SwiGLU MoE (``mode`` gate_up or down) at M tokens routed
    top-k over E experts; gate_up maps K=D to N=H (gate and up halves), down maps K=H to N=D."""
    from codegen.kernels import quant_moe as QM
    from codegen.render import source_hash

    m, n, k, e, topk = (shape[d] for d in ("M", "N", "K", "E", "topk"))
    mode, bits, group_size, asym = options["mode"], options["bits"], options["group_size"], options["asym"]
    if mode not in QM.MODES:
        raise TuningError(f"quant_moe_gemm: --mode must be one of {', '.join(QM.MODES)}, got {mode!r}")
    act = _dtype_option(options["dtype"], K._DTYPES, "quant_moe_gemm", "activation")
    dtype = K._DTYPES[act]
    rows = 2 * n if mode == "gate_up" else n
    Q.check_format(bits, group_size, (rows, k))
    if topk > e:
        raise TuningError(f"quant_moe_gemm: topk={topk} exceeds E={e}")
    g = torch.Generator().manual_seed(seed)
    stacked = QM.StackedQTensor.stack([Q.quantize_rtn(torch.randn(rows, k, generator=g) / 4, bits, group_size,
                                                      not asym) for _ in range(e)])
    ids = torch.stack([torch.randperm(e, generator=g)[:topk] for _ in range(m)]).to(torch.int32)
    weights = torch.softmax(torch.randn(m, topk, generator=g), dim=-1)
    w = stacked.dequantize_kn(torch.float32).to(dtype).to(torch.float32)       # [E, K, rows]
    if mode == "gate_up":
        x = (torch.randn(m, k, generator=g) / 4).to(dtype)
        gu = torch.einsum("tk,tjkn->tjn", x.float(), w[ids.long()])
        expected = (torch.nn.functional.silu(gu[..., :n]) * gu[..., n:]).to(dtype).reshape(m * topk, n)
    else:
        x = (torch.randn(m * topk, k, generator=g) / 4).to(dtype)
        per_slot = torch.einsum("tjk,tjkn->tjn", x.float().reshape(m, topk, k), w[ids.long()])
        expected = (per_slot * weights.unsqueeze(-1)).sum(dim=1).to(dtype)
    source = QM.quant_moe_source(mode, bits, group_size, not asym, dtype == torch.float32)
    module = QM.module_for(mode, stacked, dtype)
    name = module.KERNEL.fn.__name__ if hasattr(module.KERNEL, "fn") else module.KERNEL.__name__
    rendered = Rendered(name, "quant_moe_gemm", source, [], [],
                          {"mode": mode, "bits": bits, "group_size": group_size, "symmetric": not asym,
                           "elem_bytes": x.element_size()})
    env = {"M": m, "N": n, "K": k, "E": e, "topk": topk}
    inputs = [x, stacked.data, stacked.scales, stacked.zeros if asym else stacked.scales, ids, weights]
    problem = QM.problem_quant_moe(rendered, env)
    return [KernelTask("quant_moe_gemm", name, "quant_moe_gemm", source_hash(source), problem, module, rendered,
                       [t.to(device) for t in inputs], [expected.to(device)], env,
                       default=lambda dev: QM.default_config(dict(problem, M=m), dev))]


TEMPLATE_TASKS["quant_moe_gemm"] = TemplateTasks(
    "quant_moe_gemm", ("M", "N", "K", "E", "topk"),
    {"mode": "gate_up", "bits": 4, "group_size": 128, "asym": True, "dtype": "f16"}, _quant_moe_tasks)
