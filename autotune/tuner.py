"""The tuner: per kernel of an op at a shape, search launch configs with Optuna and store the best.

Every candidate runs once and is compared with the graph's reference semantics before its time
counts; compile errors, wrong results, timeouts and crashes become failed trials with their reason.
On a GPU each candidate runs in a worker process with a timeout (a faulting kernel cannot take the
tuner down); under Triton's interpreter it runs in-process. Studies live in the tuning database
(Optuna's RDB storage), keyed by (kernel source hash, shape, device fingerprint, Triton version), so
a killed run resumes and several workers share one study.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import math
import multiprocessing as mp
import statistics
import time
from typing import Callable

import torch

from dsl.errors import KdslError, TuningError
from dsl.reference import run_all
from dsl.trace import Op

from codegen.program import TritonProgram
from codegen.space import SearchSpace
from codegen.template import KernelTemplate, get_template

from .devices import Device

LAUNCH_OPTIONS = ("num_warps", "num_stages")


@dataclasses.dataclass
class KernelTask:
    """One kernel of one op (or of a template tuned on its own) at one shape: what to launch and
    what it must produce. ``kernel`` names the module's ``@triton.jit`` function."""

    op_name: str
    kernel: str
    template: str
    source_hash: str
    problem: dict
    module: object
    rendered: object
    inputs: list
    expected: list
    env: dict
    # The config the runtime falls back to for this problem on a device, where the template has a
    # shape-aware default (the quantized GEMMs); the space's static default otherwise.
    default: Callable[[Device], dict] | None = None
    # Relative tolerance of the correctness gate where the kernel computes below its output's
    # precision (TF32 dots on float32 tensors); by the output dtype otherwise.
    tolerance: float | None = None

    @property
    def kernel_template(self) -> KernelTemplate:
        return get_template(self.template)

    @property
    def space(self) -> SearchSpace:
        return self.kernel_template.space

    def default_config(self, device: Device) -> dict:
        if self.default is not None:
            return dict(self.default(device))
        return self.kernel_template.default_config(self.problem, device)


@dataclasses.dataclass
class TuneResult:
    kernel: str
    template: str
    problem: dict
    best_config: dict | None
    best_ms: float | None
    default_ms: float | None
    measured: int
    failed: int
    source: str                      # "measured" | "predicted"
    failures: list[str] = dataclasses.field(default_factory=list)


# -- building tasks ---------------------------------------------------------------------------


def example_inputs(op: Op, shape: dict[str, int], dtype=None, device="cpu", seed: int = 0):
    """Random inputs for ``op`` with every symbol bound by ``shape`` (floats ~ N(0, 1)/4). On the
    meta device the tensors have types and sizes but no data (offline tuning reads only those)."""
    import dsl.dtypes as dt

    missing = sorted({d for p in op.params for d in p.spec.dims if isinstance(d, str)} - set(shape))
    if missing:
        raise TuningError(f"--shape must give {', '.join(missing)} for op '{op.name}' "
                          f"(e.g. --shape {','.join(f'{m}=128' for m in missing)})")
    g = torch.Generator().manual_seed(seed)
    tensors = []
    for p in op.params:
        d = p.spec.dtype or dtype or dt.f32
        size = tuple(s if isinstance(s, int) else shape[s] for s in p.spec.dims)
        if str(device) == "meta":
            t = torch.empty(size, dtype=d.torch, device="meta")
        elif d.is_float:
            t = (torch.randn(size, generator=g) / 4).to(d.torch)
        elif d is dt.bool_:
            t = torch.rand(size, generator=g) > 0.5
        else:  # integer inputs are indices in most ops; small non-negative values stay in range
            t = torch.zeros(size, dtype=d.torch)
        tensors.append(t.to(device))
    return tensors


def _typed_values(graph, env, refs) -> dict:
    """Meta tensors of the graph's types at ``env``: what each kernel reads and writes, without data."""
    from dsl import shapes as sh

    out = {}
    for ref in refs:
        t = graph.type_of(ref)
        out[ref] = torch.empty(tuple(sh.evaluate(d, env) for d in t.shape), dtype=t.dtype.torch, device="meta")
    return out


