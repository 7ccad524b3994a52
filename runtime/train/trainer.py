"""The training loop of ``kdsl train``: AdamW on :class:`runtime.model.MoETransformer` over the packed
multi-domain corpus, with the balancing methods of runtime.train.balance, metrics as JSON lines and
exact-resume checkpoints.

Run directory layout::

    config.json                      the run's TrainConfig and model config (written at start)
    metrics.jsonl                    {"kind": "step", ...} per optimizer step, {"kind": "eval", ...} per eval
    ckpt_<step>.safetensors          model, optimizer, RNG and balancer tensors
    checkpoint.json                  written last: names the live safetensors file, its sha256, the
                                     step, data position, optimizer hyper-parameters, MaxVio history

Every file is written to a temp name and moved into place with os.replace, and checkpoint.json moves
last, so a kill at any moment leaves the previous checkpoint intact. On CPU a resumed run reproduces
the uninterrupted run's losses bit for bit (same data order, RNG, optimizer and balancer state).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dsl.errors import TrainingError
from runtime.model import MoEConfig, MoETransformer, get_preset
from runtime.nn.moe import BALANCE_METHODS
from runtime.train.balance import TopKSchedule
from runtime.train.data import PackedDataset, atomic_write, default_data_dir
from runtime.train.metrics import DomainLoad, MaxVioTracker

CHECKPOINT = "checkpoint.json"
METRICS = "metrics.jsonl"
CONFIG = "config.json"


@dataclasses.dataclass
class TrainConfig:
    preset: str = "tiny"
    balance: str = "none"
    steps: int = 100
    seed: int = 0
    lbl_weight: float = 0.01
    z_loss: float = 0.0
    aux_free_rate: float = 1e-3
    topk_schedule: bool = False
    accum: int = 1
    eval_every: int = 0               # 0: evaluate only at the end
    eval_windows: int = 16            # held-out windows per domain per evaluation
    save_every: int = 0               # 0: checkpoint only at the end
    batch_size: int | None = None     # global batch (sequences per optimizer step); None: the preset's
    seq_len: int | None = None
    data_dir: str | None = None
    model_overrides: dict = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        if self.balance not in BALANCE_METHODS:
            raise TrainingError(f"unknown balance method '{self.balance}'; valid: {', '.join(BALANCE_METHODS)}")
        for name in ("steps", "accum"):
            if getattr(self, name) < 1:
                raise TrainingError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_windows < 1:
            raise TrainingError(f"--eval-windows must be >= 1, got {self.eval_windows}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise TrainingError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.lbl_weight < 0 or self.z_loss < 0:
            raise TrainingError("--lbl-weight and --z-loss must be >= 0")

    def model_config(self) -> MoEConfig:
        overrides = dict(self.model_overrides)
        if self.batch_size is not None:
            overrides["batch_size"] = self.batch_size
        if self.seq_len is not None:
            overrides["seq_len"] = self.seq_len
        try:
            return get_preset(self.preset, **overrides)
        except TypeError as exc:
            raise TrainingError(f"bad model override: {exc}") from None

    def balance_options(self) -> dict:
        opts: dict = {"z_loss_weight": self.z_loss} if self.z_loss else {}
        if self.balance in ("micro", "global", "seq"):
            opts["weight"] = self.lbl_weight
        elif self.balance == "aux_free":
            opts["update_rate"] = self.aux_free_rate
        return opts


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of the peak; a pure function of the step (no state)."""
    warmup = min(warmup, max(total // 10, 1))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


# ------------------------------------------------------------------------------------- file helpers

def _write_json(path: Path, data) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2) + "\n"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise TrainingError(f"no {METRICS} in {run_dir}: not a training run directory")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                raise TrainingError(f"{path}:{n}: not a JSON line") from None
    return records


# ------------------------------------------------------------------------------------------ trainer

@torch.no_grad()
def heldout_perplexity(model, dataset: PackedDataset, windows: int, batch_size: int, on_batch=None) -> float:
    """exp(mean next-token NLL) over the first ``windows`` sequences of ``dataset``.

    ``on_batch(tokens)`` runs after each forward (the trainer reads the routing there).
    """
    nll, count, seen = 0.0, 0, 0
    for batch in dataset.eval_batches(batch_size):
        take = min(batch.tokens.shape[0], windows - seen)
        if take <= 0:
            break
        tokens = batch.tokens[:take]
        logits = model(tokens[:, :-1])
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1),
                                     reduction="sum"))
        count += tokens[:, 1:].numel()
        seen += take
        if on_batch is not None:
            on_batch(tokens)
    return math.exp(nll / max(count, 1))


