"""Engines: where the per-file work of :mod:`protect.work` runs.

:class:`LocalEngine` runs chunks of files in worker processes (one per CPU core by default), or in
this process when there is one worker. Processes, not threads: decoding, protecting and encoding
then use every core with no GIL in between. On Linux with a CPU device the workers are forked after
the parent has imported torch and fitted the method, so they start in milliseconds and share the
parent's memory; with a GPU (or on macOS/Windows) they are spawned, each with its own CUDA context.

Memory is bounded by bytes, not counts: all workers share one :class:`~protect.work.Budget`
(``--memory``), and each image is admitted from its header (its decoded size times the working
bytes per value) before its pixels are decoded. Chunks in flight are bounded too (two per worker).

Workers ignore Ctrl-C (the parent stops them) and die with the parent (Linux ``PR_SET_PDEATHSIG``),
so a killed run never leaves processes writing into the output folder.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch

from .errors import ConfigError, ProtectError
from .work import Budget, Context, Result, Spec, Task, init_worker, run_chunk

log = logging.getLogger(__name__)

#: Most files per chunk (one task sent to a worker).
MAX_CHUNK = 256
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


class WorkerDied(ProtectError):
    """A worker process ended abruptly (killed by the system, usually for lack of memory)."""


def default_workers() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def total_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def default_memory() -> int:
    """Image working memory when ``--memory`` is not given: a quarter of the machine's RAM,
    between 256 MiB and 1.5 GiB (two 24-megapixel photos at a time)."""
    ram = total_memory()
    quarter = ram // 4 if ram else 1 << 30
    return int(min(max(quarter, 256 << 20), 3 << 29))


def parse_size(text: str | int) -> int:
    """``"2GB"``, ``"1.5g"``, ``"512MiB"``, ``"800m"`` or a byte count -> bytes (binary units)."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"cannot read memory size '{text}'; write e.g. 2GB, 1.5G or 800MB")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 16 << 20:
        raise ConfigError(f"--memory must be at least 16MB, got {text}")
    return value


def chunks(tasks: Sequence[Task], workers: int) -> Iterator[list[Task]]:
    """Tasks in order, cut so that every worker gets about 8 chunks (at most :data:`MAX_CHUNK`)."""
    size = max(1, min(MAX_CHUNK, math.ceil(len(tasks) / max(1, workers * 8))))
    for i in range(0, len(tasks), size):
        yield list(tasks[i:i + size])


def drive(work: Iterable[list[Task]], pending: dict[Any, Any], *, submit: Callable[[list[Task]], Any],
          has_room: Callable[[], bool], wait_done: Callable[[list[Any]], list[Any]],
          take: Callable[[Any], list[Result]], on_results: Callable[[list[Result]], None],
          on_ready: Callable[[], None] | None, ordered: bool) -> None:
    """The submit / wait / journal loop every engine runs (worker processes here, Ray actors in
    :mod:`protect.ray_engine`). ``submit(chunk)`` starts a chunk and returns its handle, kept in
    ``pending`` (insertion-ordered; the caller owns it, to stop what is left on failure) while
    ``has_room()``; ``wait_done(handles)`` blocks until at least one of them is done and returns the
    done ones; ``take(handle)`` its results, passed to ``on_results`` in this process. ``ordered``:
    results in submission order (``--strict`` then stops at the first failing file in input order).
    ``on_ready`` is called once the first chunks are submitted."""
    source = iter(work)

    def fill() -> None:
        while has_room():
            chunk = next(source, None)
            if chunk is None:
                return
            pending[submit(chunk)] = None

    fill()
    if on_ready is not None:
        on_ready()
    while pending:
        for handle in wait_done([next(iter(pending))] if ordered else list(pending)):
            del pending[handle]
            on_results(take(handle))
        fill()


class LocalEngine:
    """Run chunks in this process (one worker) or in a pool of worker processes."""

    def __init__(self, spec: Spec, workers: int, start_method: str | None = None) -> None:
        self.spec, self.workers = spec, max(1, int(workers))
        fork = sys.platform.startswith("linux") and spec.device == "cpu"
        self.start_method = start_method or ("fork" if fork else "spawn")

    def run(self, work: Iterable[list[Task]], on_results: Callable[[list[Result]], None],
            on_ready: Callable[[], None] | None = None, ordered: bool = False) -> None:
        """Run every chunk of ``work``; ``on_results`` gets each chunk's results in this process,
        as chunks finish (in submission order with ``ordered``: ``--strict`` then stops at the
        first failing file in input order, whatever the timing). ``on_ready`` is called once the
        workers exist (start progress bars there: their threads must not be forked)."""
        if self.workers == 1:
            self._run_here(work, on_results, on_ready)
        else:
            self._run_pool(work, on_results, on_ready, ordered)

    def _run_here(self, work: Iterable[list[Task]], on_results: Callable[[list[Result]], None],
                  on_ready: Callable[[], None] | None) -> None:
        threads = torch.get_num_threads()
        if self.spec.device == "cpu":
            torch.set_num_threads(1)  # small per-batch tensors: more threads only spin
        ctx = Context(self.spec, Budget(self.spec.budget_bytes))
        try:
            if on_ready is not None:
                on_ready()
            for chunk in work:
                on_results(ctx.run(chunk))
        finally:
            ctx.close()
            torch.set_num_threads(threads)

    def _run_pool(self, work: Iterable[list[Task]], on_results: Callable[[list[Result]], None],
                  on_ready: Callable[[], None] | None, ordered: bool) -> None:
        import multiprocessing as mp

        ctx = mp.get_context(self.start_method)
        value, cond = ctx.Value("q", 0, lock=False), ctx.Condition()
        pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=init_worker,
                                   initargs=(self.spec, self.spec.budget_bytes, value, cond, os.getpid()))
        pending: dict[Future, None] = {}  # insertion-ordered
        window = 2 * self.workers
        ok = False
        try:
            drive(work, pending, submit=lambda chunk: pool.submit(run_chunk, chunk),
                  has_room=lambda: len(pending) < window,
                  wait_done=lambda futures: list(wait(futures, return_when=FIRST_COMPLETED)[0]),
                  take=lambda fut: fut.result(), on_results=on_results, on_ready=on_ready, ordered=ordered)
            ok = True
        except BrokenProcessPool:
            raise WorkerDied("a worker process died (killed by the system, often for lack of memory: "
                             "lower --memory or --workers); rerun the same command to resume") from None
        finally:
            if ok:
                pool.shutdown(wait=True)
            else:
                self._stop(pool, pending, on_results)

    @staticmethod
    def _stop(pool: ProcessPoolExecutor, pending: dict[Future, None],
              on_results: Callable[[list[Result]], None]) -> None:
        """Stop at once: cancel what has not started, kill the workers, keep what had finished."""
        for fut in pending:
            fut.cancel()
        processes = list(getattr(pool, "_processes", {}).values())
        for proc in processes:
            if proc.is_alive():
                proc.kill()
        pool.shutdown(wait=True, cancel_futures=True)
        for fut in pending:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                try:
                    on_results(fut.result())
                except ProtectError:  # --strict: the run is already stopping
                    pass