def build_tasks(op: Op, shape: dict[str, int], dtype=None, device="cpu", seed: int = 0,
                tensors=None, backward: bool = False, attrs: dict | None = None) -> list[KernelTask]:
    """The kernels of ``op`` at ``shape``, each with its inputs and the outputs it must produce.

    ``device="meta"``: typed stand-ins and no reference run, for offline tuning at full model sizes
    (what the cost model and the static check read: sizes, dtypes, the launch's arguments).
    ``backward``: the kernels of the op's backward graph (inputs, then one cotangent per output, as
    the compiled op's backward runs it). ``attrs``: the op's static keyword attributes (each value
    traces its own graph, so its own kernels and records)."""
    from dsl.autodiff import grad
    from dsl.graph import Ref

    meta = str(device) == "meta"
    if tensors is None:
        factory = getattr(op, "example_inputs", None)
        tensors = (example_inputs(op, shape, dtype, device, seed) if factory is None or meta
                   else factory(shape, dtype, device, seed))
    graph, tensors, env = op.bind(tensors, dict(attrs or {}))
    if backward:
        forward, graph = graph, grad(graph)
        if meta:
            tensors = list(_typed_values(graph, env, [Ref(i) for i in graph.inputs]).values())
        else:
            g = torch.Generator().manual_seed(seed + 1)
            outs = [run_all(forward, tensors, env)[ref] for ref in forward.outputs]
            tensors = list(tensors) + [(torch.randn(o.shape, generator=g) / 4).to(o.dtype).to(o.device)
                                       for o in outs]
    program = TritonProgram(graph, op.name + ("_bwd" if backward else ""))
    if meta:
        refs = {ref for r in program.rendered.values() for ref in (*r.input_refs, *r.output_refs)}
        values = _typed_values(graph, env, refs)
    else:
        values = run_all(graph, tensors, env)
    tasks = []
    for info in program.infos:
        r = program.rendered[info.name]
        tasks.append(KernelTask(op.name, info.name, info.template, info.source_hash,
                                get_template(r.template).problem(r, env), program.module(info.name), r,
                                [values[ref] for ref in r.input_refs],
                                [values[ref] for ref in r.output_refs], env))
    return tasks


# -- templates tuned without an op -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TemplateTasks:
    """How to tune a kernel template directly, at a shape, without a DSL op: the quantized GEMMs,
    whose weights (``dsl.QTensor``) are no graph type. Declared in ``autotune.template_tasks``.

    ``build(shape, options, device, seed) -> [KernelTask]`` makes the inputs (random weights
    quantized the way the runtime's are), the reference outputs and the kernels. ``dims`` are the
    ``--shape`` sizes it needs; ``options`` its other choices with their defaults, each a flag of
    ``kdsl tune`` of the same name (``bits``, ``group_size``, ``asym``, ``dtype``).
    """

    template: str
    dims: tuple[str, ...]
    options: dict
    build: Callable[..., list]


def template_task_names() -> list[str]:
    from .template_tasks import TEMPLATE_TASKS

    return sorted(TEMPLATE_TASKS)


def template_tasks(name: str) -> TemplateTasks | None:
    """The task builder of template ``name`` (tuned without an op), or None."""
    from .template_tasks import TEMPLATE_TASKS

    return TEMPLATE_TASKS.get(name)


