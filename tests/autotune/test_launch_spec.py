"""Launches recorded on meta tensors and compiled for sm_90 with Triton's own specialisation: the
static check judges the kernel the runtime would launch (every kernel of it)."""

import pytest
import torch

import dsl
from autotune.devices import get_device
from autotune.launch_spec import LaunchRecordError, TensorArg, record_launches, specialise
from autotune.static_check import check_launches
from dsl import moe
from dsl import shapes as sh
from dsl.attention_prims import attention, paged_attention
from dsl.autodiff import grad

T = dsl.Tensor


def _program_class():
    from codegen.program import TritonProgram

    return TritonProgram


def _launcher(template):
    from codegen.template import get_template

    return get_template(template).launch


def _meta(graph, ref, env):
    t = graph.type_of(ref)
    return torch.empty(tuple(sh.evaluate(d, env) for d in t.shape), dtype=t.dtype.torch, device="meta")


def _kernels(graph, env):
    """(rendered, module, inputs, outputs) of every kernel of ``graph``, operands as meta tensors."""
    program = _program_class()(graph, graph.name)
    for info in program.infos:
        r = program.rendered[info.name]
        yield (r, program.module(info.name), [_meta(graph, ref, env) for ref in r.input_refs],
               [_meta(graph, ref, env) for ref in r.output_refs])


def _record(graph, env, template, config):
    (r, module, ins, outs), *_ = [k for k in _kernels(graph, env) if k[0].template == template]
    return record_launches(_launcher(template), module, r, ins, outs, env, config)


@dsl.op
def mm(x: T["M", "K"], w: T["N", "K"]):
    return x @ w.T


@dsl.op
def ffn(x: T["T", "D"], w13: T["E", "H2", "D"], w2: T["E", "D", "H"], weights: T["T", 2], ids: T["T", 2]):
    return moe.moe_ffn(x, w13, w2, weights, ids)


@dsl.op
def att(q: T["B", "H", "S", "D"], k: T["B", "HK", "SK", "D"], v: T["B", "HK", "SK", "D"]):
    return attention(q, k, v, causal=True)


GEMM_ENV = {"M": 4096, "N": 4096, "K": 4096}
HOPPER_GEMM = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    from autotune import static_check

    monkeypatch.setenv("KDSL_CACHE_DIR", str(tmp_path))
    static_check._CACHE.clear_memory()
    yield
    static_check._CACHE.clear_memory()


def test_gemm_launch_gets_the_launchers_specialisation():
    (spec,) = _record(mm.trace((dsl.f16, dsl.f16)), GEMM_ENV, "gemm", HOPPER_GEMM)
    assert spec.options == {"num_warps": 8, "num_stages": 3}
    assert {k: spec.constexprs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")} == {"BLOCK_M": 128, "BLOCK_N": 128,
                                                                                  "BLOCK_K": 64}
    assert all(a.dtype == "float16" for a in spec.args if isinstance(a, TensorArg))
    s = specialise(spec, 90)
    names = list(s.signature)
    # Pointers of whole tensors and sizes of 4096 are divisible by 16; unit strides become constexprs.
    for name in ("a_ptr", "b_ptr", "out0_ptr", "M", "N", "K"):
        assert s.attrs[(names.index(name),)] == [["tt.divisibility", 16]], name
    unit = [n for n, v in spec.arguments.items() if v == 1 and s.signature[n] == "constexpr"]
    assert unit and all(s.constexprs[(names.index(n),)] == 1 for n in unit)


def test_a_misaligned_view_loses_the_divisibility_hint():
    aligned = specialise(_record(mm.trace((dsl.f16, dsl.f16)), GEMM_ENV, "gemm", HOPPER_GEMM)[0], 90)
    x = torch.empty(4096 * 4096 + 1, dtype=torch.float16, device="meta")[1:].view(4096, 4096)
    spec = dataclass_replace_arg(_record(mm.trace((dsl.f16, dsl.f16)), GEMM_ENV, "gemm", HOPPER_GEMM)[0], 0,
                                 TensorArg.of(x))
    s = specialise(spec, 90)
    assert TensorArg.of(x).misalign == 2
    assert s.attrs[(0,)] == [] and aligned.attrs[(0,)] == [["tt.divisibility", 16]]
    assert s.key() != aligned.key()


def dataclass_replace_arg(spec, index, value):
    import dataclasses

    args = list(spec.args)
    args[index] = value
    return dataclasses.replace(spec, args=tuple(args))


def test_hopper_gemm_tile_compiles_for_sm90_without_spills(fresh_cache):
    specs = _record(mm.trace((dsl.f16, dsl.f16)), GEMM_ENV, "gemm", HOPPER_GEMM)
    (verdict,) = check_launches([specs], get_device("h100"))
    assert verdict.ok, verdict.reason
    assert verdict.spill_bytes == 0 and verdict.registers <= 255
    # Triton allocates num_stages buffers of the A and B tiles (3 x 32 KiB) plus its barriers.
    assert 3 * (128 * 64 + 64 * 128) * 2 <= verdict.shared_bytes <= get_device("h100").smem_per_block
    (again,) = check_launches([specs], get_device("h200"))
    assert again.cached and again.registers == verdict.registers


