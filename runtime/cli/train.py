"""`kdsl train`: train the MoE transformer with one of the load-balancing methods."""

from __future__ import annotations

import json
import time
from pathlib import Path

from dsl.errors import TrainingError


def register(subparsers) -> None:
    from runtime.model import PRESETS
    from runtime.nn.moe import BALANCE_METHODS

    p = subparsers.add_parser("train", help="train the MoE transformer on the prepared corpus",
                              description="Train runtime.model.MoETransformer with AdamW on the corpus of "
                              "`kdsl data prepare`; metrics go to RUN_DIR/metrics.jsonl, checkpoints to RUN_DIR.")
    p.add_argument("--preset", default="tiny", help=f"model preset: {', '.join(PRESETS)}")
    p.add_argument("--balance", default="none", help=f"load-balancing method: {', '.join(BALANCE_METHODS)}")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (total, also when resuming)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data order")
    p.add_argument("--lbl-weight", type=float, default=0.01, help="weight of the balancing loss (micro/global/seq)")
    p.add_argument("--z-loss", type=float, default=0.0, help="weight of the router z-loss")
    p.add_argument("--aux-free-rate", type=float, default=1e-3, help="bias update rate u of aux_free")
    p.add_argument("--topk-schedule", action="store_true",
                   help="per-layer top-k schedule: lower layers start with 2x top-k, decaying to top-k")
    p.add_argument("--accum", type=int, default=1, help="gradient-accumulation micro-batches per step")
    p.add_argument("--batch-size", type=int, default=None, help="global batch in sequences (default: the preset's)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the preset's)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out sequences per domain per evaluation")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--data-dir", type=Path, default=None, help="prepared corpus (default: the kdsl cache dir)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<preset>-<balance>-s<seed>)")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its checkpoint (same settings)")
    p.add_argument("--dp", type=int, default=1,
                   help="data-parallel ranks; launch with torchrun --nproc-per-node N -m runtime.cli train --dp N")
    p.add_argument("--ep", type=int, default=1, help="shard the experts over the --dp ranks (give the same N)")
    p.add_argument("--llep", action="store_true", help="least-loaded expert parallelism for the --ep dispatch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)


def _train(args) -> int:
    from rich.console import Console

    from runtime.train.trainer import TrainConfig, Trainer

    if args.resume is not None and args.out is not None and Path(args.out) != Path(args.resume):
        raise TrainingError("give either --out or --resume RUN_DIR, not both with different directories")
    config = TrainConfig(preset=args.preset, balance=args.balance, steps=args.steps, seed=args.seed,
                         lbl_weight=args.lbl_weight, z_loss=args.z_loss, aux_free_rate=args.aux_free_rate,
                         topk_schedule=args.topk_schedule, accum=args.accum, eval_every=args.eval_every,
                         eval_windows=args.eval_windows, save_every=args.save_every, batch_size=args.batch_size,
                         seq_len=args.seq_len, data_dir=str(args.data_dir) if args.data_dir else None,
                         dp=args.dp, ep=args.ep, llep=args.llep)
    out = args.resume or args.out or Path("runs") / f"{args.preset}-{args.balance}-s{args.seed}"
    console = Console(stderr=True)
    t0 = time.perf_counter()
    trainer = Trainer(config, out, resume=args.resume is not None, log=console.print)
    if trainer.rank != 0:   # rank 0 reports for the group
        console = Console(stderr=True, quiet=True)
    console.print(f"model: {trainer.num_parameters():,} parameters, balance={config.balance}, run dir {out}")
    trainer.run(progress=not args.no_progress and trainer.rank == 0)
    ev = trainer.last_eval or trainer.evaluate()
    console.print(f"done in {time.perf_counter() - t0:.0f}s: held-out ppl "
                  + json.dumps({k: round(v, 2) for k, v in ev["ppl"].items()})
                  + f", MaxVio_global {ev['maxvio_global']:.3f}, AvgMaxVio {trainer.maxvio.avg:.3f}")
    return 0