def build_template_tasks(name: str, shape: dict[str, int], options: dict | None = None, device="cpu",
                         seed: int = 0) -> list[KernelTask]:
    """The kernels of template ``name`` at ``shape`` with ``options`` (defaults for those left out)."""
    spec = template_tasks(name)
    if spec is None:
        raise TuningError(f"unknown template '{name}' (templates tuned without an op: "
                          f"{', '.join(template_task_names()) or 'none'}; or give FILE.py:OP)")
    missing = [d for d in spec.dims if d not in shape]
    extra = sorted(set(shape) - set(spec.dims))
    if missing or extra:
        example = ",".join(f"{d}={shape.get(d, 128)}" for d in spec.dims)
        what = f"lacks {', '.join(missing)}" if missing else f"has {', '.join(extra)}, which {name} does not take"
        raise TuningError(f"--shape {what}: template '{name}' takes {', '.join(spec.dims)} (e.g. --shape {example})")
    small = [f"{d}={shape[d]}" for d in spec.dims if shape[d] < 1]
    if small:
        raise TuningError(f"--shape: {', '.join(small)}: sizes must be >= 1")
    unknown = sorted(set(options or {}) - set(spec.options))
    if unknown:
        flags = ", ".join("--" + o.replace("_", "-") for o in unknown)
        takes = ", ".join("--" + o.replace("_", "-") for o in spec.options) or "no options"
        raise TuningError(f"template '{name}' has no option {flags} (it takes {takes})")
    return spec.build(dict(shape), {**spec.options, **(options or {})}, device, seed)


@dataclasses.dataclass(frozen=True)
class TaskSource:
    """What a tuning run measures, in a form another process rebuilds it from (an isolated runner,
    a worker sharing the study): ``spec`` is ``FILE.py:OP`` or a registered template's name."""

    spec: str
    shape: tuple[tuple[str, int], ...]
    dtype: str | None = None
    options: tuple[tuple[str, object], ...] = ()
    seed: int = 0
    attrs: tuple[tuple[str, object], ...] = ()   # static keyword attributes of the op
    backward: bool = False                        # tune the op's backward kernels

    @classmethod
    def of(cls, spec: str, shape: dict, dtype: str | None = None, options: dict | None = None,
           seed: int = 0, attrs: dict | None = None, backward: bool = False) -> "TaskSource":
        return cls(spec, tuple(sorted(shape.items())), dtype, tuple(sorted((options or {}).items())), seed,
                   tuple(sorted((attrs or {}).items())), backward)

    @property
    def is_template(self) -> bool:
        return ":" not in self.spec and template_tasks(self.spec) is not None

    def build(self, device="cpu") -> list[KernelTask]:
        if self.is_template:
            options = dict(self.options)
            if self.dtype is not None:
                options["dtype"] = self.dtype
            return build_template_tasks(self.spec, dict(self.shape), options, device, self.seed)
        import dsl.dtypes as dt
        from dsl.loader import load_op

        op, _ = load_op(self.spec)
        return build_tasks(op, dict(self.shape), dt.ALL.get(self.dtype), device, self.seed,
                           backward=self.backward, attrs=dict(self.attrs))


# -- running and checking one candidate --------------------------------------------------------


def launch(task: KernelTask, config: dict) -> list[torch.Tensor]:
    outs = [torch.empty_like(e) for e in task.expected]
    task.kernel_template.launch(task.module, task.rendered, task.inputs, outs, task.env, config)
    return outs


def mismatch(outs, expected, tolerance: float | None = None) -> str | None:
    """Why the outputs are wrong, or None. Tolerances follow the dtype (fp32 accumulation) unless
    ``tolerance`` is given."""
    for i, (o, e) in enumerate(zip(outs, expected)):
        if o.shape != e.shape:
            return f"output {i} has shape {tuple(o.shape)}, expected {tuple(e.shape)}"
        if not o.numel():
            continue
        if e.dtype.is_floating_point:
            tol = tolerance or {torch.float32: 1e-4, torch.float64: 1e-9}.get(e.dtype, 2e-2)
            of, ef = o.double(), e.double()
            err = (of - ef).abs().max().item()
            scale = max(1.0, ef.abs().max().item())
            if not math.isfinite(err) and torch.equal(of.isnan(), ef.isnan()):
                continue
            if not err <= tol * scale:
                return f"output {i} differs from the reference by {err:.3g} (tolerance {tol * scale:.3g})"
        elif not torch.equal(o, e):
            return f"output {i} differs from the reference"
    return None


class _Flusher:
    """Evicts L2 between timed GPU runs by writing a buffer larger than any L2 cache."""

    def __init__(self):
        self.buf = torch.empty(256 << 20, dtype=torch.uint8, device="cuda") if torch.cuda.is_available() else None

    def __call__(self):
        if self.buf is not None:
            self.buf.zero_()


