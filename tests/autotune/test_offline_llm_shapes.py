"""`kdsl tune NAME --shape ... --target h100 --offline` for every kernel family at LLM shapes: tasks
built on meta tensors (no data, no reference run), each template's cost function ranks the space,
the launch of the chosen config is recorded on meta tensors, and records are written as predicted.
The sm_90 static compile runs here for the GEMM (its compile is the cheapest representative);
tests/autotune/test_launch_spec.py compiles the others."""

from __future__ import annotations

import pytest

from autotune import tuner
from autotune.db import TuningDB
from autotune.devices import get_device
from codegen.template import templates
from runtime.ops.tunables import TUNABLES

H100 = get_device("h100")

# Decode (1-16 tokens) and prefill shapes of Mixtral-8x7B, Qwen3-30B-A3B, attention at D=128 GQA 32/8.
FAMILIES = [
    ("linear", "M=4096,N=14336,K=4096"), ("linear", "M=16,N=4096,K=4096"),
    ("moe", "T=4096,D=4096,E=8,H2=28672,H=14336"), ("moe", "T=1,D=4096,E=8,H2=28672,H=14336"),
    ("moe_qwen3", "T=4096,D=2048,E=128,H2=1536,H=768"), ("moe_backward", "T=4096,D=2048,E=128,H2=1536,H=768"),
    ("attention", "B=1,H=32,HKV=8,S=4096,SK=4096,D=128"), ("attention_backward", "B=1,H=32,HKV=8,S=4096,SK=4096,D=128"),
    ("paged_attention", "B=16,H=32,HKV=8,D=128,NB=1024,P=16,MB=256"), ("rotary", "T=4096,H=32,D=128"),
    ("rmsnorm", "M=4096,D=4096"), ("softmax", "M=16,N=32000"), ("combine", "T=4096,K=8,N=2048"),
]
QUANT = [("quant_gemm", "M=16,N=14336,K=4096", {"bits": 4, "group_size": 128}),
         ("quant_gemm", "M=1,N=4096,K=4096", {"bits": 2, "group_size": 64}),
         ("int8_gemm", "M=16,N=4096,K=4096", {}), ("fp8_gemm", "M=4096,N=4096,K=4096", {}),
         ("quant_moe_gemm", "M=16,N=768,K=2048,E=128,topk=8", {"mode": "gate_up"}),
         ("quant_moe_gemm", "M=16,N=2048,K=768,E=128,topk=8", {"mode": "down"})]


def _shape(text):
    return {k: int(v) for k, v in (p.split("=") for p in text.split(","))}


def _no_compile(task, target):
    # Constraints and the recorded launch only; the compile itself is covered below and elsewhere.
    def feasible(config):
        bad = task.space.violations(config, task.problem, target)
        if bad:
            return f"violates {', '.join(bad)}"
        tuner.launch_spec(task, config)  # the launch records on meta tensors for this config
        return None
    return feasible


def _predict_all(tasks, db, static):
    results = []
    for task in tasks:
        if static:
            results.append(tuner.predict_task(task, target=H100, db=db, candidates=2, batch=2))
        else:
            results.append(tuner.predict_task(task, target=H100, db=db, candidates=4, feasible=_no_compile(task, H100)))
    return results


@pytest.fixture
def db(tmp_path):
    with TuningDB(f"sqlite:///{tmp_path / 'offline.sqlite'}") as handle:
        yield handle


def test_every_family_writes_predicted_records_at_llm_shapes(db):
    seen = set()
    for name, shape in FAMILIES:
        t = TUNABLES[name]
        source = tuner.TaskSource.of(t.spec, _shape(shape), "f16", attrs=dict(t.attrs), backward=t.backward)
        for result in _predict_all(source.build("meta"), db, static=False):
            assert result.best_config is not None, (name, result.template, result.failures[:3])
            assert result.source == "predicted" and result.best_ms > 0
            seen.add(result.template)
    for template, shape, options in QUANT:
        (task,) = tuner.build_template_tasks(template, _shape(shape), options, device="meta")
        (result,) = _predict_all([task], db, static=False)
        assert result.best_config is not None, (template, result.failures[:3])
        seen.add(template)
    assert seen == set(templates())
    stored = db.query()
    assert stored and {r.source for r in stored} == {"predicted"} and {r.template for r in stored} == seen


def test_gemm_offline_runs_the_sm90_static_check(db):
    source = tuner.TaskSource.of("runtime.ops.dense:linear_op", _shape("M=4096,N=4096,K=4096"), "f16")
    (result,) = _predict_all(source.build("meta"), db, static=True)
    assert result.best_config is not None, result.failures
    # The cost model's first pick for a big fp16 GEMM is a Hopper-class tile, and it compiles cleanly.
    assert result.best_config["BLOCK_M"] * result.best_config["BLOCK_N"] >= 128 * 128, result
