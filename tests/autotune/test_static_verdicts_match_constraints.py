"""The spaces' constraints and the sm_90 compile of the launch the runtime makes agree on the configs
that matter: the Triton tutorial's Hopper attention tile and a 128x128x64 GEMM are accepted, a
5-stage 128x128x64 MoE gate/up GEMM is refused for shared memory, and the template defaults pass.
Every compile is of a launch recorded on meta tensors at LLM shapes (fp16)."""

from __future__ import annotations

import pytest

from autotune import tuner
from autotune.devices import get_device

H100 = get_device("h100")


def _tasks(spec, shape):
    return tuner.TaskSource.of(spec, shape, "f16").build("meta")


@pytest.fixture(scope="module")
def gemm():
    (task,) = _tasks("runtime.ops.dense:linear_op", {"M": 4096, "N": 4096, "K": 4096})
    return task


@pytest.fixture(scope="module")
def moe_gate_up():
    tasks = _tasks("runtime.ops.moe_ops:moe_op", {"T": 4096, "D": 4096, "E": 8, "H2": 28672, "H": 14336})
    return next(t for t in tasks if t.template == "moe_gemm" and t.problem.get("w_tiles") == 2)


@pytest.fixture(scope="module")
def attention():
    (task,) = _tasks("runtime.ops.attention_ops:attention_op",
                     {"B": 1, "H": 32, "HKV": 8, "S": 4096, "SK": 4096, "D": 128})
    return task


def _cfg(**kw):
    return dict(kw)


CASES = [
    ("gemm", _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3), True),
    ("attention", _cfg(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2), True),
    ("moe_gate_up", _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=5), False),
]


@pytest.mark.parametrize("name,config,ok", CASES, ids=[c[0] for c in CASES])
def test_constraints_agree_with_the_compile(name, config, ok, request):
    task = request.getfixturevalue(name)
    constraints_ok = not task.space.violations(config, task.problem, H100)
    assert constraints_ok == ok, task.space.violations(config, task.problem, H100)
    (verdict,) = tuner.static_verdicts(task, [config], H100)
    assert verdict.ok == ok, verdict.reason
    if not ok:
        assert "shared memory" in verdict.reason
    else:
        assert verdict.spill_bytes == 0


@pytest.mark.parametrize("name", ["gemm", "attention", "moe_gate_up"])
def test_defaults_pass_both(name, request):
    task = request.getfixturevalue(name)
    config = task.default_config(H100)
    assert not task.space.violations(config, task.problem, H100)
    (verdict,) = tuner.static_verdicts(task, [config], H100)
    assert verdict.ok and verdict.spill_bytes == 0, verdict.reason