class Trainer:
    """One training run. ``out``: the run directory (must not hold another run unless ``resume``)."""

    def __init__(self, config: TrainConfig, out: str | Path, *, resume: bool = False,
                 log: Callable[[str], None] = lambda msg: None):
        config.validate()
        self.config, self.out, self.log = config, Path(out), log
        self.model_config = config.model_config()
        mc = self.model_config
        if mc.batch_size % config.accum:
            raise TrainingError(f"batch size {mc.batch_size} is not divisible into --accum {config.accum} "
                                "micro-batches")
        data_dir = Path(config.data_dir) if config.data_dir else default_data_dir()
        if resume:
            if not (self.out / CHECKPOINT).is_file():
                raise TrainingError(f"cannot resume: no {CHECKPOINT} in {self.out}")
        elif (self.out / CHECKPOINT).exists() or (self.out / METRICS).exists():
            raise TrainingError(f"{self.out} already holds a training run; use --resume {self.out} or another --out")

        torch.manual_seed(config.seed)
        self.train_data = PackedDataset(data_dir, "train", seq_len=mc.seq_len, batch_size=mc.batch_size,
                                        seed=config.seed)
        if self.train_data.manifest["vocab_size"] > mc.vocab_size:
            raise TrainingError(f"the corpus has {self.train_data.manifest['vocab_size']} tokens but preset "
                                f"'{config.preset}' has vocab_size {mc.vocab_size}")
        self.domains = list(self.train_data.domains)
        self.heldout = {d: PackedDataset(data_dir, "heldout", seq_len=mc.seq_len, batch_size=mc.batch_size,
                                         seed=config.seed, domains=[d]) for d in self.domains}
        self.model = MoETransformer(mc, balance=config.balance, balance_options=config.balance_options())
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": mc.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=mc.lr, betas=(0.9, 0.95), eps=1e-8)
        self.schedule = (TopKSchedule(mc.top_k, mc.n_layers, start_k=min(mc.num_experts, 2 * mc.top_k))
                         if config.topk_schedule else None)
        self.step = 0
        self.maxvio = MaxVioTracker()
        self.last_eval: dict | None = None
        if resume:
            self._load_checkpoint()
            saved = json.loads((self.out / CHECKPOINT).read_text())
            if saved.get("train_config", {}) != {**dataclasses.asdict(config), "steps": saved["train_config"]["steps"]}:
                raise TrainingError(f"--resume {self.out}: the run was started with other settings "
                                    f"({saved['train_config']}); resume with the same ones")
            self._truncate_metrics()
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            _write_json(self.out / CONFIG, {"train": dataclasses.asdict(config), "model": mc.to_dict()})

    # -- checkpoints -------------------------------------------------------------------------------
    def _tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"model.{k}": v.detach().contiguous() for k, v in self.model.state_dict().items()}
        if self.model_config.tie_embeddings:
            tensors.pop("model.lm_head.weight", None)
        opt = self.optimizer.state_dict()
        for idx, state in opt["state"].items():
            for name, value in state.items():
                tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value).contiguous()
        for k, v in self.model.balancer_state().items():
            tensors[f"balance.{k}"] = v.contiguous()
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {"param_groups": opt["param_groups"]}
        return tensors, meta

    def save_checkpoint(self) -> Path:
        tensors, meta = self._tensors()
        name = f"ckpt_{self.step:07d}.safetensors"
        path = self.out / name
        atomic_write(path, lambda p: save_file(tensors, str(p)))
        previous = None
        if (self.out / CHECKPOINT).is_file():
            try:
                previous = json.loads((self.out / CHECKPOINT).read_text()).get("tensors")
            except ValueError:
                previous = None
        record = {"format": 1, "step": self.step, "tensors": name, "sha256": _sha256(path),
                  "data": self.train_data.state_dict(), "optimizer": meta,
                  "maxvio": self.maxvio.state_dict(), "train_config": dataclasses.asdict(self.config),
                  "model_config": self.model_config.to_dict()}
        _write_json(self.out / CHECKPOINT, record)
        if previous and previous != name:
            (self.out / previous).unlink(missing_ok=True)
        return path

    def _load_checkpoint(self) -> None:
        ckpt = self.out / CHECKPOINT
        try:
            record = json.loads(ckpt.read_text())
            tensor_file = self.out / record["tensors"]
            expected_sha = record["sha256"]
            step = int(record["step"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TrainingError(f"corrupt checkpoint {ckpt}: {exc}") from None
        if not tensor_file.is_file():
            raise TrainingError(f"corrupt checkpoint {ckpt}: {tensor_file.name} is missing")
        if _sha256(tensor_file) != expected_sha:
            raise TrainingError(f"corrupt checkpoint {tensor_file}: sha256 does not match {CHECKPOINT}")
        if record.get("model_config") != self.model_config.to_dict():
            raise TrainingError(f"checkpoint {ckpt} was saved with another model config; resume with the same "
                                "--preset and sizes")
        try:
            tensors = load_file(str(tensor_file))
        except (SafetensorError, OSError) as exc:
            raise TrainingError(f"corrupt checkpoint {tensor_file}: {exc}") from None
        model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            missing, unexpected = self.model.load_state_dict(model_state, strict=False)
        except RuntimeError as exc:
            raise TrainingError(f"checkpoint {tensor_file} does not fit the model: {exc}") from None
        missing = [m for m in missing if not (m == "lm_head.weight" and self.model_config.tie_embeddings)]
        if missing or unexpected:
            raise TrainingError(f"checkpoint {tensor_file} does not fit the model: missing {missing}, "
                                f"unexpected {unexpected}")
        state: dict = {}
        try:
            for k, v in tensors.items():
                if k.startswith("optim."):
                    _, idx, name = k.split(".", 2)
                    state.setdefault(int(idx), {})[name] = v
            self.optimizer.load_state_dict({"state": state, "param_groups": record["optimizer"]["param_groups"]})
            torch.set_rng_state(tensors["rng.torch"])
            self.maxvio.load_state_dict(record["maxvio"])
            data_state = record["data"]
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise TrainingError(f"corrupt checkpoint {ckpt}: cannot restore the optimizer/RNG/metrics state "
                                f"({type(exc).__name__}: {exc})") from None
        self.model.load_balancer_state({k[8:]: v for k, v in tensors.items() if k.startswith("balance.")})
        self.train_data.load_state_dict(data_state)
        self.step = step
        self.log(f"resumed {self.out} at step {step}")

    def _truncate_metrics(self) -> None:
        # A killed run may have logged steps after its last checkpoint; they are re-run now.
        path = self.out / METRICS
        if path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= self.step]
            atomic_write(path, lambda p: p.write_text("".join(line + "\n" for line in kept)))

    # -- metrics -------------------------------------------------------------------------------------
    def _emit(self, record: dict) -> None:
        with open(self.out / METRICS, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Per-domain held-out perplexity, MaxVio_global and the expert-by-domain load."""
        model, mc = self.model, self.model_config
        model.eval()
        model.capture_routing(True)
        load = DomainLoad(mc.n_layers, len(self.domains), mc.num_experts)
        ppl = {}
        try:
            for d, name in enumerate(self.domains):
                def record_routing(tokens, d=d):
                    dom = torch.full((tokens.shape[0] * mc.seq_len,), d, dtype=torch.int64)
                    for layer, ids in enumerate(model.layer_routing()):
                        load.add(layer, ids, dom)

                ppl[name] = heldout_perplexity(model, self.heldout[name], self.config.eval_windows,
                                               mc.batch_size, on_batch=record_routing)
        finally:
            model.capture_routing(False)
            model.train()
        spec = load.specialisation()
        return {"kind": "eval", "step": self.step, "ppl": ppl,
                "ppl_avg": sum(ppl.values()) / len(ppl), "maxvio_global": load.max_vio_global(),
                "specialisation": spec["mutual_info_bits"], "max_share": spec["max_share"],
                "domains": self.domains, "domain_load": load.counts.tolist()}

    # -- the loop ------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg, mc, model = self.config, self.model_config, self.model
        t0 = time.perf_counter()
        lr = lr_at(self.step, cfg.steps, mc.lr, mc.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.schedule is not None:
            model.set_top_k([self.schedule(i, self.step, cfg.steps) for i in range(mc.n_layers)])
        batch = self.train_data.next_batch()
        micro = batch.tokens.shape[0] // cfg.accum
        ce_sum, bal_sum = 0.0, 0.0
        loads = torch.zeros(mc.n_layers, mc.num_experts, dtype=torch.int64)
        for i in range(cfg.accum):
            tokens = batch.tokens[i * micro:(i + 1) * micro]
            logits = model(tokens[:, :-1])
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
            bal = model.balance_loss()
            ((ce + bal) / cfg.accum).backward()
            ce_sum += float(ce.detach())
            bal_sum += float(bal.detach())
            loads += model.layer_loads()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        model.balancer_step()
        self.step += 1
        maxvio = self.maxvio.update(loads)
        seconds = time.perf_counter() - t0
        return {"kind": "step", "step": self.step, "loss": ce_sum / cfg.accum, "lbl": bal_sum / cfg.accum,
                "lr": lr, "grad_norm": grad_norm, "maxvio_batch": maxvio,
                "maxvio_layers": self.maxvio.per_layer_last, "tokens_per_s": batch.tokens[:, 1:].numel() / seconds,
                "seconds": seconds}

    def run(self, *, stop_at: int | None = None, progress: bool = False) -> list[dict]:
        """Train until ``config.steps`` (or ``stop_at``, as if killed there); return the step records."""
        cfg = self.config
        end = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
        records = []
        bar = None
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                           TextColumn("{task.fields[info]}"), transient=False)
            task = bar.add_task("train", total=cfg.steps, completed=self.step, info="")
            bar.start()
        try:
            while self.step < end:
                record = self.train_step()
                self._emit(record)
                records.append(record)
                if bar is not None:
                    bar.update(task, completed=self.step, info=f"loss {record['loss']:.3f} "
                               f"maxvio {record['maxvio_batch']:.2f} {record['tokens_per_s']:.0f} tok/s")
                final = self.step == cfg.steps
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or final:
                    ev = self.last_eval = self.evaluate()
                    ev["avg_maxvio"], ev["sup_maxvio"] = self.maxvio.avg, self.maxvio.sup
                    self._emit(ev)
                if (cfg.save_every and self.step % cfg.save_every == 0) or final:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.stop()
        return records


__all__ = ["TrainConfig", "Trainer", "lr_at", "read_metrics", "CHECKPOINT", "METRICS"]