def time_candidate(task: KernelTask, config: dict, repeats: int, flush: _Flusher | None = None):
    """Check once, then the median of ``repeats`` timed launches (seconds) and the raw samples."""
    outs = launch(task, config)
    reason = mismatch(outs, task.expected, task.tolerance)
    if reason:
        raise CandidateFailure(f"wrong result: {reason}")
    samples = []
    on_gpu = bool(task.inputs) and task.inputs[0].is_cuda
    for _ in range(repeats):
        if on_gpu:
            if flush is not None:
                flush()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            launch(task, config)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            launch(task, config)
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples), samples


class CandidateFailure(KdslError):
    """A candidate that did not produce a usable measurement; its message is the trial's reason."""


# -- isolation: one worker process per tuning run on a GPU ---------------------------------------

_WORKER_TASKS: dict = {}


def _worker_measure(source: TaskSource, kernel: str, config: dict, repeats: int):
    """Runs in the worker process: rebuild the task from its source, measure one candidate."""
    if source not in _WORKER_TASKS:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        _WORKER_TASKS[source] = {t.kernel: t for t in source.build(device)}
    task = _WORKER_TASKS[source][kernel]
    try:
        return time_candidate(task, config, repeats, _Flusher())
    except CandidateFailure:
        raise
    except Exception as exc:  # compile errors, launch errors: report, never crash the tuner
        raise CandidateFailure(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")


class IsolatedRunner:
    """Measures candidates in a worker process; a crash or timeout fails the candidate only."""

    def __init__(self, source: TaskSource, timeout_s: float = 120.0):
        self.source = source
        self.timeout_s = timeout_s
        self.pool: cf.ProcessPoolExecutor | None = None

    def _pool(self):
        if self.pool is None:
            self.pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"))
        return self.pool

    def _kill(self):
        if self.pool is not None:
            for proc in list(getattr(self.pool, "_processes", {}).values()):
                proc.kill()
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None

    def __call__(self, task: KernelTask, config: dict, repeats: int):
        future = self._pool().submit(_worker_measure, self.source, task.kernel, config, repeats)
        try:
            return future.result(timeout=self.timeout_s)
        except cf.TimeoutError:
            self._kill()
            raise CandidateFailure(f"timeout after {self.timeout_s:.0f} s") from None
        except cf.process.BrokenProcessPool:
            self._kill()
            raise CandidateFailure("the kernel crashed its worker process") from None

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None


def in_process_runner(task: KernelTask, config: dict, repeats: int):
    try:
        return time_candidate(task, config, repeats)
    except CandidateFailure:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        raise CandidateFailure(f"{type(exc).__name__}: {first}") from None


# -- the static filter: compile for the device without running ------------------------------------


def record(task: KernelTask, config: dict):
    """The kernel launches one launch of ``task`` with ``config`` makes, recorded on meta tensors
    (nothing runs): what the static check compiles, with Triton's own specialisation."""
    from .launch_spec import record_launches

    template = task.kernel_template
    return record_launches(template.launch, task.module, task.rendered, task.inputs, task.expected, task.env,
                           config, template.kernel_names(task.rendered))


def launch_spec(task: KernelTask, config: dict):
    """The first recorded launch of ``task`` with ``config`` (see :func:`record`)."""
    return record(task, config)[0]


def static_verdicts(task: KernelTask, configs: list[dict], target: Device) -> list:
    """Static verdicts for ``configs`` of ``task`` on ``target``: each candidate's recorded launches,
    compiled exactly as the runtime would launch them, in one worker process for the batch."""
    from .launch_spec import LaunchRecordError
    from .static_check import Verdict, check_launches

    launches, failed = [], {}
    for i, config in enumerate(configs):
        try:
            launches.append(record(task, config))
        except LaunchRecordError as exc:
            failed[i] = Verdict(False, str(exc))
            launches.append([])
    checked = iter(check_launches([l for l in launches if l], target))
    return [failed[i] if i in failed else next(checked) for i in range(len(configs))]


def static_filter(task: KernelTask, target: Device) -> Callable[[dict], str | None]:
    """Constraints as code, then (NVIDIA targets) compile for the target and reject overflow/spills."""
    space = task.space

    def feasible(config: dict) -> str | None:
        bad = space.violations(config, task.problem, target)
        if bad:
            return f"violates {', '.join(bad)}"
        if target.vendor != "nvidia":
            return None
        (verdict,) = static_verdicts(task, [config], target)
        return None if verdict.ok else f"static check: {verdict.reason}"

    return feasible


# -- the search -------------------------------------------------------------------------------


def study_name(task: KernelTask, device: Device) -> str:
    from codegen.render import triton_version

    from .shape_keys import shape_key

    return f"{task.template}:{task.source_hash}:{shape_key(task.problem)}:{device.fingerprint()}:{triton_version()}"


def measured_trials(study) -> int:
    from optuna.trial import TrialState

    from .strategy import FAILURE_ATTR

    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state == TrialState.COMPLETE or FAILURE_ATTR in t.user_attrs)


