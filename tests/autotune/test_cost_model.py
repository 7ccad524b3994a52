"""Cost model: sanity of the roofline, wave quantisation, tile waste, devices, ranking."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autotune import cost_model as cm
from autotune.devices import get_device
from codegen.space import SearchSpace
from codegen.work import gemm_work, occupancy_of
from dsl.errors import TuningError

H100, A100 = get_device("h100"), get_device("a100")
BIG = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4}


def gemm(m, n, k, dtype="bf16", batch=1):
    return {"B": batch, "M": m, "N": n, "K": k, "dtype": dtype}


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 20000), extra=st.integers(1, 5000),
       config=st.sampled_from([BIG, {**BIG, "BLOCK_M": 64, "num_stages": 2},
                               {**BIG, "BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 2, "GROUP_M": 1}]))
def test_bigger_m_is_never_faster(m, extra, config):
    small = cm.predict("gemm", gemm(m, 4096, 4096), config, H100)
    large = cm.predict("gemm", gemm(m + extra, 4096, 4096), config, H100)
    assert large >= small


def test_wave_quantisation_one_tile_past_a_full_wave_costs_more_per_flop():
    occ = occupancy_of(gemm_work(gemm(128, 128, 4096), BIG, H100), H100)
    assert occ >= 1
    slots = H100.sm_count * occ
    # One row of 128x128 tiles: `slots` tiles fill every SM exactly, one more starts a new wave.
    full = cm.predict("gemm", gemm(128, 128 * slots, 4096), BIG, H100)
    over = cm.predict("gemm", gemm(128, 128 * (slots + 1), 4096), BIG, H100)
    per_tile_full, per_tile_over = full / slots, over / (slots + 1)
    assert per_tile_over > per_tile_full * 1.2


def test_tile_waste_m129_prefers_smaller_row_blocks():
    # fp32 keeps the problem compute-bound (in bf16 an M=129 GEMM is bound by reading the weights on
    # an H100, and wasted rows cost little).
    problem = gemm(129, 65536, 4096, dtype="f32")
    small_k = {**BIG, "BLOCK_K": 32, "num_stages": 3}
    for device in (H100, A100):
        bm128 = cm.predict("gemm", problem, small_k, device)
        bm64 = cm.predict("gemm", problem, {**small_k, "BLOCK_M": 64, "num_warps": 4}, device)
        assert bm64 < bm128 * 0.9
    # The padded work is what a BLOCK_M=128 program does: 2 row tiles cover 256 rows for 129.
    work = gemm_work(problem, small_k, H100)
    assert work.programs * work.flops_per_program == pytest.approx(2 * 256 * 65536 * 4096)


def test_h100_faster_than_a100_for_the_same_config():
    # fp32 tiles take twice the shared memory: two stages of BIG fit both devices.
    for problem, config in ((gemm(4096, 4096, 4096), BIG), (gemm(16, 8192, 8192), BIG),
                            (gemm(129, 1000, 300, dtype="f32"), {**BIG, "num_stages": 2})):
        h100, a100 = cm.predict("gemm", problem, config, H100), cm.predict("gemm", problem, config, A100)
        assert math.isfinite(h100) and h100 < a100


def test_split_k_helps_a_skinny_long_k_problem():
    # 2 tiles over 132 SMs with K=65536: splitting K spreads the work over many more SMs.
    problem = gemm(128, 256, 65536)
    plain = cm.predict("gemm", problem, BIG, H100)
    split = cm.predict("gemm", problem, {**BIG, "SPLIT_K": 16}, H100)
    assert split < plain


def test_too_much_shared_memory_is_infeasible():
    huge = {**BIG, "BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 128, "num_stages": 5}
    assert math.isinf(cm.predict("gemm", gemm(4096, 4096, 4096), huge, H100))


def test_pipelining_and_tiny_k_blocks_are_penalised():
    problem = gemm(4096, 4096, 4096)
    base = cm.predict("gemm", problem, BIG, H100)
    assert cm.predict("gemm", problem, {**BIG, "num_stages": 1}, H100) > base
    assert cm.predict("gemm", problem, {**BIG, "BLOCK_K": 16}, H100) > base


def test_unknown_template_and_bad_problem_raise_tuning_errors():
    with pytest.raises(TuningError, match="unknown template"):
        cm.predict("nonexistent", gemm(1, 1, 1), BIG, H100)
    with pytest.raises(TuningError, match="lacks dimension"):
        cm.predict("gemm", {"M": 4, "N": 4}, BIG, H100)
    with pytest.raises(TuningError, match="dtype"):
        cm.predict("gemm", gemm(4, 4, 4, dtype="f13"), BIG, H100)


def test_rank_sorts_feasible_configs_by_the_templates_work(monkeypatch):
    import dataclasses

    from codegen.work import TiledWork

    from .conftest import register_toy

    base = TiledWork(programs=1, flops_per_program=0.0, load_bytes_per_program=0.0, dram_bytes=0.0, k_iters=0,
                     smem_bytes=0, regs_per_thread=16, threads=32, dtype="f32", launches=0)

    def work(problem, config, device):  # a fixed cost per unit of distance from the problem's n
        return dataclasses.replace(base, extra_s=abs(config["BLOCK"] - problem["n"]) + 1.0)

    space = register_toy(monkeypatch, SearchSpace(template="toy", params={"BLOCK": (1, 2, 4, 8)},
                                                  default={"BLOCK": 2},
                                                  constraints=(("not_eight", lambda c, s, d: c["BLOCK"] != 8),)),
                         work=work)
    ranked = cm.rank(space, {"n": 4}, H100)
    assert [r.config["BLOCK"] for r in ranked] == [4, 2, 1]
    assert [r.seconds for r in ranked] == [1.0, 3.0, 4.0]
    assert len(cm.rank(space, {"n": 4}, H100, top=2)) == 2


def test_rank_of_the_gemm_space_prefers_big_tiles_for_big_problems():
    from codegen.template import get_space

    space = get_space("gemm")
    best = cm.rank(space, gemm(8192, 8192, 8192), H100, top=5)
    assert best and all(r.config["BLOCK_M"] * r.config["BLOCK_N"] >= 128 * 128 for r in best)
    assert all(space.feasible(r.config, {"M": 8192, "N": 8192, "K": 8192}, H100) for r in best)
    skinny = cm.rank(space, gemm(16, 4096, 4096), H100, top=1)[0]
    assert skinny.config["BLOCK_M"] <= 32


def test_memory_bound_templates():
    p = {"numel": 1 << 24, "dtype": "bf16"}
    t = cm.predict("pointwise", p, {"BLOCK": 1024, "num_warps": 4}, H100)
    assert t >= 3 * 2 * (1 << 24) / H100.mem_bandwidth
    assert cm.predict("pointwise", p, {"BLOCK": 1024, "num_warps": 4}, A100) > t
    r = cm.predict("reduction", {"R": 4096, "C": 4097, "dtype": "f32"}, {"BLOCK_R": 4, "BLOCK_C": 4096,
                                                                            "num_warps": 4}, H100)
    r_fit = cm.predict("reduction", {"R": 4096, "C": 4096, "dtype": "f32"}, {"BLOCK_R": 4, "BLOCK_C": 4096,
                                                                                "num_warps": 4}, H100)
    assert r > r_fit  # one column past the block doubles the column loop
