"""`kdsl tune FILE.py:OP --shape ...`: tune every kernel of an op at a shape, store the best.

`kdsl tune TEMPLATE --shape ...` does the same for a kernel template that library code launches
itself, with no op around it (the quantized GEMMs: quant_gemm, int8_gemm, fp8_gemm); its options
(--bits, --group-size, --asym, --dtype) choose the weight format.
"""

from __future__ import annotations

import multiprocessing as mp

from dsl.errors import KdslError

from .common import parse_dtype, parse_shape

# Template options as flags: each is the option's name with dashes (see autotune.lookup's
# template_tune_command, which writes them back into the command a default-config warning names).
TEMPLATE_OPTIONS = ("bits", "group_size", "asym", "mode")


def register(sub) -> None:
    p = sub.add_parser("tune", help="autotune an op's kernels at a shape and store the results",
                       description="Search each kernel's launch config with Optuna (every candidate checked "
                                   "against the reference first) and store the best in the tuning "
                                   "database. With --target DEV --offline, rank configs with the cost "
                                   "model and the static check for a GPU you do not have and store "
                                   "'predicted' records.")
    p.add_argument("target_op", metavar="FILE.py:OP|module:OP|NAME|TEMPLATE",
                   help="a @dsl.op function (file or module path and its name), a built-in kernel by name "
                        "(linear, moe, moe_qwen3, moe_backward, attention, attention_backward, "
                        "paged_attention, rotary, rmsnorm, softmax, combine), or a kernel template tuned "
                        "on its own (quant_gemm, int8_gemm, fp8_gemm, quant_moe_gemm)")
    p.add_argument("--shape", required=True, help="symbol sizes, e.g. M=128,N=256,K=64")
    p.add_argument("--dtype", default=None, help="dtype for parameters whose annotation leaves it open; for a "
                                                 "template its activations (quant_gemm: f16, bf16, f32, tf32; "
                                                 "default f16) or output (int8_gemm, fp8_gemm: default f32)")
    p.add_argument("--bits", type=int, default=None, help="quant_gemm: weight bits, 2, 3, 4 or 8 (default 4)")
    p.add_argument("--group-size", type=int, default=None,
                   help="quant_gemm: weights per scale, 32, 64, 128, 256 or -1 per channel (default 128)")
    p.add_argument("--asym", action="store_const", const=True, default=None,
                   help="quant_gemm: asymmetric weights (uint8 zero points); default symmetric")
    p.add_argument("--mode", choices=("gate_up", "down"), default=None,
                   help="quant_moe_gemm: which grouped GEMM of the experts (default gate_up)")
    p.add_argument("--backward", action="store_true", help="tune the op's backward kernels (FILE.py:OP only)")
    p.add_argument("--trials", type=int, default=20, help="measured candidates per kernel (default 20)")
    p.add_argument("--workers", type=int, default=1, help="worker processes sharing each study (default 1)")
    p.add_argument("--repeats", type=int, default=10, help="timed launches per candidate (median)")
    p.add_argument("--target", default=None, help="device to tune for (a100, h100, h200, l40s, rtx4090, "
                                                  "mi300x); default: this machine")
    p.add_argument("--offline", action="store_true", help="predict with the cost model + static check "
                                                          "instead of measuring (needs --target)")
    p.add_argument("--kernel", default=None, help="tune only the kernel with this name")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--db", default=None, help="SQLAlchemy URL of the tuning database (default: KDSL_DB or "
                                              "the user cache)")
    p.set_defaults(func=run)


def _worker(source, kernel, trials, quota, repeats, seed, db_url):
    """One of several processes working on the same study."""
    _quiet_optuna()
    from autotune import tuner
    from autotune.db import TuningDB, optuna_storage
    from autotune.devices import local_device

    device = local_device()
    task = next(t for t in source.build(_torch_device()) if t.kernel == kernel)
    db = TuningDB(db_url)
    runner = tuner.IsolatedRunner(source) if device.vendor != "cpu" else None
    try:
        tuner.tune_task(task, trials=trials, device=device, db=db, storage=optuna_storage(db_url),
                        seed=seed, repeats=repeats, runner=runner, quota=quota)
    finally:
        if runner is not None:
            runner.close()
        db.close()


def task_source(args):
    """What to tune, checked: an op file or a registered template with its options."""
    from autotune import tuner

    from runtime.ops.tunables import TUNABLES

    shape = parse_shape(args.shape)
    options = {name: getattr(args, name) for name in TEMPLATE_OPTIONS if getattr(args, name) is not None}
    spec = args.target_op
    backward = getattr(args, "backward", False)
    attrs: dict = {}
    if spec in TUNABLES:  # a built-in kernel by name: its op, backward choice and attributes
        named = TUNABLES[spec]
        spec, backward, attrs = named.spec, backward or named.backward, dict(named.attrs)
    if ":" in spec or spec.endswith(".py"):
        if options:
            flags = ", ".join("--" + name.replace("_", "-") for name in options)
            raise KdslError(f"{flags}: only for kernel templates tuned on their own "
                            f"({', '.join(tuner.template_task_names())}), not for an op")
        if args.dtype:
            parse_dtype(args.dtype)
    elif tuner.template_tasks(spec) is None:
        raise KdslError(f"'{spec}' is neither FILE.py:OP (a @dsl.op function) nor a kernel template tuned on "
                        f"its own ({', '.join(tuner.template_task_names())})")
    if backward and ":" not in spec:
        raise KdslError("--backward: only for ops (FILE.py:OP, module:OP or a built-in name)")
    return tuner.TaskSource.of(spec, shape, args.dtype, options, args.seed, attrs=attrs, backward=backward)


