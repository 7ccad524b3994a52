"""kdsl train on 2 gloo ranks: data parallelism and expert parallelism (with and without LLEP) give
the losses of one process over the same global batch; EP checkpoints hold the whole model."""

import pytest
import torch

from dsl.errors import TrainingError
from runtime.parallel.local import run_local_group
from runtime.train.trainer import Trainer

STEPS = 3


def _losses(records):
    return torch.tensor([r["loss"] for r in records], dtype=torch.float64)


def _rank_worker(rank, world, configs, out):
    results = []
    for name, cfg in configs:
        trainer = Trainer(cfg, out / f"{name}", log=lambda msg: None)
        results.append((name, _losses(trainer.run()), trainer.last_eval["ppl"]))
    return results


@pytest.fixture(scope="module")
def runs(config, tmp_path_factory):
    shared = dict(steps=STEPS, batch_size=4, accum=2, seq_len=16, eval_windows=2)
    configs = [("dp-global", config(balance="global", dp=2, **shared)),
               ("ep", config(balance="global", dp=2, ep=2, **shared)),
               ("ep-llep", config(balance="global", dp=2, ep=2, llep=True, **shared))]
    out = tmp_path_factory.mktemp("dist")
    ranks = run_local_group(_rank_worker, 2, configs, out)
    single = Trainer(config(balance="global", **shared), out / "single", log=lambda msg: None)
    return ranks, _losses(single.run()), single.last_eval["ppl"], out


def test_dp_and_ep_match_one_process(runs):
    ranks, single, single_ppl, _ = runs
    for rank in ranks:
        for name, losses, ppl in rank:
            torch.testing.assert_close(losses, single, rtol=1e-4, atol=1e-5, msg=name)
            for domain, value in single_ppl.items():
                assert ppl[domain] == pytest.approx(value, rel=1e-4), (name, domain)


def test_ep_checkpoint_holds_the_whole_model(runs):
    from runtime.serve.loading import load_checkpoint

    *_, out = runs
    ep_model, _, _ = load_checkpoint(out / "ep", backend="torch")
    single_model, _, _ = load_checkpoint(out / "single", backend="torch")
    for (name, a), (_, b) in zip(ep_model.state_dict().items(), single_model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_parallel_settings_are_checked(config, tmp_path):
    with pytest.raises(TrainingError, match="torchrun"):
        Trainer(config(dp=2), tmp_path / "a")
    with pytest.raises(TrainingError, match="--ep 2 must equal --dp 1"):
        Trainer(config(ep=2), tmp_path / "b")
    with pytest.raises(TrainingError, match="--llep needs"):
        Trainer(config(llep=True), tmp_path / "c")
    assert not any(tmp_path.iterdir())


def _uneven_worker(rank, world, cfg, out):
    try:
        Trainer(cfg, out / "uneven")
    except TrainingError as exc:
        return str(exc)
    return None


def test_batch_not_divisible_across_ranks(config, tmp_path):
    errors = run_local_group(_uneven_worker, 2, config(dp=2, batch_size=6, accum=2), tmp_path)
    assert all("not divisible across 2 rank(s) x 2 accumulation step(s)" in e for e in errors)
    assert not (tmp_path / "uneven").exists()