def test_moe_grouped_gemm_records_on_meta_tensors_and_is_judged(fresh_cache):
    env = {"T": 512, "D": 1024, "E": 8, "H2": 2048, "H": 1024}
    config = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
    graph = ffn.trace((dsl.f16, dsl.f16, dsl.f16, dsl.f32, dsl.i32))
    launches = [record_launches(_launcher(r.template), module, r, ins, outs, env, config)
                for r, module, ins, outs in _kernels(graph, env)]
    assert len(launches) == 2 and all(launches)
    # The second GEMM also launches its fixed-order combine kernel.
    assert len(launches[1]) == 2 and launches[1][1].name.endswith("_combine")
    (verdict,) = check_launches([launches[0]], get_device("h100"))
    assert verdict.ok, verdict.reason
    assert verdict.registers is not None and verdict.spill_bytes == 0


def test_attention_backward_records_each_kernel():
    env = {"B": 1, "H": 32, "HK": 8, "S": 4096, "SK": 4096, "D": 128}
    config = {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    specs = _record(grad(att.trace((dsl.f16,) * 3)), env, "attention_bwd", config)
    names = [s.name.rsplit("_", 1)[-1] for s in specs]
    assert names == ["delta", "dkdv", "dq"]
    dkdv, dq = specs[1], specs[2]
    # The dQ kernel takes the tile swapped; both get the stages, the delta kernel does not pipeline.
    assert (dkdv.constexprs["BLOCK_M"], dkdv.constexprs["BLOCK_N"]) == (32, 64)
    assert (dq.constexprs["BLOCK_M"], dq.constexprs["BLOCK_N"]) == (64, 32)
    assert dkdv.options["num_stages"] == dq.options["num_stages"] == 2
    assert all(specialise(s, 90).signature for s in specs)


@dsl.op
def paged(q: T["B", "H", "D"], kc: T["NB", "P", "HK", "D"], vc: T["NB", "P", "HK", "D"],
          table: T["B", "M", dsl.i32], lens: T["B", dsl.i32]):
    return paged_attention(q, kc, vc, table, lens)


def test_paged_attention_with_split_k_records_its_reduce_kernel():
    env = {"B": 16, "H": 32, "D": 128, "NB": 4096, "P": 16, "HK": 8, "M": 256}
    config = {"BLOCK_N": 64, "NUM_SPLITS": 4, "num_warps": 4, "num_stages": 2}
    split, reduce = _record(paged.trace((dsl.f16, dsl.f16, dsl.f16, dsl.i32, dsl.i32)), env, "attention_paged",
                            config)
    assert split.name.endswith("_split") and reduce.name.endswith("_reduce")
    assert split.constexprs["NUM_SPLITS"] == reduce.constexprs["NUM_SPLITS"] == 4
    assert "num_stages" not in reduce.options


def test_a_multi_kernel_launch_fails_when_one_kernel_fails(fresh_cache):
    env = {"B": 1, "H": 32, "HK": 8, "S": 4096, "SK": 4096, "D": 128}
    config = {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2}  # dK/dV and dQ spill
    specs = _record(grad(att.trace((dsl.f16,) * 3)), env, "attention_bwd", config)
    (verdict,) = check_launches([specs], get_device("h100"))
    assert not verdict.ok and len(verdict.kernels) == 3
    failing = [name for name, v in verdict.kernels if not v.ok]
    assert failing and verdict.reason.startswith(failing[0])
    assert [name for name, v in verdict.kernels if v.ok] == [specs[0].name]


def test_a_launch_that_fails_on_meta_tensors_is_one_clear_error():
    def broken(module, rendered, ins, outs, env, config):
        raise ValueError("bad stride\nsecond line")

    (r, module, ins, outs), = list(_kernels(mm.trace((dsl.f16, dsl.f16)), GEMM_ENV))
    with pytest.raises(LaunchRecordError, match="ValueError: bad stride$"):
        record_launches(broken, module, r, ins, outs, GEMM_ENV, HOPPER_GEMM)
    with pytest.raises(LaunchRecordError, match="no @triton.jit function 'nope'"):
        record_launches(_launcher("gemm"), module, r, ins, outs, GEMM_ENV, HOPPER_GEMM, kernel_names=["nope"])
    # The module is left as it was.
    from triton.runtime.jit import KernelInterface

    assert isinstance(getattr(module, r.name), KernelInterface)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float16, torch.float32, torch.int64])
def test_tensor_arguments_keep_dtype_and_alignment_across_processes(dtype):
    base = torch.empty(64, dtype=dtype, device="meta")
    for offset in range(4):
        arg = TensorArg.of(base[offset:])
        revived = arg.to_meta()
        assert revived.dtype == dtype and revived.is_meta
        assert revived.data_ptr() % 16 == base[offset:].data_ptr() % 16 == arg.misalign