def warm_start(task: KernelTask, device: Device, db, top: int = 5) -> list[dict]:
    """The template default, configs tuned for nearby shapes, and the cost model's best guesses."""
    configs = [task.default_config(device)]
    if db is not None:
        near = db.nearest(source_hash=task.source_hash, device=device, shape=task.problem,
                          token_dim=task.kernel_template.token_dim)
        if near is not None:
            configs.insert(0, dict(near.config))
    try:
        from .cost_model import rank
    except ImportError:  # pragma: no cover - the cost model ships with kdsl
        return configs
    try:
        configs += [r.config for r in rank(task.space, cost_problem(task), device, top=top)]
    except TuningError:
        pass
    return configs


def open_study(task: KernelTask, device: Device, db=None, storage=None, seed: int = 0):
    from .strategy import make_study

    return make_study(task.space.params, seed, warm_start(task, device, db), storage=storage,
                      study_name=study_name(task, device))


def tune_task(task: KernelTask, *, trials: int, device: Device, db=None, storage=None, seed: int = 0,
              repeats: int = 10, runner=None, feasible=None, quota: int | None = None, study=None,
              on_trial: Callable[[int, float | None], None] | None = None) -> TuneResult:
    """Measure until the study holds ``trials`` measured candidates (a killed run resumes where it
    stopped), or, with ``quota``, exactly this worker's share of them."""
    from .strategy import ask_config, report_failure, report_result

    runner = runner or in_process_runner
    params = task.space.params
    feasible = feasible or static_filter(task, device)
    study = study or open_study(task, device, db, storage, seed)
    failures = []
    default_ms = None
    default = task.default_config(device)
    mine = 0
    while (mine < quota) if quota is not None else (measured_trials(study) < trials):
        mine += 1
        try:
            trial, config = ask_config(study, params, feasible)
        except TuningError as exc:  # nothing feasible left to measure
            failures.append(str(exc))
            break
        try:
            seconds, samples = runner(task, config, repeats)
        except CandidateFailure as exc:
            report_failure(study, trial, str(exc))
            failures.append(f"{config}: {exc}")
            if on_trial:
                on_trial(trial.number, None)
            continue
        trial.set_user_attr("samples", samples)
        report_result(study, trial, seconds)
        if config == default:
            default_ms = seconds * 1e3
        if on_trial:
            on_trial(trial.number, seconds)
    return _finish(task, study, device, db, default_ms, failures)


