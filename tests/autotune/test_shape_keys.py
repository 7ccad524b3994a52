from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autotune.shape_keys import (
    nearest_shape,
    parse_shape_arg,
    parse_shape_key,
    shape_distance,
    shape_key,
    within_token_gap,
)
from dsl.errors import TuningError

dims = st.dictionaries(st.sampled_from(["M", "N", "K", "E", "H", "D"]), st.integers(1, 1 << 20), min_size=1)


def test_shape_key_is_canonical():
    assert shape_key({"M": 128, "N": 256, "K": 512}) == "K=512,M=128,N=256"
    assert parse_shape_arg(" N=256, M=128 ,K=512") == {"N": 256, "M": 128, "K": 512}
    for bad in ({}, {"M": 0}, {"M": True}, {"M": "128"}, {"M;x": 1}):
        with pytest.raises(TuningError):
            shape_key(bad)
    for bad in ("M=128,M=2", "M=x", "M", "import os=1"):
        with pytest.raises(TuningError):
            parse_shape_arg(bad)
    with pytest.raises(TuningError, match="not canonical"):
        parse_shape_key("N=1,M=2")


@given(dims)
def test_key_round_trip_and_order_independence(shape):
    key = shape_key(shape)
    assert parse_shape_key(key) == shape
    assert shape_key(dict(reversed(list(shape.items())))) == key


@given(dims, dims)
def test_distance_is_a_log_metric(a, b):
    assert shape_distance(a, a) == 0
    assert shape_distance(a, b) == shape_distance(b, a)
    if set(a) != set(b):
        assert shape_distance(a, b) == math.inf
    doubled = {k: v * 2 for k, v in a.items()}
    assert math.isclose(shape_distance(a, doubled), math.sqrt(len(a)))


@settings(max_examples=60)
@given(st.integers(1, 1 << 16), st.lists(st.integers(1, 1 << 16), max_size=12), st.sampled_from([1.5, 2.0, 4.0]))
def test_nearest_never_crosses_the_gap(m, candidates, ratio):
    shape = {"M": m, "N": 64}
    found = nearest_shape(shape, [({"M": c, "N": 64}, c) for c in candidates], "M", ratio)
    allowed = [c for c in candidates if max(c, m) <= min(c, m) * ratio]
    if not allowed:
        assert found is None
    else:
        assert found is not None and max(found[1], m) <= min(found[1], m) * ratio
        best = min(abs(math.log2(c / m)) for c in allowed)
        assert math.isclose(abs(math.log2(found[1] / m)), best)


def test_nearest_needs_other_dims_equal_and_breaks_ties_upward():
    assert not within_token_gap({"M": 100, "N": 64}, {"M": 100, "N": 128}, "M")
    assert not within_token_gap({"M": 100}, {"M": 100, "N": 1}, "M")
    assert not within_token_gap({"N": 100}, {"N": 100}, "M")
    found = nearest_shape({"M": 100}, [({"M": 50}, "down"), ({"M": 200}, "up")], "M")
    assert found[1] == "up"
