"""Verification cells on a Ray cluster (``protect verify --engine ray``).

Every cell that must train (training regime x defense x seed, and the clean baselines) is one Ray
task running the same :func:`verify.cells.train_attacker` as a local run, with the same seed, so each
cell gives the same numbers as a local run on the same kind of device with the same thread count
(a cell on Ray uses one CPU thread, or one GPU). The data sets are put in the object store once;
each task asks for one CPU, or one GPU when the device is CUDA. The driver (this process) decides
which cells are reused from the report folder or the baseline cache, saves every cell in the
report's cell store as soon as its task finishes, and writes the one certificate
(:mod:`verify.run`); an interrupted run therefore resumes as a local one does.

The cluster is reached as for ``protect images --engine ray`` (:func:`protect.ray_engine.connect`):
``RAY_ADDRESS``, or a private local cluster with one CPU per core, stopped at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from protect.engine import default_workers
from protect.ray_engine import LOCAL_OBJECT_STORE, cluster_slots, connect, disconnect, require_ray, unwrap

from .attacker import Attacker
from .data import TensorSet
from .recipes import Recipe
from .cells import Cell, CellRunner, train_attacker
from .train import CellResult

__all__ = ["CellJob", "run_cells", "run_grid"]

log = logging.getLogger(__name__)


@dataclass
class CellJob:
    """One cell to train: where it sits in the plan, the cell, and its baseline-cache lookup."""

    index: int
    cell: Cell
    lookup: str | None = None


def _train(data: TensorSet, test: TensorSet, recipe: Recipe, attacker: Attacker, device: str, label: str,
           val: TensorSet | None = None, read: bool = True) -> CellResult:
    """The Ray task: one cell, silent, on this worker's CPU thread or its GPU."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver handles Ctrl-C and cancels the tasks
    if device == "cpu":
        torch.set_num_threads(1)
    return train_attacker(data, test, recipe, attacker, device, progress=False, label=label, val=val, read=read)


def run_cells(jobs: Sequence[CellJob], sets: dict[str, TensorSet], test: TensorSet, recipe: Recipe,
              device: torch.device, on_done: Callable[[CellJob, CellResult], None],
              val: TensorSet | None = None) -> None:
    """Train ``jobs`` as Ray tasks; ``on_done(job, result)`` runs in this process as each finishes.
    ``sets`` maps a job's role to its training set. On any error or Ctrl-C the tasks still running
    are cancelled (the cells already passed to ``on_done`` are kept by the caller). ``val``: the
    validation set that chooses each cell's epoch."""
    if not jobs:
        return
    ray = require_ray()
    gpu = device.type == "cuda"
    shared = [s for s in (*sets.values(), test, val) if s is not None]
    size = sum(s.x.numel() * s.x.element_size() + s.y.numel() * 8 for s in shared)
    owner = connect(default_workers(), max(LOCAL_OBJECT_STORE, 2 * size + (64 << 20)))
    pending: dict[Any, CellJob] = {}
    try:
        slots = cluster_slots(gpu)
        log.info("verify: %d cell(s) on Ray, %d at a time", len(jobs), min(slots, len(jobs)))
        refs = {role: ray.put(s) for role, s in sets.items()}
        test_ref = ray.put(test)
        val_ref = ray.put(val) if val is not None else None
        task = ray.remote(_train).options(num_gpus=1, num_cpus=1, max_retries=0) if gpu else \
            ray.remote(_train).options(num_cpus=1, max_retries=0)
        where = "cuda" if gpu else "cpu"  # a task sees its own GPU only, as device 0
        for job in jobs:
            ref = task.remote(refs[job.cell.role], test_ref, recipe, job.cell.attacker, where, job.cell.label, val_ref,
                              job.cell.role != "clean")
            pending[ref] = job
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                job = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    raise unwrap(exc) from None
                on_done(job, result)
    finally:
        for ref in pending:
            try:
                ray.cancel(ref, force=True)
            except Exception as exc:  # noqa: BLE001 - a finished or lost task: nothing to cancel
                log.debug("ray: cannot cancel a cell: %s", exc)
        if owner:
            disconnect()


def run_grid(cells: Sequence[Cell], outcomes: dict[int, tuple[CellResult, bool]], runner: CellRunner) -> None:
    """Fill ``outcomes`` (plan position -> (result, from cache)) for the plan of
    :func:`verify.run.verify_sets`: reused and cached cells here, in plan order, with ``runner``,
    then every other cell as one Ray task, each reported and saved as it finishes."""
    jobs = []
    for i, cell in enumerate(cells):
        reused = runner.saved(cell)
        if reused is not None:
            outcomes[i] = reused
            continue
        hit, lookup = runner.cached_baseline(cell)
        if hit is not None:
            runner.save(cell, hit, True, lookup)
            outcomes[i] = (hit, True)
            continue
        jobs.append(CellJob(i, cell, lookup))

    def done(job: CellJob, result: CellResult) -> None:
        runner.trained(job.cell, result)
        runner.save(job.cell, result, False, job.lookup)
        outcomes[job.index] = (result, False)

    run_cells(jobs, {k: v for k, v in runner.sets.items() if v is not None}, runner.test, runner.recipe,
              runner.device, done, runner.val)
