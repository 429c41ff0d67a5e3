"""The cells of a verification: one attacker trained on one set, reused, cached or trained, and saved.

A :class:`Cell` is an :class:`verify.attacker.Attacker` with the set it trains on (``role``:
``"protected"``, or ``"clean"`` for a baseline) and its label in the progress lines.
:func:`train_attacker` trains one (the one function of one attacker). :class:`CellRunner` runs the
plan of :func:`verify.run.verify_sets`: every cell is reused from the report's finished cells
(``<report>/cells``, :class:`verify.store.CellStore`), else a clean baseline comes from the baseline
cache (:class:`verify.store.BaselineCache`), else it trains, here or as a Ray task
(:mod:`verify.ray_cells`); each is saved as soon as it is there, so an interrupted run resumes.
:class:`RunClock` keeps the run's total and the estimate of the time left.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import distributed
from .attacker import Attacker
from .data import TensorSet
from .recipes import Recipe
from .store import BaselineCache, CellStore, cell_key
from .train import CellResult, train_cell

__all__ = ["Cell", "CellRunner", "RunClock", "train_attacker"]

log = logging.getLogger(__name__)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 07 min``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


@dataclass(frozen=True)
class Cell:
    """One cell of the plan: ``attacker`` trained on the ``role`` set, shown as ``label``."""

    role: str
    attacker: Attacker
    label: str

    @property
    def clock_key(self) -> tuple:
        a = self.attacker
        return (a.regime.name, self.role, a.defense.name, a.seed)


def train_attacker(data: TensorSet, test: TensorSet, recipe: Recipe, attacker: Attacker,
                   device: str | torch.device, progress: Any = None, label: str | None = None,
                   val: TensorSet | None = None, read: bool = True) -> CellResult:
    """Train ``attacker`` on ``data`` and score it on ``test`` (epoch chosen on ``val``): one cell.
    ``read``: the attacker also reads the answers (:func:`verify.train.train_cell`; False for a
    clean baseline).
    An attacker at a resolution R trains on sets loaded at R x R (:func:`verify.data.load_folder`'s
    ``resolution``); ValueError for sets of another size."""
    if attacker.resolution != "native":
        size = int(attacker.resolution)
        for what, s in (("training", data), ("test", test), ("validation", val)):
            if s is not None and tuple(s.x.shape[2:]) != (size, size):
                raise ValueError(f"attacker at {size} px, but the {what} set is {tuple(s.x.shape[2:])}: load it at "
                                 f"that resolution")
    return train_cell(data, test, recipe, attacker.regime, attacker.defense, attacker.seed, device,
                      progress=progress, label=label, val=val, read=read)


class RunClock:
    """The whole grid's progress: cells done of all, time elapsed, and an estimate of the time left.

    ``cells``: ``(key, weight)`` per cell of the grid, ``key[0]`` its training regime and ``weight``
    the relative cost of its epochs (1 for ERM, 1 + attack steps for adversarial training, times
    its epochs over the tier's). The estimate sums, over the cells not done, the mean seconds of the
    cells of the same regime trained in this run, else the mean seconds per weight of all trained
    cells times the cell's weight; None before any cell trained. Reused and cached cells count as
    done and add no time. ``parallel`` (Ray: cells train at once): the sum is scaled by the wall
    time over the trained seconds."""

    def __init__(self, cells: Sequence[tuple[tuple, float]], parallel: bool = False) -> None:
        self.weights = dict(cells)
        self.pending = set(self.weights)
        self.trained: dict[Any, list[tuple[float, float]]] = {}  # regime -> (seconds, weight) trained here
        self.parallel = parallel
        self.started = time.perf_counter()

    @property
    def total(self) -> int:
        return len(self.weights)

    @property
    def done(self) -> int:
        return self.total - len(self.pending)

    def finish(self, key: tuple, trained_s: float | None = None) -> None:
        """Cell ``key`` is there: trained in ``trained_s`` seconds, or (None) reused or cached."""
        if key not in self.pending:
            return
        self.pending.discard(key)
        if trained_s is not None:
            self.trained.setdefault(key[0], []).append((float(trained_s), self.weights[key]))

    def remaining_s(self) -> float | None:
        """Estimated seconds until every cell is done (None: no cell trained yet)."""
        if not self.pending:
            return 0.0
        runs = [r for v in self.trained.values() for r in v]
        if not runs:
            return None
        spent = sum(s for s, _ in runs)
        per_unit = spent / sum(w for _, w in runs)
        left = 0.0
        for key in self.pending:
            same = self.trained.get(key[0])
            left += sum(s for s, _ in same) / len(same) if same else per_unit * self.weights[key]
        if self.parallel and spent > 0:
            left *= min(1.0, (time.perf_counter() - self.started) / spent)
        return left

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        if not self.pending:
            return f"verify: {self.total}/{self.total} cells done in {_duration(elapsed)}"
        left = self.remaining_s()
        estimate = ("estimate after the first trained cell" if left is None
                    else f"about {_duration(left)} left if the rest train")
        return f"verify: {self.done}/{self.total} cells done, {_duration(elapsed)} elapsed, {estimate}"


class CellRunner:
    """Runs the cells of one verification (see the module doc).

    ``sets``: the training set of each role; ``say``: one progress line (None: silent); ``lines``:
    one line when a cell starts and ends (no bars); ``bars``: a tqdm bar per cell; ``progress``: a
    callable passed on to :func:`verify.train.train_cell`, else False; ``labels_id``: the labelling's
    fingerprint, for the files' readers; ``metric``: the score's metric (``"accuracy"`` or
    ``"balanced_accuracy"``)."""

    def __init__(self, *, sets: dict[str, TensorSet | None], test: TensorSet, val: TensorSet | None,
                 recipe: Recipe, device: torch.device, cache: BaselineCache, store: CellStore, fresh: bool,
                 labels_id: str, say: Callable[[str], None], lines: bool, bars: bool,
                 progress: Callable | bool, engine: str, metric: str, clock: RunClock) -> None:
        self.sets, self.test, self.val, self.recipe, self.device = sets, test, val, recipe, device
        self.cache, self.store, self.fresh, self.labels_id = cache, store, fresh, labels_id
        self.say, self.lines, self.bars, self.progress = say, lines, bars, progress
        self.engine, self.metric, self.clock = engine, metric, clock
        self.main = distributed.is_main()

    def data(self, cell: Cell) -> TensorSet:
        data = self.sets.get(cell.role)
        assert data is not None, cell.role
        return data

    def key(self, cell: Cell) -> str:
        a = cell.attacker
        return cell_key(self.data(cell), self.test, self.recipe, a.regime, a.defense, a.seed, role=cell.role,
                        val=self.val)

    def cache_key(self, cell: Cell) -> str:
        a = cell.attacker
        return cell_key(self.data(cell), self.test, self.recipe, a.regime, a.defense.name, a.seed, val=self.val)

    def saved(self, cell: Cell) -> tuple[CellResult, bool] | None:
        """The cell as a finished earlier run saved it in the report's cells: (result, from cache)."""
        # Rank 0 decides (files shared by all processes must not be read half-written) and tells the others.
        saved = distributed.broadcast_object(self.store.get(self.key(cell)) if self.main and not self.fresh else None)
        if saved is None:
            return None
        result, meta = saved
        self.store.reused += 1
        if cell.role == "clean" and self.cache.root is not None:
            # count the lookup the original run made, so the certificate matches an uninterrupted run
            self.cache.hits += meta.get("baseline_cache") == "hit"
            self.cache.misses += meta.get("baseline_cache") == "miss"
        log.info("%s: reused from %s (accuracy %.3f)", cell.label, self.store.root, result.acc)
        self.say(f"{cell.label}: finished before, reused (accuracy {_pct(result.acc)} at epoch "
                 f"{result.selected_epoch}, final {_pct(result.final_acc)})")
        self.clock.finish(cell.clock_key)
        self.say(self.clock.line())
        return result, bool(meta.get("cached", False))

    def cached_baseline(self, cell: Cell) -> tuple[CellResult | None, str | None]:
        """A clean baseline from the cache: (result or None, the lookup: "hit", "miss" or None)."""
        if cell.role != "clean" or self.fresh:
            return None, None
        hit = distributed.broadcast_object(self.cache.get(self.cache_key(cell)) if self.main else None)
        lookup = None if self.cache.root is None else ("hit" if hit is not None else "miss")
        if hit is not None:
            log.info("%s: clean baseline from cache (accuracy %.3f)", cell.label, hit.acc)
            self.say(f"{cell.label}: cached clean baseline, accuracy {_pct(hit.acc)} at epoch {hit.selected_epoch}")
        return hit, lookup

    def trained(self, cell: Cell, result: CellResult) -> None:
        """Count, cache (a clean baseline) and report a cell that has just been trained."""
        self.store.trained += 1
        a = cell.attacker
        if cell.role == "clean" and self.main:
            self.cache.put(self.cache_key(cell), result, {
                "clean_root": str(self.data(cell).root), "tier": self.recipe.tier, "training": a.regime.name,
                "defense": a.defense.name, "seed": a.seed, "labels": self.labels_id, "attacker": a.spec()})
        log.info("%s: accuracy %.3f (epoch %s) final %.3f (%.0f s)", cell.label, result.acc, result.selected_epoch,
                 result.final_acc, result.wall_s)
        if self.lines or (self.bars and self.engine == "ray"):  # no bars for cells trained elsewhere: one line each
            medical = ""
            if self.metric == "balanced_accuracy" and result.balanced_acc is not None:
                auc = "n/a" if result.auc is None else f"{result.auc:.3f}"
                medical = f", balanced {_pct(result.balanced_acc)}, AUC {auc}"
            back = (result.guard_restored_epoch if result.guard_restored_epoch is not None
                    else (result.guard_fired_epoch or 1) - 1)
            guard = (f", catastrophic overfitting by epoch {result.guard_fired_epoch}: back to epoch "
                     f"{back}, the rest with PGD-2" if result.guard_fired_epoch else "")
            self.say(f"{cell.label}: accuracy {_pct(result.acc)} at epoch {result.selected_epoch} (chosen on "
                     f"validation), final {_pct(result.final_acc)}, train {_pct(result.train_acc)}{medical}{guard} "
                     f"({result.wall_s:.0f} s)")

    def save(self, cell: Cell, result: CellResult, cached: bool, lookup: str | None) -> None:
        """Save a cell in the report's cells as soon as it is there."""
        a = cell.attacker
        if self.main:
            self.store.put(self.key(cell), result, {
                "role": cell.role, "tier": self.recipe.tier, "training": a.regime.name, "defense": a.defense.name,
                "seed": a.seed, "cached": cached, "baseline_cache": lookup, "train_root": str(self.data(cell).root),
                "test_root": str(self.test.root), "labels": self.labels_id, "attacker": a.spec()})
        self.clock.finish(cell.clock_key, None if cached else result.wall_s)
        self.say(self.clock.line())

    def run(self, cell: Cell) -> tuple[CellResult, bool]:
        """One cell here: reused from the report's cells, else from the baseline cache (clean), else
        trained; saved in the report's cells as soon as it is there. Returns (result, from cache)."""
        reused = self.saved(cell)
        if reused is not None:
            return reused
        result, lookup = self.cached_baseline(cell)
        cached = result is not None
        if result is None:
            data = self.data(cell)
            if self.lines:  # no bar shows that it started
                cell_recipe = self.recipe.for_training(cell.attacker.regime)
                self.say(f"{cell.label}: training {cell.attacker.learner} ({_count(cell_recipe.epochs, 'epoch')} on "
                         f"{_count(len(data), 'image')})")
            result = train_attacker(data, self.test, self.recipe, cell.attacker, self.device,
                                    progress=True if self.bars else self.progress, label=cell.label, val=self.val,
                                    read=cell.role != "clean")
            self.trained(cell, result)
        self.save(cell, result, cached, lookup)
        return result, cached

    def run_all(self, cells: Sequence[Cell]) -> dict[int, tuple[CellResult, bool]]:
        """Every cell of the plan: plan position -> (result, from cache). On Ctrl-C the cells that
        finished are saved already and the interruption goes on to the caller."""
        outcomes: dict[int, tuple[CellResult, bool]] = {}
        try:
            if self.engine == "ray":
                from .ray_cells import run_grid

                run_grid(cells, outcomes, self)
            else:
                for i, cell in enumerate(cells):
                    outcomes[i] = self.run(cell)
        except KeyboardInterrupt:
            if self.store.root is not None and self.main:  # every cell that finished is saved
                log.warning("verify interrupted: %d of %d cells are saved in %s", len(outcomes), len(cells),
                            self.store.root)
                self.say(f"verify: {len(outcomes)} of {len(cells)} cells are saved in {self.store.root}; the same "
                         f"command resumes")
            raise
        return outcomes
