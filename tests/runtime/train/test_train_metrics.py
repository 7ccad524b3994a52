"""MaxVio and the expert-by-domain specialisation score."""

from __future__ import annotations

import math

import pytest
import torch

from runtime.train.metrics import DomainLoad, MaxVioTracker, max_vio, max_vio_batch, specialisation


def test_max_vio_values():
    assert max_vio(torch.tensor([5, 5, 5, 5])).item() == 0.0
    assert max_vio(torch.tensor([8, 0, 0, 0])).item() == 3.0
    assert max_vio_batch(torch.tensor([[5, 5], [9, 1]])) == pytest.approx(0.4)


def test_tracker_avg_and_sup():
    tr = MaxVioTracker()
    tr.update(torch.tensor([[4, 4], [4, 4]]))
    tr.update(torch.tensor([[6, 2], [4, 4]]))
    assert tr.avg == pytest.approx(0.125) and tr.sup == pytest.approx(0.25)
    assert tr.per_layer_last == pytest.approx([0.5, 0.0])


def test_specialisation_zero_when_independent_and_log_d_when_partitioned():
    load = DomainLoad(num_layers=1, num_domains=2, num_experts=4)
    ids = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    load.add(0, ids, torch.tensor([0, 0, 1, 1]))                    # both domains use all experts alike
    assert load.specialisation()["mutual_info_bits"] == pytest.approx(0.0, abs=1e-12)
    assert load.specialisation()["max_share"] == pytest.approx(0.25)
    split = torch.zeros(1, 2, 4)
    split[0, 0, :2] = 10
    split[0, 1, 2:] = 10                                            # domain 0 -> experts 0,1; domain 1 -> 2,3
    s = specialisation(split)
    assert s["mutual_info_bits"] == pytest.approx(math.log2(2)) and s["max_share"] == pytest.approx(0.5)
    assert load.max_vio_global() == 0.0
