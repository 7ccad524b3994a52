"""Every kernel template is one complete object: sources, space, launch, problem, token dim, cost
function, and a way to tune it (a built-in op that produces it, or a template task)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from autotune.cost_model import predict
from autotune.devices import get_device
from autotune.template_tasks import TEMPLATE_TASKS
from autotune.tuner import TaskSource
from codegen.render import TEMPLATE_DIR
from codegen.template import KernelTemplate, templates
from codegen.work import TiledWork
from runtime.ops.tunables import TUNABLES

H100 = get_device("h100")
ALL = sorted(templates())

# Small shapes of each built-in tunable: enough to produce every kernel, cheap on meta tensors.
SMALL = {"linear": "M=64,N=48,K=32", "moe": "T=16,D=32,E=4,H2=64,H=32", "moe_qwen3": "T=16,D=32,E=8,H2=32,H=16",
         "moe_backward": "T=16,D=32,E=8,H2=32,H=16", "rmsnorm": "M=8,D=64", "softmax": "M=8,N=100",
         "attention": "B=1,H=4,HKV=2,S=64,SK=64,D=32", "attention_backward": "B=1,H=4,HKV=2,S=64,SK=64,D=32",
         "paged_attention": "B=2,H=4,HKV=2,D=32,NB=8,P=16,MB=4", "rotary": "T=8,H=4,D=32",
         "combine": "T=8,K=2,N=32"}


def _shape(text: str) -> dict:
    return {k: int(v) for k, v in (p.split("=") for p in text.split(","))}


@pytest.fixture(scope="module")
def tasks_by_template():
    found: dict[str, list] = {}
    for name, t in TUNABLES.items():
        source = TaskSource.of(t.spec, _shape(SMALL[name]), "f16", attrs=dict(t.attrs), backward=t.backward)
        for task in source.build("meta"):
            found.setdefault(task.template, []).append(task)
    return found


def test_fifteen_families_are_registered():
    assert len(ALL) == 15 and {"gemm", "moe_gemm", "attention_fwd", "quant_moe_gemm"} <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_template_has_every_piece(name):
    t = templates()[name]
    assert isinstance(t, KernelTemplate) and t.name == name == t.space.template
    for field in dataclasses.fields(KernelTemplate):
        if field.name in ("render", "anchors", "default", "jit_functions", "doc"):
            continue  # optional by design (library-launched templates render no IR group)
        assert getattr(t, field.name) not in (None, "", ()), f"{name} lacks {field.name}"
    assert callable(t.launch) and callable(t.problem) and callable(t.work)
    for source in t.sources:
        assert (TEMPLATE_DIR / source).is_file(), f"{name}: missing template source {source}"
    t.space.validate(t.space.default, where=name)
    assert not t.anchors or t.render is not None, f"{name}: anchors IR ops but cannot render them"


@pytest.mark.parametrize("name", ALL)
def test_template_is_tunable_and_has_a_cost_model(name, tasks_by_template):
    if name in TEMPLATE_TASKS:
        spec = TEMPLATE_TASKS[name]
        assert spec.template == name
        return
    tasks = tasks_by_template.get(name)
    assert tasks, f"no built-in tunable (runtime.ops.tunables) produces a {name} kernel"
    t = templates()[name]
    for task in tasks:
        assert t.token_dim in task.problem, f"{name}: token dim {t.token_dim} not in {task.problem}"
        from autotune.tuner import cost_problem

        problem = cost_problem(task)
        config = task.default_config(H100)
        work = t.work(problem, config, H100)
        assert isinstance(work, TiledWork) and work.programs >= 1
        assert math.isfinite(predict(name, problem, config, H100))


def test_a_template_without_a_cost_function_cannot_be_declared():
    gemm = templates()["gemm"]
    with pytest.raises(TypeError):
        KernelTemplate(name="x", sources=(), space=dataclasses.replace(gemm.space, template="x"),
                       launch=gemm.launch, problem=gemm.problem)  # no work=