def _finish(task, study, device, db, default_ms, failures) -> TuneResult:
    from optuna.trial import TrialState

    from .strategy import CONFIG_ATTR, FAILURE_ATTR, config_of

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    failed = sum(1 for t in study.get_trials(deepcopy=False) if FAILURE_ATTR in t.user_attrs)
    if not complete:
        return TuneResult(task.kernel, task.template, task.problem, None, None, default_ms, 0, failed,
                          "measured", failures)
    best = min(complete, key=lambda t: t.value)
    config = best.user_attrs.get(CONFIG_ATTR) or config_of(best, task.space.params)
    if db is not None:
        db.add_record(template=task.template, source_hash=task.source_hash, op_name=task.op_name,
                      device=device, shape=task.problem, config=config, time_ms=best.value * 1e3,
                      samples=[s * 1e3 for s in best.user_attrs.get("samples", [])], source="measured")
    return TuneResult(task.kernel, task.template, task.problem, dict(config), best.value * 1e3, default_ms,
                      len(complete), failed, "measured", failures)


_COST_DTYPES = {torch.float32: "f32", torch.float64: "f32", torch.float16: "f16", torch.bfloat16: "bf16",
                torch.int8: "i8", torch.float8_e4m3fn: "f8e4m3"}


def cost_problem(task: KernelTask) -> dict:
    """The task's problem plus the compute dtype the cost model needs (shape keys hold ints only)."""
    dtypes = [t.dtype for t in task.inputs if t.dtype.is_floating_point or t.dtype == torch.int8]
    return {**task.problem, "dtype": _COST_DTYPES.get(dtypes[0] if dtypes else torch.float32, "f32")}


def _tile_class(config: dict) -> tuple:
    # What decides registers and spills: the tile and the threads sharing it. Stages and the
    # program order change shared memory, which the check reports separately.
    return tuple(sorted((k, v) for k, v in config.items() if k not in ("num_stages", "GROUP_M")))


def predict_task(task: KernelTask, *, target: Device, db=None, candidates: int = 16, batch: int = 4,
                 feasible: Callable[[dict], str | None] | None = None) -> TuneResult:
    """Offline: rank by the cost model, keep the best that passes the static check for ``target``.

    Candidates are compiled a few at a time in one worker process. ``feasible(config) -> reason or
    None`` replaces the constraints + static check (for tests and for targets with no compiler).
    """
    from .cost_model import predict, rank

    problem = cost_problem(task)
    failures: list[str] = []
    # One candidate per tile class, best predicted first: stage and order variants of a tile that
    # spills would all spill, so ``candidates`` compiles cover as many tiles as possible.
    pending, seen = [], set()
    for r in rank(task.space, problem, target):
        if _tile_class(r.config) not in seen:
            seen.add(_tile_class(r.config))
            pending.append(r.config)
    pending = pending[:candidates]
    while pending:
        todo = []
        while pending and len(todo) < batch:
            config = pending.pop(0)
            bad = task.space.violations(config, task.problem, target) if feasible is None else []
            reason = f"violates {', '.join(bad)}" if bad else (feasible(config) if feasible else None)
            if reason:
                failures.append(f"{config}: {reason}")
            else:
                todo.append(config)
        if not todo:
            continue
        check = target.vendor == "nvidia" and feasible is None
        verdicts = static_verdicts(task, todo, target) if check else [None] * len(todo)
        for config, verdict in zip(todo, verdicts):
            if verdict is not None and not verdict.ok:
                failures.append(f"{config}: static check: {verdict.reason}")
                continue
            seconds = predict(task.template, problem, config, target)
            if db is not None:
                db.add_record(template=task.template, source_hash=task.source_hash, op_name=task.op_name,
                              device=target, shape=task.problem, config=config, time_ms=seconds * 1e3,
                              source="predicted")
            return TuneResult(task.kernel, task.template, task.problem, dict(config), seconds * 1e3, None, 0,
                              len(failures), "predicted", failures)
    return TuneResult(task.kernel, task.template, task.problem, None, None, None, 0, len(failures),
                      "predicted", failures)


__all__ = ["KernelTask", "TuneResult", "build_tasks", "example_inputs", "tune_task", "predict_task",
           "IsolatedRunner", "in_process_runner", "CandidateFailure", "static_filter", "study_name",
           "record", "launch_spec", "static_verdicts", "cost_problem", "warm_start", "measured_trials",
           "open_study", "TemplateTasks", "template_task_names", "template_tasks",
           "build_template_tasks", "TaskSource"]