def _torch_device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _quiet_optuna():
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Heartbeats make killed runs resumable; Optuna warns because we drive trials with ask/tell.
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")


def run(args) -> int:
    _quiet_optuna()
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from autotune import tuner
    from autotune.db import TuningDB, optuna_storage
    from autotune.devices import get_device, local_device

    if args.trials < 1 or args.workers < 1 or args.repeats < 1:
        raise KdslError("--trials, --workers and --repeats must be >= 1")
    if args.offline and not args.target:
        raise KdslError("--offline needs --target DEV (the device to predict for)")
    source = task_source(args)
    console = Console()
    here = local_device()
    device = get_device(args.target) if args.target else here
    if not args.offline and args.target and device.arch != here.arch:
        raise KdslError(f"cannot measure for {device.name} on {here.name}; add --offline to predict")
    # Offline, nothing runs: the inputs only give the launch its types and the cost model its sizes.
    tasks = source.build("meta" if args.offline else _torch_device())
    name = tasks[0].op_name if tasks else args.target_op
    if args.kernel:
        tasks = [t for t in tasks if t.kernel == args.kernel]
        if not tasks:
            raise KdslError(f"'{name}' has no kernel '{args.kernel}'")
    db = TuningDB(args.db)
    results = []
    try:
        if args.offline:
            for task in tasks:
                results.append(tuner.predict_task(task, target=device, db=db))
        else:
            storage = optuna_storage(args.db)
            for task in tasks:
                results.append(_tune_one(task, source, args, device, db, storage, console, Progress, BarColumn,
                                         TextColumn, TimeElapsedColumn))
    finally:
        db.close()
    table = Table(title=f"kdsl tune {name} at {args.shape} on {device.name}")
    for col in ("kernel", "template", "problem", "best config", "time", "vs default", "measured", "failed"):
        table.add_column(col)
    for r in results:
        prob = ",".join(f"{k}={v}" for k, v in r.problem.items())
        cfg = ",".join(f"{k}={v}" for k, v in (r.best_config or {}).items()) or "none"
        time_txt = "-" if r.best_ms is None else f"{r.best_ms:.4g} ms" + (" (pred.)" if r.source == "predicted" else "")
        speed = f"{r.default_ms / r.best_ms:.2f}x" if r.default_ms and r.best_ms else "-"
        table.add_row(r.kernel, r.template, prob, cfg, time_txt, speed, str(r.measured), str(r.failed))
    console.print(table)
    missing = [r.kernel for r in results if r.best_config is None]
    if missing:
        for r in results:
            for f in r.failures[:3]:
                console.print(f"  {r.kernel}: {f}", markup=False)
        raise KdslError(f"no usable config found for {', '.join(missing)}")
    return 0


def _tune_one(task, source, args, device, db, storage, console, Progress, BarColumn, TextColumn,
              TimeElapsedColumn):
    from autotune import tuner

    study = tuner.open_study(task, device, db, storage, args.seed)
    remaining = max(0, args.trials - tuner.measured_trials(study))
    if args.workers > 1 and remaining:
        ctx = mp.get_context("spawn")
        shares = [remaining // args.workers + (1 if i < remaining % args.workers else 0)
                  for i in range(args.workers)]
        procs = [ctx.Process(target=_worker, args=(source, task.kernel, args.trials, share, args.repeats,
                                                   args.seed + i, args.db))
                 for i, share in enumerate(shares) if share]
        with console.status(f"{task.kernel}: {len(procs)} workers measuring {remaining} candidates"):
            for p in procs:
                p.start()
            for p in procs:
                p.join()
        bad = [p.exitcode for p in procs if p.exitcode]
        if bad:
            console.print(f"[yellow]{len(bad)} worker(s) exited with errors; completed trials are kept[/yellow]")
        return tuner.tune_task(task, trials=args.trials, device=device, db=db, storage=storage,
                               seed=args.seed, repeats=args.repeats, study=study)
    runner = tuner.IsolatedRunner(source) if device.vendor != "cpu" else None
    best = [None]
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("best {task.fields[best]}"), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        bar = progress.add_task(task.kernel, total=remaining, best="-")

        def on_trial(number, seconds):
            if seconds is not None and (best[0] is None or seconds < best[0]):
                best[0] = seconds
            progress.update(bar, advance=1, best="-" if best[0] is None else f"{best[0] * 1e3:.4g} ms")

        try:
            return tuner.tune_task(task, trials=args.trials, device=device, db=db, storage=storage,
                                   seed=args.seed, repeats=args.repeats, runner=runner, on_trial=on_trial,
                                   study=study)
        finally:
            if runner is not None:
                runner.close()
