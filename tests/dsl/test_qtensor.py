import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsl.errors import DSLError, KdslError
from dsl.qtensor import QTensor, pack_codes, unpack_codes, values_per_word


def _random_qtensor(bits, group_size, sym, n=12, k=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g)
    groups = 1 if group_size == -1 else k // group_size
    scales = torch.rand(groups, n, generator=g) + 0.1
    zeros = None if sym else torch.randint(0, 1 << bits, (groups, n), generator=g)
    return codes, scales, zeros, QTensor.pack(codes, scales, zeros, bits=bits, group_size=group_size)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), n=st.integers(1, 9), k=st.integers(1, 70), seed=st.integers(0, 99))
def test_pack_unpack_roundtrip_any_k(bits, n, k, seed):
    codes = torch.randint(0, 1 << bits, (n, k), generator=torch.Generator().manual_seed(seed))
    data = pack_codes(codes, bits)
    assert data.dtype == torch.int32
    assert data.shape == (-(-k // values_per_word(bits)), n)
    assert torch.equal(unpack_codes(data, bits, k).t(), codes.to(torch.int32))


def test_layout_is_the_documented_bit_positions():
    # 4 bits: codes 1..8 along K form the word 0x87654321 (two's complement in int32).
    codes = torch.arange(1, 9).view(1, 8)
    assert pack_codes(codes, 4).item() == 0x87654321 - (1 << 32)
    # 3 bits: ten codes per word in bits 0..29; the top two bits stay clear.
    codes = torch.full((1, 10), 7)
    assert pack_codes(codes, 3).item() == (1 << 30) - 1
    assert values_per_word(3) == 10 and values_per_word(2) == 16 and values_per_word(8) == 4
    # 8 bits, 5 codes: the second word holds the fifth code and zero padding.
    codes = torch.tensor([[255, 0, 1, 128, 9]])
    assert pack_codes(codes, 8)[:, 0].tolist() == [(255 | 1 << 16 | 128 << 24) - (1 << 32), 9]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_dequantize_follows_the_formula(bits, group_size, sym):
    codes, scales, zeros, q = _random_qtensor(bits, group_size, sym)
    gs = 96 if group_size == -1 else group_size
    zero = torch.full_like(scales, 1 << (bits - 1)) if sym else zeros.float()
    expect = (codes.float() - zero.t().repeat_interleave(gs, dim=1)) * scales.t().repeat_interleave(gs, dim=1)
    assert torch.equal(q.dequantize(), expect)
    assert torch.equal(q.dequantize_kn(), expect.t())
    assert torch.equal(q.unpack(), codes.to(torch.int32))
    assert q.dequantize(torch.float16).dtype == torch.float16


def test_nbytes_and_facts():
    _, _, _, q = _random_qtensor(4, 32, True, n=16, k=128)
    assert q.nbytes == 16 * 128 // 2 + 4 * 16 * 4
    assert (q.in_features, q.out_features, q.num_groups, q.effective_group_size) == (128, 16, 4, 32)
    _, _, _, pc = _random_qtensor(3, -1, False, n=16, k=128)
    assert pc.num_groups == 1 and pc.effective_group_size == 128
    assert "per-channel" in repr(pc) and "asym" in repr(pc)


def test_state_dict_roundtrip_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, _, q = _random_qtensor(3, 32, False)
    save_file(q.state_dict(), tmp_path / "q.safetensors")
    back = QTensor.from_state_dict(load_file(tmp_path / "q.safetensors"))
    assert (back.bits, back.group_size, back.shape, back.symmetric) == (3, 32, (12, 96), False)
    assert torch.equal(back.dequantize(), q.dequantize())


def test_to_changes_scale_dtype_and_keeps_codes():
    _, _, _, q = _random_qtensor(4, 32, True)
    half = q.to("cpu", scale_dtype=torch.float16)
    assert half.scales.dtype == torch.float16 and torch.equal(half.data, q.data)
    assert torch.allclose(half.dequantize(), q.dequantize(), rtol=1e-3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=5, group_size=32), "bits=5"),
        (dict(bits=4, group_size=100), "group_size=100"),
        (dict(bits=4, group_size=64, k=96), "does not divide K=96"),
        (dict(bits=4, group_size=True), "group_size=True"),
    ],
)
def test_invalid_formats_raise_clear_errors(kwargs, message):
    k = kwargs.pop("k", 128)
    codes = torch.zeros(4, k, dtype=torch.int32)
    with pytest.raises(DSLError, match=message):
        QTensor.pack(codes, torch.ones(1, 4), **kwargs)


def test_inconsistent_parts_are_rejected():
    codes, scales, zeros, q = _random_qtensor(4, 32, False)
    with pytest.raises(DSLError, match="codes must lie in"):
        pack_codes(torch.full((2, 8), 16), 4)
    with pytest.raises(DSLError, match="needs zero points"):
        QTensor(q.data, q.scales, None, 4, 32, q.shape, False)
    with pytest.raises(DSLError, match="no zero points"):
        QTensor(q.data, q.scales, q.zeros, 4, 32, q.shape, True)
    with pytest.raises(DSLError, match="data must be int32 of shape"):
        QTensor(q.data[:-1], q.scales, q.zeros, 4, 32, q.shape, False)
    with pytest.raises(DSLError, match="scales must be floating point of shape"):
        QTensor(q.data, q.scales[:1], q.zeros, 4, 32, q.shape, False)
    with pytest.raises(DSLError, match="2-D"):
        QTensor.pack(torch.zeros(2, 3, 32, dtype=torch.int32), scales, bits=4, group_size=32)
    with pytest.raises(DSLError, match="zero points must lie"):
        QTensor.pack(codes, scales, torch.full_like(scales, 300), bits=8, group_size=32)
    with pytest.raises(DSLError, match="unknown layout"):
        QTensor(q.data, q.scales, q.zeros, 4, 32, q.shape, False, layout="marlin")
    assert issubclass(DSLError, KdslError)
