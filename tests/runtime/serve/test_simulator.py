import json

import numpy as np
import pytest

from autotune.devices import get_device
from dsl.errors import ServingError
from runtime.cli import main as kdsl_main
from runtime.serve.request import SLO, Request, RequestState, SamplingParams
from runtime.serve.scheduler import PrefillChunk, StepPlan
from runtime.serve.simulator import (
    CostParams,
    StepTimeModel,
    get_model_config,
    kv_capacity_tokens,
    simulate,
    sweep,
    write_sweep,
)
from runtime.serve.traces import Trace, TraceRequest

H100 = get_device("h100")


def test_presets_match_published_sizes():
    mixtral = get_model_config("mixtral-8x7b")
    assert mixtral.total_params / 1e9 == pytest.approx(46.7, abs=0.1)
    assert mixtral.active_params_per_token / 1e9 == pytest.approx(12.9, abs=0.3)
    assert mixtral.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    assert get_model_config("qwen-moe").total_params / 1e9 == pytest.approx(14.3, abs=0.1)
    assert get_model_config("qwen3-30b-a3b").total_params / 1e9 == pytest.approx(30.5, abs=0.1)
    with pytest.raises(ServingError, match="unknown model 'gpt5'"):
        get_model_config("gpt5")


def test_kv_capacity_is_memory_minus_weights():
    m = get_model_config("mixtral-8x7b")
    cost = CostParams()
    want = (80 * 2**30 * 0.9 - m.total_params * 1.0 - 2 * 2**30) / (128 * 1024)
    assert kv_capacity_tokens(m, H100) == int(want)
    with pytest.raises(ServingError, match="no room for a KV cache"):
        kv_capacity_tokens(get_model_config("mixtral-8x7b-bf16"), H100, cost)
    assert kv_capacity_tokens(get_model_config("mixtral-8x7b-bf16"), get_device("h200")) > 0


def running(rid, prompt, generated):
    r = Request(rid, np.arange(prompt), SamplingParams(max_tokens=4096))
    r.transition(RequestState.RUNNING, 0.0)
    r.output_token_ids = [1] * generated
    r.num_computed_tokens = r.num_tokens - 1
    return r


def test_step_time_model_behaves_like_a_roofline():
    tm = StepTimeModel(get_model_config("mixtral-8x7b"), H100)
    one = tm.step_cost(StepPlan(decodes=[running("a", 100, 1)]))
    # a batch-1 decode reads the weights it uses once (attention + 2 of 8 experts + LM head, FP8)
    # at 80% of 3.35 TB/s, plus the 2 ms step overhead
    active = get_model_config("mixtral-8x7b").active_params_per_token
    assert one.seconds == pytest.approx(active / (3.35e12 * 0.8) + 0.002, rel=0.02)
    many = tm.step_cost(StepPlan(decodes=[running(f"r{i}", 1000, 5) for i in range(64)]))
    assert many.seconds > one.seconds and many.bytes > 46e9        # all experts active, plus KV reads
    long_ctx = tm.step_cost(StepPlan(decodes=[running(f"r{i}", 8000, 5) for i in range(64)]))
    assert long_ctx.seconds > many.seconds
    # a 2048-token prefill is compute bound: 2 * 2048 * active params at FP8 peak * efficiency
    p = Request("p", np.arange(2048))
    big = tm.step_cost(StepPlan(prefills=[PrefillChunk(p, 0, 2048)]))
    assert big.seconds == pytest.approx(2 * 2048 * 12.7e9 / (1979e12 * 0.5), rel=0.25)


def test_layered_prefill_group_costs_a_share_of_the_layers():
    tm = StepTimeModel(get_model_config("mixtral-8x7b"), H100)
    p = Request("p", np.arange(4000))
    full = tm.step_cost(StepPlan(prefills=[PrefillChunk(p, 0, 4000)]))
    group = tm.step_cost(StepPlan(prefills=[PrefillChunk(p, 0, 4000, layer_group=1, num_layer_groups=4)]))
    lm_head_one_token = 2 * 32000 * 4096      # the full pass samples one token; the group pass none
    assert group.gemm_flops == pytest.approx((full.gemm_flops - lm_head_one_token) / 4)
    assert group.seconds < full.seconds / 3


def test_active_experts_expectation():
    tm = StepTimeModel(get_model_config("mixtral-8x7b"), H100)
    got = tm.active_experts(np.array([0.0, 1.0, 1000.0]))
    assert got.tolist() == pytest.approx([0.0, 2.0, 8.0])


