"""runtime.train.trainer: learning on a synthetic corpus, exact resume, checkpoint and input errors."""

import json

import pytest

from dsl.errors import TrainingError
from runtime.cli import main as cli_main
from runtime.train.trainer import CHECKPOINT, Trainer, read_metrics


def test_training_reduces_loss_and_writes_metrics(config, tmp_path):
    trainer = Trainer(config(steps=8, balance="global", accum=2), tmp_path / "run")
    records = trainer.run()
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-3:]) / 3
    assert last < first - 1.0, (first, last)
    metrics = read_metrics(tmp_path / "run")
    steps = [m for m in metrics if m["kind"] == "step"]
    evals = [m for m in metrics if m["kind"] == "eval"]
    assert len(steps) == 8 and len(evals) == 1
    assert len(steps[0]["maxvio_layers"]) == 2 and steps[0]["lbl"] > 0 and steps[0]["tokens_per_s"] > 0
    assert set(evals[0]["ppl"]) == {"code", "prose"} and evals[0]["maxvio_global"] >= 0
    assert len(evals[0]["domain_load"]) == 2 and len(evals[0]["domain_load"][0]) == 2
    assert (tmp_path / "run" / CHECKPOINT).is_file()
    # `kdsl report` plots the run
    assert cli_main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "plots")]) == 0
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"loss.png", "perplexity.png", "maxvio.png"}


def test_cli_errors_are_one_line(corpus, tmp_path, capsys):
    assert cli_main(["train", "--preset", "giant", "--data-dir", str(corpus), "--out", str(tmp_path / "r")]) == 2
    assert "unknown preset 'giant'" in capsys.readouterr().err
    assert cli_main(["report", str(tmp_path / "missing")]) == 2
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("balance", ["aux_free", "bip"])
def test_resume_is_bitwise_identical(config, tmp_path, balance):
    cfg = dict(balance=balance, topk_schedule=True, steps=4)
    full = Trainer(config(**cfg), tmp_path / "full").run()
    killed = Trainer(config(save_every=2, **cfg), tmp_path / "killed")
    killed.run(stop_at=3)     # dies after step 3; the last checkpoint is step 2
    resumed = Trainer(config(save_every=2, **cfg), tmp_path / "killed", resume=True)
    assert resumed.step == 2
    rest = resumed.run()
    assert [r["loss"] for r in rest] == [r["loss"] for r in full[2:]]
    assert [r["maxvio_batch"] for r in rest] == [r["maxvio_batch"] for r in full[2:]]
    steps = [m["step"] for m in read_metrics(tmp_path / "killed") if m["kind"] == "step"]
    assert steps == [1, 2, 3, 4]


def test_corrupt_checkpoint_is_an_error_and_nothing_is_overwritten(config, tmp_path):
    run = tmp_path / "run"
    Trainer(config(steps=2), run).run()
    record = json.loads((run / CHECKPOINT).read_text())
    tensors = run / record["tensors"]
    data = bytearray(tensors.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tensors.write_bytes(bytes(data))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(TrainingError, match="corrupt checkpoint"):
        Trainer(config(steps=4), run, resume=True)
    (run / CHECKPOINT).write_text("{not json")
    with pytest.raises(TrainingError, match="corrupt checkpoint"):
        Trainer(config(steps=4), run, resume=True)
    (run / CHECKPOINT).write_text(json.dumps(record) + "\n")
    # starting a new run over an existing one is refused too
    with pytest.raises(TrainingError, match="already holds a training run"):
        Trainer(config(steps=4), run)
    after = {p.name: p.read_bytes() for p in run.iterdir()}
    assert after.keys() == before.keys()
    assert all(after[k] == before[k] for k in before if k != CHECKPOINT)


@pytest.mark.parametrize("change, message", [
    (dict(preset="giant"), "unknown preset 'giant'"),
    (dict(balance="magic"), "unknown balance method 'magic'"),
    (dict(accum=3), "not divisible into --accum 3"),
    (dict(steps=0), "--steps must be >= 1"),
])
def test_bad_input(config, tmp_path, change, message):
    with pytest.raises(TrainingError, match=message):
        Trainer(config(**change), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_resume_with_other_settings_is_refused(config, tmp_path):
    Trainer(config(steps=2), tmp_path / "run").run()
    with pytest.raises(TrainingError, match="other settings"):
        Trainer(config(steps=4, lbl_weight=0.5), tmp_path / "run", resume=True)
    with pytest.raises(TrainingError, match="no checkpoint.json"):
        Trainer(config(), tmp_path / "empty", resume=True)


def test_quantized_checkpoint_keeps_heldout_perplexity(config, tmp_path):
    from benchmarks import bench_quant_model as bench

    trainer = Trainer(config(steps=8, balance="aux_free", eval_windows=4), tmp_path / "run")
    trainer.run()
    float_ppl = trainer.evaluate()["ppl"]
    results = bench.evaluate(tmp_path / "run", ["w8", "w4"], windows=4)
    # The served checkpoint (balancer state included) evaluates exactly as the trainer did.
    assert results["float"]["ppl"] == pytest.approx(float_ppl, rel=1e-5)
    assert results["w4"]["simulated"] > 0 and results["w4"]["ppl"] != results["float"]["ppl"]
    assert abs(results["w8"]["increase_pct"]) < 1.0
    assert abs(results["w4"]["increase_pct"]) < 10.0
