"""Run a function on N local processes joined in a torch.distributed group (gloo on 127.0.0.1).

For tests and CPU benchmarks of data/expert parallelism without torchrun. Results come back to the
caller serialised with ``torch.save`` (so tensors survive the worker's exit); an exception in any
worker is re-raised in the caller with the worker's traceback.
"""

from __future__ import annotations

import io
import os
import traceback
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsl.errors import TrainingError


_STORE_TIMEOUT = timedelta(seconds=120)


def _worker(rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple, queue,
            threads: int) -> None:
    # One intra-op thread per worker: the workers share the host's cores, and a forked child must not
    # enter a thread pool its parent created.
    torch.set_num_threads(threads)
    try:
        # The rendezvous store is served by the parent (see run_local_group): every rank is a client.
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=_STORE_TIMEOUT)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=_STORE_TIMEOUT)
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        queue.put((rank, False, traceback.format_exc()))


def run_local_group(fn: Callable, world_size: int, *args, backend: str = "gloo",
                    start_method: str | None = None, threads: int = 1, timeout: float = 300.0) -> list:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` processes; return their results by rank.

    ``start_method`` defaults to "fork" where available (no re-import of torch: ~0.1 s instead of
    seconds per worker), which needs ``fn`` and ``args`` to be usable after a fork; pass "spawn" for
    a module-level ``fn`` and picklable args otherwise.
    """
    if world_size < 1:
        raise TrainingError(f"world_size must be >= 1, got {world_size}")
    method = start_method or ("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    ctx = mp.get_context(method)
    queue = ctx.SimpleQueue()
    # The parent serves the rendezvous store on a port the OS picks as it binds (port 0), so no other
    # process can take the port between choosing and binding it, and the store outlives every rank:
    # with rank 0 serving it, a rank that fails fast and exits takes the store down while the others
    # are still connecting (a gloo connection race seen under a parallel test run).
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=_STORE_TIMEOUT)
    port = store.port
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, fn, args, queue, threads),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, ok, payload = _get(queue, procs, timeout)
            if ok:
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
        del store
    if errors:
        raise TrainingError("a local distributed worker failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


def _get(queue, procs, timeout: float):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not queue.empty():
            return queue.get()
        dead = [p for p in procs if p.exitcode not in (None, 0)]
        if dead and queue.empty():
            raise TrainingError(f"local distributed worker pid {dead[0].pid} died with exit code "
                                f"{dead[0].exitcode} before reporting")
        time.sleep(0.01)
    raise TrainingError(f"local distributed workers did not finish within {timeout:.0f}s")


def env_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment, (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
