import math

import pytest

from runtime.serve.block_manager import BlockManager
from runtime.serve.engine_core import EngineCore
from runtime.serve.metrics import SLO, PrometheusMetrics, RequestRecord, percentile, summarize
from runtime.serve.request import Request, SamplingParams
from runtime.serve.scheduler import get_scheduler


def rec(rid, arrival, times, reason="stop", preempt=0):
    return RequestRecord(rid, arrival, tuple(times), times[-1] if times else None, reason, 10, preempt)


def test_per_request_latencies():
    r = rec("a", 1.0, [3.0, 3.5, 5.5, 5.6])
    assert r.ttft == pytest.approx(2.0)
    assert r.gaps.tolist() == pytest.approx([0.5, 2.0, 0.1])
    assert r.tpot == pytest.approx(2.6 / 3)
    assert r.max_gap == pytest.approx(2.0)
    one = rec("b", 0.0, [0.4])
    assert one.tpot is None and one.max_gap == 0.0


def test_goodput_counts_requests_meeting_both_limits():
    records = [
        rec("ok", 0.0, [1.0, 2.0, 3.0]),             # ttft 1, gap 1
        rec("slow_first", 0.0, [10.5, 11.0]),        # ttft 10.5 > 10
        rec("stall", 1.0, [2.0, 3.6, 4.0]),          # gap 1.6 > 1.5
        rec("edge", 2.0, [12.0, 13.5, 20.0 - 5.0]),  # ttft 10, gaps 1.5 and 1.5: meets
        RequestRecord.rejected("rej", 3.0, 99),
    ]
    m = summarize(records)
    assert m.num_requests == 5 and m.num_finished == 4 and m.num_met_slo == 2
    assert m.duration_s == pytest.approx(15.0)          # first arrival 0 -> last finish 15
    assert m.goodput_req_s == pytest.approx(2 / 15)
    assert m.throughput_req_s == pytest.approx(4 / 15)
    assert m.throughput_tok_s == pytest.approx(11 / 15)
    assert m.ttft_p50 == pytest.approx(percentile([1.0, 10.5, 1.0, 10.0], 50))
    # time scaling stretches the limits: with x2 every finished request meets them
    assert summarize(records, time_scale=2.0).num_met_slo == 4
    assert summarize(records, SLO(ttft_s=0.5, max_gap_s=5)).num_met_slo == 0


def test_empty_and_nan_safe():
    m = summarize([])
    assert m.goodput_req_s == 0 and math.isnan(m.ttft_p99)
    assert m.to_dict()["ttft_p99"] is None


def test_preemptions_are_summed_from_records():
    assert summarize([rec("a", 0, [1, 2], preempt=2), rec("b", 0, [1], preempt=1)]).num_preemptions == 3


def test_prometheus_text_from_an_engine_run():
    class Echo:
        def execute(self, plan):
            return {r.request_id: 5 for r in plan.sampling_requests()}, 0.02

    engine = EngineCore(get_scheduler("aggressive"), BlockManager(16, 4), Echo())
    prom = PrometheusMetrics()
    engine.add_request(Request("a", [1, 2, 3], SamplingParams(max_tokens=3)))
    engine.add_request(Request("b", [4, 5], SamplingParams(max_tokens=2)))
    prom.observe_engine(engine)
    assert "kdsl_queue_length 2.0" in prom.render()
    while engine.has_unfinished:
        prom.observe_step(engine, engine.step())
    text = prom.render()
    assert "kdsl_queue_length 0.0" in text and "kdsl_running_requests 0.0" in text
    assert "kdsl_kv_cache_usage_ratio 0.0" in text
    assert "kdsl_time_to_first_token_seconds_count 2.0" in text
    assert "kdsl_inter_token_latency_seconds_count 3.0" in text      # (3 - 1) + (2 - 1) gaps
    assert 'kdsl_finished_requests_total{reason="length"} 2.0' in text
    assert "kdsl_generated_tokens_total 5.0" in text
