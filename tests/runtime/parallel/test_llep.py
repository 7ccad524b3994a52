"""The LLEP plan: exact coverage of every expert's tokens, the device cap, chunk sizes, plain-EP fallback."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsl.errors import TrainingError
from runtime.parallel import llep


def _check_coverage(plan, loads):
    for e, segs in enumerate(plan.segments):
        pos = 0
        for seg in segs:
            assert seg.start == pos and seg.end >= seg.start
            pos = seg.end
        assert pos == loads[e]
    dev = [0] * plan.num_devices
    for segs in plan.segments:
        for seg in segs:
            dev[seg.device] += seg.size
    assert tuple(dev) == plan.device_loads
    for t in plan.transfers:
        assert t.src == plan.native(t.expert) != t.dst
        assert any(s.device == t.dst and s.size for s in plan.segments[t.expert])


def skewed(total, experts, share):
    rest = total - int(total * share)
    loads = [rest // (experts - 1)] * experts
    loads[0] = total - sum(loads[1:])
    return loads


@pytest.mark.parametrize("share", [0.5, 0.9, 0.95])
def test_skewed_loads_spill_and_stay_under_cap(share):
    loads = skewed(8 * 16384, 64, share)
    plan = llep.plan(loads, 8, alpha=1.0, m=1024, lam=1.3)
    _check_coverage(plan, loads)
    assert plan.spilled and max(plan.device_loads) <= plan.cap
    assert plan.segments[0][0].device == 0 and plan.segments[0][0].size > 0     # native keeps its share
    for segs in plan.segments:
        assert all(s.size >= 1024 for s in segs[1:-1])                          # chunks >= m but the last


def test_balanced_loads_are_plain_expert_parallelism():
    loads = [1000] * 16
    plan = llep.plan(loads, 4)
    assert not plan.spilled and not plan.transfers
    assert all(len(s) == 1 and s[0].device == e // 4 for e, s in enumerate(plan.segments))
    assert plan == llep.plain_ep_plan(loads, 4)


def test_fallback_when_no_device_has_room_for_a_chunk():
    plan = llep.plan([100, 0, 0, 0], 4, m=1024)        # 25 per device cap, chunks of 1024 impossible
    _check_coverage(plan, [100, 0, 0, 0])
    assert plan.device_loads[0] == 25 and sum(plan.device_loads) == 100


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4).map(lambda p: 2 ** (p - 1)), st.integers(1, 4), st.data())
def test_property_coverage_and_cap_with_unit_chunks(devices, per, data):
    loads = data.draw(st.lists(st.integers(0, 5000), min_size=devices * per, max_size=devices * per))
    plan = llep.plan(loads, devices, m=1, lam=1.0)
    _check_coverage(plan, loads)
    if plan.spilled:
        assert max(plan.device_loads) <= plan.cap
    assert plan == llep.plan(loads, devices, m=1, lam=1.0)   # deterministic: every rank plans alike


def test_bad_arguments():
    with pytest.raises(TrainingError, match="evenly"):
        llep.plan([1, 2, 3], 2)
    with pytest.raises(TrainingError):
        llep.plan([1, 2], 2, alpha=0.5)
    with pytest.raises(TrainingError):
        llep.plan([-1, 2], 2)


def test_cost_model_bench_writes_results(tmp_path):
    import json

    from benchmarks import bench_llep

    out = tmp_path / "llep.json"
    assert bench_llep.main(["--no-gloo", "--devices", "8", "--experts", "32", "--tokens-per-device", "4096",
                            "--out", str(out)]) == 0
    rows = {r["skew"]: r for r in json.loads(out.read_text())["cost_model"]}
    assert rows["balanced"]["speedup_fwd"] == pytest.approx(1.0) and not rows["balanced"]["llep_spilled"]
    assert rows["90%"]["llep"]["max_device_rows"] < rows["90%"]["ep"]["max_device_rows"]
    assert rows["90%"]["ep"]["forward_ms"] > rows["balanced"]["ep"]["forward_ms"]
