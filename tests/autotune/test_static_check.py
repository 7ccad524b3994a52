"""Static check: compile a tiled matmul for sm_90 / sm_80 with no GPU, judge shared memory and spills."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from autotune import static_check as sc  # noqa: E402
from autotune.devices import get_device  # noqa: E402


@triton.jit
def tiled_matmul(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bk, stride_cm,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        kk = k * BLOCK_K + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K),
                    other=0.0)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + rn[None, :], mask=(kk[:, None] < K) & (rn[None, :] < N),
                    other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


SIGNATURE = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
             "stride_am": "i32", "stride_bk": "i32", "stride_cm": "i32"}


def blocks(m, n, k):
    return {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    # One cache for the module: each config compiles once (~2 s) and later checks read the verdict facts.
    return tmp_path_factory.mktemp("kdsl_cache")


@pytest.fixture(autouse=True)
def _cache_env(cache_dir, monkeypatch, _compiled_once):
    monkeypatch.setenv("KDSL_CACHE_DIR", str(cache_dir))


@pytest.fixture(scope="module")
def _compiled_once(cache_dir):
    # Compile every config the tests use in one worker process (one interpreter start, not one per
    # test); the tests then judge the cached facts, as the tuner does for a batch of candidates.
    mp = pytest.MonkeyPatch()
    mp.setenv("KDSL_CACHE_DIR", str(cache_dir))
    try:
        for device, configs in {"h100": [{**blocks(64, 64, 32), "num_warps": 4, "num_stages": 3},
                                         {**blocks(128, 128, 512), "num_warps": 32, "num_stages": 1},
                                         {**blocks(48, 64, 32), "num_warps": 4, "num_stages": 2}],
                                "a100": [{**blocks(64, 64, 32), "num_warps": 4, "num_stages": 3}]}.items():
            verdicts = sc.check_configs(tiled_matmul, SIGNATURE, configs, get_device(device))
            assert len(verdicts) == len(configs) and not any(v.cached for v in verdicts)
    finally:
        mp.undo()


@pytest.mark.parametrize("device", ["h100", "a100"])
def test_normal_config_accepted(device):
    verdict = sc.static_check(tiled_matmul, SIGNATURE, blocks(64, 64, 32), num_warps=4, num_stages=3,
                              target=get_device(device))
    assert verdict.ok, verdict.reason
    assert 0 < verdict.shared_bytes <= get_device(device).smem_per_block
    assert verdict.registers is not None and 0 < verdict.registers <= 255
    assert verdict.spill_bytes == 0
    assert verdict.compile_s > 0 and verdict.cached


def test_huge_blocks_rejected_for_shared_memory():
    # One (128 x 512 + 512 x 128) fp16 tile pair is 256 KiB of shared memory, above the 227 KiB an
    # H100 block may use. (32 warps keep the per-thread share small, so ptxas compiles it quickly.)
    verdict = sc.static_check(tiled_matmul, SIGNATURE, blocks(128, 128, 512), num_warps=32, num_stages=1,
                              target=get_device("h100"))
    assert not verdict.ok
    assert "shared memory" in verdict.reason
    assert verdict.shared_bytes > get_device("h100").smem_per_block


def test_verdict_is_cached_on_disk(cache_dir):
    args = (tiled_matmul, SIGNATURE, blocks(64, 64, 32))
    first = sc.static_check(*args, num_warps=4, num_stages=3, target=get_device("h100"))
    sc._CACHE.clear_memory()  # as a new process would: only the SQLite file is left
    again = sc.static_check(*args, num_warps=4, num_stages=3, target=get_device("h100"))
    assert again.cached and again == first
    assert (cache_dir / sc.CACHE_FILE).exists()
    # Same compile facts judged for another sm_90 device: no new compile either.
    assert sc.static_check(*args, num_warps=4, num_stages=3, target=get_device("h200")).cached


def test_limits_are_per_device():
    # The same sm_90 compile facts: fits an H100 block, not a device with a small shared-memory limit.
    import dataclasses

    small = dataclasses.replace(get_device("h100"), name="tiny", smem_per_block=8 * 1024)
    verdict = sc.static_check(tiled_matmul, SIGNATURE, blocks(64, 64, 32), num_warps=4, num_stages=3,
                              target=small)
    assert not verdict.ok and "shared memory" in verdict.reason


def test_compile_error_is_a_verdict_not_an_exception():
    # tl.arange needs a power-of-two extent: BLOCK_M=48 cannot compile.
    verdict = sc.static_check(tiled_matmul, SIGNATURE, blocks(48, 64, 32), num_warps=4, num_stages=2,
                              target=get_device("h100"))
    assert not verdict.ok
    assert "compile error" in verdict.reason


def test_bad_signature_is_a_verdict():
    verdict = sc.static_check(tiled_matmul, {"a_ptr": "*fp16"}, blocks(64, 64, 32), num_warps=4,
                              num_stages=2, target=get_device("h100"))
    assert not verdict.ok and "signature" in verdict.reason


@pytest.mark.parametrize("device", ["mi300x", "cpu"])
def test_non_nvidia_targets_are_not_checkable(device):
    verdict = sc.static_check(tiled_matmul, SIGNATURE, blocks(64, 64, 32), num_warps=4, num_stages=2,
                              target=get_device(device))
    assert verdict.ok
    assert "not checkable" in verdict.reason


def test_parse_resource_usage_from_cuobjdump_output(monkeypatch):
    # Spills are judged from cuobjdump's STACK/LOCAL; check the judgement without compiling.
    facts = {"error": None, "shared": 1024, "registers": 255, "stack": 344, "static_shared": 0, "local": 0,
             "compile_s": 1.0}
    verdict = sc._judge(facts, get_device("h100"), num_warps=4, cached=False)
    assert not verdict.ok and "spill" in verdict.reason and verdict.spill_bytes == 344
    too_many = dict(facts, stack=0, registers=200)
    verdict = sc._judge(too_many, get_device("h100"), num_warps=16, cached=False)
    assert not verdict.ok and "registers per SM" in verdict.reason
