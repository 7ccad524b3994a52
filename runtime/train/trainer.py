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
    dp: int = 1                       # data-parallel ranks (the torchrun world)
    ep: int = 1                       # 1, or the world: experts sharded over every rank
    llep: bool = False                # least-loaded expert parallelism for the EP dispatch

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
        if self.dp < 1 or self.ep < 1:
            raise TrainingError(f"--dp and --ep must be >= 1, got {self.dp} and {self.ep}")
        if self.ep > 1 and self.ep != self.dp:
            raise TrainingError(f"--ep {self.ep} must equal --dp {self.dp}: experts are sharded over every rank, "
                                "each of which also trains on its own share of the batch")
        if self.llep and self.ep == 1:
            raise TrainingError("--llep needs expert parallelism (--ep N)")

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

def init_distributed(config: TrainConfig) -> tuple[int, int]:
    """(rank, world) for ``config``: joins the torchrun process group when --dp/--ep ask for one."""
    import os

    import torch.distributed as dist

    launched = dist.is_available() and (dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1)
    if config.dp == 1:
        if launched and (dist.get_world_size() if dist.is_initialized() else int(os.environ["WORLD_SIZE"])) > 1:
            raise TrainingError("launched with several processes but --dp is 1; pass --dp N for N processes")
        return 0, 1
    if not launched:
        raise TrainingError(f"--dp {config.dp} needs one process per rank: "
                            f"torchrun --nproc-per-node {config.dp} -m runtime.cli train --dp {config.dp} ...")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    world = dist.get_world_size()
    if world != config.dp:
        raise TrainingError(f"--dp {config.dp} but {world} processes were launched")
    return dist.get_rank(), world


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

        self.rank, self.world = init_distributed(config)
        if mc.batch_size % (self.world * config.accum):
            raise TrainingError(f"batch size {mc.batch_size} is not divisible across {self.world} rank(s) x "
                                f"{config.accum} accumulation step(s)")
        # Same seed on every rank: identical initial weights (experts are sharded from the same init).
        torch.manual_seed(config.seed)
        self.train_data = PackedDataset(data_dir, "train", seq_len=mc.seq_len, batch_size=mc.batch_size,
                                        seed=config.seed, rank=self.rank, world_size=self.world)
        if self.train_data.manifest["vocab_size"] > mc.vocab_size:
            raise TrainingError(f"the corpus has {self.train_data.manifest['vocab_size']} tokens but preset "
                                f"'{config.preset}' has vocab_size {mc.vocab_size}")
        self.domains = list(self.train_data.domains)
        self.heldout = {d: PackedDataset(data_dir, "heldout", seq_len=mc.seq_len, batch_size=mc.batch_size,
                                         seed=config.seed, domains=[d]) for d in self.domains}
        self.model = MoETransformer(mc, balance=config.balance, balance_options=config.balance_options())
        self.expert_shards: set[int] = set()
        if config.ep > 1:
            from runtime.parallel.expert_parallel import LlepConfig

            for layer in self.model.layers:
                layer.moe.use_expert_parallel(None, LlepConfig() if config.llep else None)
                self.expert_shards |= {id(layer.moe.w13), id(layer.moe.w2)}
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
            if config.ep > 1:
                raise TrainingError("--resume is not supported for --ep runs yet: their checkpoints hold the "
                                    "gathered model for serving, not the sharded optimizer state")
            self._load_checkpoint()
            saved = json.loads((self.out / CHECKPOINT).read_text())
            if saved.get("train_config", {}) != {**dataclasses.asdict(config), "steps": saved["train_config"]["steps"]}:
                raise TrainingError(f"--resume {self.out}: the run was started with other settings "
                                    f"({saved['train_config']}); resume with the same ones")
            if self.rank == 0:
                self._truncate_metrics()
        elif self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            _write_json(self.out / CONFIG, {"train": dataclasses.asdict(config), "model": mc.to_dict()})

    # -- checkpoints -------------------------------------------------------------------------------
    def _tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"model.{k}": v.detach().contiguous() for k, v in self.model.state_dict().items()}
        if self.expert_shards:
            # Collective: every rank contributes its experts; the checkpoint holds the whole model.
            import torch.distributed as dist

            for i, layer in enumerate(self.model.layers):
                for name in ("w13", "w2"):
                    shard = getattr(layer.moe, name).detach().contiguous()
                    parts = [torch.empty_like(shard) for _ in range(self.world)]
                    dist.all_gather(parts, shard)
                    tensors[f"model.layers.{i}.moe.{name}"] = torch.cat(parts)
        if self.model_config.tie_embeddings:
            tensors.pop("model.lm_head.weight", None)
        opt = self.optimizer.state_dict()
        for idx, state in (opt["state"].items() if not self.expert_shards else ()):
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
        if self.rank != 0:
            return path
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
        if self.rank != 0:
            return
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
        # Accumulation step i of the global batch is its i-th slice, split over the ranks: the ranks'
        # micro-batches together are exactly one process's micro-batch, so global-batch balancing
        # (counts accumulated over steps and ranks) sees the same counts at every step as one process.
        ids = self.train_data.next_global_ids()
        per_step = len(ids) // cfg.accum
        per_rank = per_step // self.world
        ce_sum, bal_sum, n_tokens = 0.0, 0.0, 0
        loads = torch.zeros(mc.n_layers, mc.num_experts, dtype=torch.int64)
        for i in range(cfg.accum):
            start = i * per_step + self.rank * per_rank
            tokens = self.train_data.batch_of(ids[start:start + per_rank]).tokens
            n_tokens += tokens[:, 1:].numel()
            logits = model(tokens[:, :-1])
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
            bal = model.balance_loss()
            ((ce + bal) / cfg.accum).backward()
            ce_sum += float(ce.detach())
            bal_sum += float(bal.detach())
            loads += model.layer_loads()
        if self.world > 1:
            ce_sum, bal_sum = self._average_gradients(loads, ce_sum, bal_sum)
        grad_norm = self._clip_gradients(1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        model.balancer_step()
        self.step += 1
        maxvio = self.maxvio.update(loads)
        seconds = time.perf_counter() - t0
        return {"kind": "step", "step": self.step, "loss": ce_sum / cfg.accum, "lbl": bal_sum / cfg.accum,
                "lr": lr, "grad_norm": grad_norm, "maxvio_batch": maxvio,
                "maxvio_layers": self.maxvio.per_layer_last,
                "tokens_per_s": n_tokens * self.world / seconds,
                "seconds": seconds}

    def _average_gradients(self, loads: torch.Tensor, ce_sum: float, bal_sum: float) -> tuple[float, float]:
        """Data parallelism: the step's gradient is the mean over ranks of each rank's gradient.

        Replicated parameters are all-reduced. A sharded expert already holds the sum over every
        rank's tokens (the all-to-all's backward returned them), so it is only divided by the world.
        Loads (for MaxVio) and the logged losses are reduced too; ``loads`` in place.
        """
        import torch.distributed as dist

        for p in self.model.parameters():
            if p.grad is None:
                continue
            if id(p) not in self.expert_shards:
                dist.all_reduce(p.grad)
            p.grad /= self.world
        dist.all_reduce(loads)
        sums = torch.tensor([ce_sum, bal_sum], dtype=torch.float64)
        dist.all_reduce(sums)
        return float(sums[0]) / self.world, float(sums[1]) / self.world

    def num_parameters(self) -> int:
        """Parameters of the whole model (sharded experts counted on every rank that holds a shard)."""
        sharded = sum(p.numel() for p in self.model.parameters() if id(p) in self.expert_shards)
        return self.model.num_parameters() + (self.world - 1) * sharded

    def _clip_gradients(self, max_norm: float) -> float:
        """Clip by the norm of the whole model's gradient; with sharded experts their squares are
        summed over the ranks first, so every rank (and one process) clips by the same factor."""
        if not self.expert_shards:
            return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        import torch.distributed as dist

        params = [p for p in self.model.parameters() if p.grad is not None]
        squares = {True: torch.zeros((), dtype=torch.float64), False: torch.zeros((), dtype=torch.float64)}
        for p in params:
            squares[id(p) in self.expert_shards] += p.grad.double().pow(2).sum()
        replicated, sharded = squares[False], squares[True]
        dist.all_reduce(sharded)
        norm = float((replicated + sharded).sqrt())
        scale = max_norm / (norm + 1e-6)
        if scale < 1.0:
            for p in params:
                p.grad.mul_(scale)
        return norm

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