def synthetic_trace(n=60, seed=0):
    rng = np.random.default_rng(seed)
    reqs = tuple(TraceRequest(float(t), int(p), int(o)) for t, p, o in
                 zip(np.cumsum(rng.exponential(0.05, n)), rng.integers(20, 400, n), rng.integers(5, 120, n)))
    return Trace("synthetic", reqs)


@pytest.mark.parametrize("policy", ["aggressive", "conservative", "past-future", "layered-prefill"])
def test_small_simulation_finishes_every_request(policy):
    trace = synthetic_trace()
    # a cache of 3000 tokens forces queueing (and for aggressive, preemption) at this load
    res = simulate(trace, "mixtral-8x7b", "h100", policy, rate=40.0, num_blocks=3000 // 16, check_invariants=True)
    m = res.metrics
    assert m.num_requests == 60 and m.num_finished == 60
    tokens = sum(r.num_output_tokens for r in res.records)
    assert tokens == sum(min(r.output_len, 128) for r in trace.requests)      # max_tokens default 128
    assert 0 < m.goodput_req_s <= m.throughput_req_s and m.ttft_p50 > 0
    assert res.rate == pytest.approx(40.0) and res.busy_seconds > 0


def test_abort_missed_accounts_for_every_request():
    # Overload a small cache: requests that miss the SLO are dropped, never half-counted.
    trace = synthetic_trace()
    slo = SLO(ttft_s=0.5, max_gap_s=0.2)
    res = simulate(trace, "mixtral-8x7b", "h100", "aggressive", rate=200.0, num_blocks=1500 // 16, slo=slo,
                   abort_missed=True, check_invariants=True)
    reasons = [r.finish_reason for r in res.records]
    assert len(reasons) == 60 and set(reasons) <= {"stop", "length", "slo"} and "slo" in reasons
    for r in res.records:
        if r.finish_reason == "slo":
            assert r.finish_time - (r.token_times[-1] if r.token_times else r.arrival) > (
                slo.max_gap_s if r.token_times else slo.ttft_s)
    assert res.metrics.num_finished == reasons.count("stop") + reasons.count("length")


def test_rejected_requests_are_counted_not_run():
    trace = Trace("t", (TraceRequest(0.0, 10, 5), TraceRequest(0.1, 5000, 5)))
    res = simulate(trace, "mixtral-8x7b", "h100", "aggressive", num_blocks=64)
    assert res.metrics.num_requests == 2 and res.metrics.num_finished == 1


def test_sweep_writes_json_and_plot(tmp_path):
    results = sweep(synthetic_trace(30), "qwen-moe", "h100", ["aggressive", "past-future"], [5.0, 20.0],
                    num_blocks=200)
    assert [(r.scheduler, r.rate) for r in results] == [("aggressive", pytest.approx(5.0)),
                                                        ("past-future", pytest.approx(5.0)),
                                                        ("aggressive", pytest.approx(20.0)),
                                                        ("past-future", pytest.approx(20.0))]
    json_path, png_path = write_sweep(results, tmp_path, title="t")
    runs = json.loads(json_path.read_text())["runs"]
    assert len(runs) == 4 and "goodput_req_s" in runs[0]["metrics"]
    assert png_path.read_bytes()[:4] == b"\x89PNG"


def test_cli_simulate(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    rows += [f"2023-11-16 18:15:{10 + i // 10:02d}.{i % 10}000000,{50 + 7 * i},{5 + i % 9}" for i in range(40)]
    trace.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    rc = kdsl_main(["simulate", "--trace", str(trace), "--gpu", "h100", "--model", "qwen-moe", "--scheduler",
                    "past-future,aggressive", "--rates", "2,8", "--requests", "30", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "goodput" in text and "past-future / aggressive goodput at 8.00 req/s" in text
    assert (out / "simulate.json").exists() and (out / "goodput_vs_rate.png").exists()
    rc = kdsl_main(["simulate", "--trace", str(trace), "--model", "qwen-moe", "--scheduler", "aggressive",
                    "--rates", "40", "--abort-missed", "--slo-ttft", "0.2", "--out", str(out)])
    assert rc == 0 and json.loads((out / "simulate.json").read_text())["runs"][0]["metrics"]["slo"]["ttft_s"] == 0.2
    assert kdsl_main(["simulate", "--trace", str(trace), "--slo-gap", "0"]) == 2
    assert "max_gap_s must be a positive number" in capsys.readouterr().err
    assert kdsl_main(["simulate", "--trace", str(trace), "--scheduler", "fifo"]) == 2
    assert kdsl_main(["simulate", "--trace", str(trace), "--rates", "1,x"]) == 2
    assert "--rates must be" in capsys.readouterr().err
