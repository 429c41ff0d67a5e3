"""``verify_folder``: the whole verification of a protected folder, from folders to certificate.

Loads the protected training folder, the clean test folder and (optionally) the clean training
folder; checks that their class maps agree; trains the grid of cells (training regime x defense x
seed) on the protected data and the clean baselines; scores them (:mod:`verify.certificate`); writes
``certificate.json``, ``report.md``, ``curves.png`` and ``samples.png``; returns the certificate.
Each cell is one attacker (:class:`verify.attacker.Attacker`: learner, regime, defense, resolution,
seed) on one training set; :func:`plan_cells` lists them, :class:`verify.cells.CellRunner` reuses,
caches, trains and saves them, and :func:`score_cells` turns them into the certificate's cells.

**Resumable.** Every finished cell is saved at once in ``<report>/cells/`` (:class:`verify.store.CellStore`,
one small JSON file per cell, written atomically and named by the hash of everything that determines
the cell: data hashes, recipe, regime with eps and attack, defense, seed, format version). A run that
is interrupted (Ctrl-C, kill -9) and started again with the same command reuses every finished cell
and trains only the rest; its certificate equals an uninterrupted run's (up to wall times). A changed
input or option changes the hash, so nothing stale is reused; ``fresh=True`` (``--fresh``) retrains
everything. Cells of other settings in the same folder are kept, so adding a defense to a finished
run trains only the new cells.

**Clean baselines** are also cached across runs under ``cache_dir`` (default ``$PROTECT_CACHE`` or
``~/.cache/protect/baselines``, :class:`verify.store.BaselineCache`), keyed the same way, so repeated
runs on the same clean data reuse them instead of retraining.

**Chance** is the majority-class rate of the test set (the accuracy of always answering its most
frequent class; 1/K on a balanced test set), the floor a model reaches without learning anything.

**Imbalanced test sets** (:func:`verify.metrics.score_basis`): every evaluation also measures
balanced accuracy and macro AUC. When some class count of the test set is more than 10 % from the
mean count, the score and the verdict use balanced accuracy with chance 1/K (``score_metric`` and
``score_chance`` in the certificate); otherwise accuracy with the majority-class rate, as before.
Saved cells and cached baselines of older versions (without these metrics) are keyed by an older
format version (:data:`verify.store.CACHE_VERSION`), so they are never reused: those cells train again.

**Relabelling** (``relabel``, ``--relabel``, :mod:`verify.relabel`): the attacker trains and is
scored on remapped labels (a JSON map or ``random:N``), applied to the protected, clean and test
sets after their class folders are checked against each other; chance, baselines and scores then
use the attacker's classes, and the certificate's ``labelling`` records the map and its source.
The remapped sets' hashes cover the map, so no saved cell or cached baseline crosses labellings.

**Progress** (``progress=True``): a tqdm bar per cell when stderr is a terminal; otherwise (a log
file, CI, a pipe) one line when a cell starts training and one when it ends, and no bars. Either way,
one line per phase (loading each folder, the grid, writing the report) and, after every cell, the
run's total (:class:`RunClock`): cells done of all, the time elapsed and an estimate of the time
left for the whole run (the mean seconds of the cells this run trained, per training regime, else
scaled by the regime's attack steps; it assumes the remaining cells train).

**On Ray** (``engine="ray"``, ``--engine ray``, :mod:`verify.ray_cells`): the reused and cached
cells are decided here as above, then every cell that must train is one Ray task (one CPU, or one
GPU), saved in the report's cells as it finishes; this process writes the one certificate, with the
same cells and numbers as a local run with the same seeds on the same kind of device and thread count.

Multi-GPU: under ``torchrun`` every process runs the same call; each cell is then trained
data-parallel with DDP across the processes (:mod:`verify.distributed`), and only rank 0 prints,
writes the cache, the finished cells and the report; rank 0 decides which saved cells are reused
and broadcasts them, so every process skips the same cells. Without ``torchrun``, the grid can also
be split by hand: one process per GPU (``CUDA_VISIBLE_DEVICES``) with a share of the grid and a
shared ``PROTECT_CACHE``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from perturbations.errors import ConfigError, InputError

from . import defenses as defense_registry
from . import distributed
from .attacker import plan_attackers
from .cells import Cell, CellRunner, RunClock, _count, _duration, _pct
from .certificate import build_certificate, cell_entry, chance_level, save_certificate, summarize_runs
from .data import TensorSet, check_same_classes, find_overlap, image_sizes, load_folder
from .metrics import score_basis
from .grid import DEFAULT_DEFENSES, DEFAULT_TRAININGS, Grid, breakers_report, build_grid, recorded_method
from .recipes import PAPER_REFERENCE, Recipe, Training, fit_to_data, get_recipe, parse_trainings, reference_differences
from .relabel import Labelling, RelabelSpec, parse_relabel
from .report import write_report
from .store import CACHE_VERSION, BaselineCache, CellStore, default_cache_dir
from .train import CellResult, resolve_device
from .resolutions import (combine_resolutions, default_resolutions, excluded_reason, parse_resolutions,
                          resolution_entry, resolution_label)
from .uncertainty import bootstrap_interval, bootstrap_min_interval, split_holdout, split_validation

__all__ = [
    "CACHE_VERSION",
    "DEFAULT_DEFENSES",
    "DEFAULT_TRAININGS",
    "BaselineCache",
    "CellStore",
    "RunClock",
    "check_options",
    "default_cache_dir",
    "verify_folder",
    "verify_sets",
]

log = logging.getLogger(__name__)

#: Training sets smaller than this train every cell with SMALL_SET_SEEDS seeds by default: one
#: seed's number is too noisy there (single-seed scores of one BreastMNIST set ranged 0.07-0.34).
SMALL_SET, SMALL_SET_SEEDS = 2000, 3


def default_seeds(n_train: int) -> int:
    """Seeds per cell when none are given: SMALL_SET_SEEDS below SMALL_SET training images, else 1."""
    return SMALL_SET_SEEDS if n_train < SMALL_SET else 1
CELLS_DIR = "cells"
#: Where the cells train (``--engine``).
ENGINES = ("local", "ray")


def _seed_list(seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, bool):
        raise ConfigError(f"seeds must be a count or a list of integers, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ConfigError(f"seeds must be at least 1, got {seeds}")
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out or len(set(out)) != len(out):
        raise ConfigError(f"seeds must be a non-empty list of distinct integers, got {list(seeds)!r}")
    return out


def _check_shapes(a: TensorSet, b: TensorSet, name_a: str, name_b: str) -> None:
    if a.x.shape[1:] != b.x.shape[1:]:
        ca, ha, wa = a.x.shape[1:]
        cb, hb, wb = b.x.shape[1:]
        raise InputError(
            f"{name_a} images are {wa}x{ha} with {ca} channel(s) but {name_b} images are {wb}x{hb} with "
            f"{cb} channel(s): verification needs one size and channel count"
        )


def _check_overlap(test: TensorSet, training: dict[str, TensorSet | None], what: str = "test") -> None:
    """InputError naming a ``what`` image whose pixels are also in a training set."""
    for name, data in training.items():
        if data is None:
            continue
        hit = find_overlap(test, data)
        if hit is not None:
            raise InputError(f"{what} image {hit[0]} is also in the {name} training folder ({hit[1]}): a model scored "
                             f"on images it trained on measures memory; use a disjoint {what} set (or --allow-overlap)")


def _labelling(relabel: str | os.PathLike | RelabelSpec | Labelling | None, classes: list[str]) -> Labelling | None:
    """The attacker's labelling for data with ``classes`` (None: the data's own labels)."""
    if relabel is None or isinstance(relabel, Labelling):
        if relabel is not None:
            relabel.check(classes)
        return relabel
    spec = relabel if isinstance(relabel, RelabelSpec) else parse_relabel(relabel)
    return spec.resolve(classes)


def _check_engine(engine: str) -> None:
    """A known engine; Ray installed for ``ray``, and not under torchrun (one driver, many tasks)."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine '{engine}'; use {' or '.join(ENGINES)}")
    if engine == "ray":
        from protect.ray_engine import require_ray

        require_ray()
        if distributed.env_world_size() > 1:
            raise ConfigError("--engine ray runs every cell as a Ray task from one process: do not start it "
                              "under torchrun")


def _default_report_dir(protected_dir: Path) -> Path:
    return protected_dir.parent / f"{protected_dir.name}.verify"


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def plan_cells(grid_: Grid, recipe: Recipe, seeds: Sequence[int], with_clean: bool,
               baseline_per_defense: bool = False, resolution: str = "native") -> list[Cell]:
    """The cells to train, in order: per regime its clean baseline(s) (``with_clean``: under no
    defense, or under each of its defenses with ``baseline_per_defense``), then its protected cells;
    the clean ERM reference of the headline first when the grid has no ERM regime; every seed of a
    pair after the other. Labels ``[i/N] role regime/defense seed S``."""
    regimes = grid_.regimes
    pairs: list[tuple[str, Training, defense_registry.Defense]] = []  # (role, training, defense)
    erm, no_defense = parse_trainings("erm", recipe)[0], defense_registry.get("none")
    if with_clean and erm not in regimes:  # the headline's reference: clean ERM, no defense
        pairs.append(("clean", erm, no_defense))
    for t in regimes:
        if with_clean:
            for d in ([d for tt, d in grid_.pairs if tt == t] if baseline_per_defense else [no_defense]):
                pairs.append(("clean", t, d))
        pairs += [("protected", t, d) for tt, d in grid_.pairs if tt == t]
    total = len(pairs) * len(seeds)
    out: list[Cell] = []
    for role, t, d in pairs:
        for a in plan_attackers([(t, d)], recipe, seeds, resolution):
            out.append(Cell(role, a, f"[{len(out) + 1}/{total}] {role} {a.name} seed {a.seed}"))
    return out


def score_cells(grid_: Grid, plan: Sequence[Cell], outcomes: dict[int, tuple[CellResult, bool]], test: TensorSet,
                metric: str, score_chance: float, baseline_per_defense: bool = False,
                ) -> tuple[list[dict], dict | None, tuple[float, float] | None, tuple | None]:
    """The certificate's cells (each with its attacker and effect), the clean ERM reference, the
    headline's bootstrap interval and the predictions it was drawn from (``(reference, cells)``, for
    the joint interval over resolutions), from the trained ``plan`` (``outcomes``: position ->
    (result, cached))."""
    protected_runs: dict[tuple[str, str], list[CellResult]] = {}
    clean_runs: dict[tuple[str, str], list[CellResult]] = {}
    clean_cached: dict[tuple[str, str], list[bool]] = {}
    attackers: dict[tuple[str, str], dict] = {}
    for i, c in enumerate(plan):
        result, cached = outcomes[i]
        key = (c.attacker.regime.name, c.attacker.defense.name)
        if c.role == "clean":
            clean_runs.setdefault(key, []).append(result)
            clean_cached.setdefault(key, []).append(cached)
        else:
            protected_runs.setdefault(key, []).append(result)
            attackers.setdefault(key, c.attacker.spec())
    cells = []
    for t, d in grid_.pairs:
        base_d = d.name if baseline_per_defense else "none"
        cells.append(cell_entry(
            t.name, d.name, protected_runs[(t.name, d.name)], clean_runs.get((t.name, base_d)), score_chance,
            baseline_defense=base_d, clean_cached=clean_cached.get((t.name, base_d)),
            extra={"eps": t.eps if t.adversarial else None, "attacker": attackers[(t.name, d.name)]}, metric=metric,
        ))
    reference_runs = clean_runs.get(("erm", "none"))
    if not reference_runs:
        return cells, None, None, None
    reference = summarize_runs(reference_runs, clean_cached.get(("erm", "none")))
    group = ([r.test_pred for r in reference_runs],
             [[r.test_pred for r in protected_runs[(t.name, d.name)]] for t, d in grid_.pairs])
    interval = bootstrap_interval(*group, test.y.tolist(), metric, score_chance)
    log.debug("verify: reference %s, interval %s", reference.get("acc"), interval)
    return cells, reference, interval, group


def verify_sets(
    protected: TensorSet,
    test: TensorSet,
    clean: TensorSet | None = None,
    tier: str | Recipe = "quick",
    trainings: str | Sequence[str] | None = None,
    defenses: str | Sequence[str] | None = None,
    seeds: int | Sequence[int] | None = None,
    model: str | None = None,
    epochs: int | None = None,
    device: str | torch.device = "auto",
    report_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None | bool = None,
    baseline_per_defense: bool = False,
    progress: bool | Any = True,
    fresh: bool = False,
    relabel: str | os.PathLike | RelabelSpec | Labelling | None = None,
    engine: str = "local",
    val: TensorSet | None = None,
    allow_overlap: bool = False,
    method: str | None = None,
    holdout: dict | None = None,
    resolution: int | None = None,
    _collect: dict | None = None,
) -> dict:
    """:func:`verify_folder` on data already in memory (``report_dir=None`` writes no files and
    keeps no finished cells; ``cache_dir=False`` disables the baseline cache). ``relabel``: a
    ``--relabel`` value, a parsed :class:`RelabelSpec` or a :class:`Labelling` (None: the data's labels).
    ``val``: the validation images that choose each cell's epoch (None: a keyed split of ``test``,
    :func:`verify.uncertainty.split_validation`; the rest of ``test`` is then what is scored).
    ``allow_overlap``: accept a test image whose pixels are also in a training set (else InputError).
    ``method``: the method that protected the data; with the default grid (``trainings`` and
    ``defenses`` None) its published breakers join the grid (:mod:`verify.grid`). ``holdout``: how
    the test set was held out of the clean images (:func:`verify.uncertainty.split_holdout`'s info),
    recorded in the certificate's ``data``. ``resolution``: the size R the sets were loaded at
    (:func:`verify.data.load_folder`'s ``resolution``; None: their own size), recorded in every
    attacker and in the certificate."""
    started = time.perf_counter()
    recipe = get_recipe(tier, model=model, epochs=epochs)
    _check_engine(engine)
    dev = resolve_device(distributed.setup(device))  # joins the torchrun group first: rank 0 alone prints
    main = distributed.is_main()
    # progress=True: bars on a terminal, else one line per finished cell (logs and CI stay readable)
    bars = progress is True and main and _stderr_is_terminal()
    lines = progress is True and main and not bars

    def say(text: str) -> None:
        if progress is True and main:
            print(text, file=sys.stderr, flush=True)

    adapted = fit_to_data(recipe, len(protected))
    if adapted is not recipe:
        note = (f"only {len(protected)} training images: training with batch {adapted.batch_size} for "
                f"{adapted.epochs} epochs (at least {adapted.min_steps} steps; --epochs N overrides)")
        log.info("verify: %s", note)
        say(f"note: {note}")
        recipe = adapted
    grid_ = build_grid(trainings, defenses, recipe, method)
    regimes = grid_.regimes
    seed_list = _seed_list(default_seeds(len(protected)) if seeds is None else seeds)
    check_same_classes(test.classes, protected.classes, "test", "protected")
    _check_shapes(protected, test, "protected", "test")
    if val is not None:
        check_same_classes(val.classes, protected.classes, "validation", "protected")
        _check_shapes(protected, val, "protected", "validation")
    shape = tuple(int(v) for v in protected.x.shape[1:])
    grid_ = dataclasses.replace(grid_, pairs=tuple((t.for_shape(shape), d) for t, d in grid_.pairs))  # L2 budgets
    regimes = grid_.regimes
    if not allow_overlap:
        _check_overlap(test, {"protected": protected, "clean": clean})
        if val is not None:
            _check_overlap(val, {"protected": protected, "clean": clean}, "validation")
    if val is None:
        val, test = split_validation(test)
        if not len(val):  # every class has a single test image: none can be held back
            raise ConfigError(f"the {len(test)} test images hold fewer than 2 of every class, so none can be kept "
                              "apart to choose each cell's epoch: give at least 2 test images of a class (a larger "
                              "--holdout or test folder) or a validation folder with --val")
        say(f"verify: {len(val)} of the {len(val) + len(test)} test images choose each cell's epoch (validation), "
            f"the other {len(test)} are scored")
    if clean is not None:
        check_same_classes(clean.classes, protected.classes, "clean", "protected")
        _check_shapes(protected, clean, "protected", "clean")
    labelling = _labelling(relabel, protected.classes)
    originals = (protected, clean)  # samples.png shows the data's own class names
    if labelling is not None:
        protected, test, val = labelling.apply(protected), labelling.apply(test), labelling.apply(val)
        clean = labelling.apply(clean) if clean is not None else None
        note = (f"relabelled: {len(labelling.classes)} attacker classes {labelling.classes} "
                f"from {labelling.describe_source()}")
        log.info("verify: %s", note)
        say(f"note: {note}")
    cache = BaselineCache(None if cache_dir is False else (cache_dir if cache_dir is not None else default_cache_dir()))
    store = CellStore(Path(report_dir) / CELLS_DIR if report_dir is not None else None)
    chance, chance_class = chance_level(test.counts(), test.classes)
    metric, score_chance = score_basis(test.counts())
    if metric != "accuracy":
        note = (f"the test set is imbalanced ({test.counts()} images per class): the score uses balanced "
                f"accuracy, chance {_pct(score_chance)} (plain accuracy's chance is {_pct(chance)})")
        log.info("verify: %s", note)
        say(f"note: {note}")

    cells_plan = plan_cells(grid_, recipe, seed_list, clean is not None, baseline_per_defense,
                            "native" if resolution is None else str(int(resolution)))
    total = len(cells_plan)
    log.info("verify: %s tier, %d cells x %d seed(s) on %s", recipe.tier, total // len(seed_list), len(seed_list), dev)
    clock = RunClock([(c.clock_key, (1.0 + recipe.attack(c.attacker.regime).get("steps", 0))
                       * recipe.for_training(c.attacker.regime).epochs / recipe.epochs) for c in cells_plan],
                     parallel=engine == "ray")
    n_clean = sum(c.role == "clean" for c in cells_plan)
    learners = f"{recipe.model}, {_count(recipe.epochs, 'epoch')}"
    at = next((recipe.for_training(t) for t in regimes if t.adversarial), recipe)
    if (at.model, at.epochs) != (recipe.model, recipe.epochs):
        learners += f" (adversarial training: {at.model}, {_count(at.epochs, 'epoch')})"
    say(f"verify: {total} cells ({n_clean} clean baseline(s), {total - n_clean} protected), tier {recipe.tier}, "
        f"{learners} each, on {dev}" + (" (Ray tasks)" if engine == "ray" else ""))
    labels_id = labelling.fingerprint if labelling is not None else "original"  # for the files' readers
    runner = CellRunner(sets={"protected": protected, "clean": clean}, test=test, val=val, recipe=recipe, device=dev,
                        cache=cache, store=store, fresh=fresh, labels_id=labels_id, say=say, lines=lines, bars=bars,
                        progress=progress if callable(progress) else False, engine=engine, metric=metric, clock=clock)
    outcomes = runner.run_all(cells_plan)
    cells, reference, interval, group = score_cells(grid_, cells_plan, outcomes, test, metric, score_chance,
                                                    baseline_per_defense)
    data: dict[str, Any] = {"train": protected.describe(), "test": test.describe(), "validation": val.describe()}
    if holdout is not None:
        data["holdout"] = holdout
    if clean is not None:
        data["clean"] = clean.describe()
    device_name = str(dev)
    if dev.type == "cuda":
        device_name += f" ({torch.cuda.get_device_name(dev)})"
    if distributed.world() > 1:
        device_name += f" x {distributed.world()} processes (DDP)"
    extra: dict[str, Any] = {
        "resolution": resolution_entry(resolution),
        "resolutions": [resolution_entry(resolution)],
        "breakers": breakers_report(grid_),
        "baseline_cache": {"dir": str(cache.root) if cache.root else None, "hits": cache.hits, "misses": cache.misses},
        "batchnorm": distributed.batchnorm_mode(dev),
        "engine": engine,
        "resume": {"cells_dir": str(store.root) if store.root else None, "reused": store.reused,
                   "trained": store.trained, "fresh": bool(fresh)},
    }
    if recipe.tier == "paper":
        extra["reference"] = {
            "source": PAPER_REFERENCE,
            "differences": reference_differences(recipe, dev.type, distributed.world(),
                                                 distributed.uses_sync_batchnorm(dev), len(protected)),
        }
    cert = build_certificate(
        recipe=recipe, trainings=regimes, defenses=grid_.defenses, seeds=seed_list, classes=protected.classes,
        cells=cells, data=data, device=device_name, wall_s=time.perf_counter() - started,
        baseline_per_defense=baseline_per_defense, chance=chance, chance_class=chance_class, extra=extra,
        score_metric=metric, score_chance=score_chance, reference=reference, interval=interval,
        labelling=labelling.describe(originals[0].classes) if labelling is not None else None,
    )
    if _collect is not None:  # one resolution of several (verify_resolutions): the caller writes
        _collect.update(group=group, test=test, metric=metric, score_chance=score_chance, originals=originals)
        return cert
    if report_dir is not None and main:
        out = Path(report_dir)
        say(f"verify: writing the certificate and report to {out}")
        save_certificate(cert, out / "certificate.json")
        write_report(cert, out, clean=originals[1], protected=originals[0])
        log.info("verify: report written to %s", out)
    say(f"verify: finished in {_duration(time.perf_counter() - started)}")
    return cert


def _verify_resolutions(sizes: Sequence[int | None], load_sets: Any, options: dict, out: Path | None,
                        progress: bool | Any) -> dict:
    """:func:`verify_sets` at each attacker resolution in turn (one resolution's sets in memory at a
    time; every cell saved in the one report's ``cells/``), then one certificate with the headline
    over resolutions (:func:`verify.resolutions.combine_resolutions`) and its joint interval."""
    started = time.perf_counter()
    main = distributed.is_main()
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress is True and main else (lambda text: None)
    certs: list[dict] = []
    collected: list[dict] = []
    for i, size in enumerate(sizes):
        say(f"verify: attacker resolution {resolution_label(size)}"
            + ("" if size is None else f" x {size}") + f" ({i + 1} of {len(sizes)})")
        protected, test, val, clean, held, labelling = load_sets(size)
        assert test is not None
        info: dict = {}
        certs.append(verify_sets(protected, test, clean, relabel=labelling, val=val, holdout=held, resolution=size,
                                 _collect=info, **options))
        scored = info.pop("test")  # the test images scored (without the validation share)
        info["rels"], info["y"] = list(scored.rels), scored.y.tolist()
        info["originals"] = info["originals"] if i == len(sizes) - 1 else None  # samples.png: the largest size
        collected.append(info)
        del protected, test, val, clean
    interval = None
    groups = [c["group"] for c in collected]
    same_images = all(c["rels"] == collected[0]["rels"] and c["y"] == collected[0]["y"] for c in collected)
    usable = [g for g, cert in zip(groups, certs) if g is not None and excluded_reason(cert["verdict"]) is None]
    if usable and same_images and collected[0]["rels"]:
        interval = bootstrap_min_interval(usable, collected[0]["y"], collected[0]["metric"],
                                          collected[0]["score_chance"])
    elif usable and not same_images:
        log.warning("verify: the scored test images differ between resolutions: no joint interval")
    cert = combine_resolutions(certs, sizes, interval, time.perf_counter() - started)
    if out is not None and main:
        say(f"verify: writing the certificate and report to {out}")
        save_certificate(cert, out / "certificate.json")
        originals = collected[-1]["originals"]
        write_report(cert, out, clean=originals[1], protected=originals[0])
    say(f"verify: finished {len(sizes)} resolutions in {_duration(time.perf_counter() - started)}")
    return cert


def check_options(
    tier: str | Recipe = "quick",
    trainings: str | Sequence[str] | None = None,
    defenses: str | Sequence[str] | None = None,
    seeds: int | Sequence[int] | None = None,
    *,
    model: str | None = None,
    epochs: int | None = None,
    device: str | torch.device = "auto",
    engine: str = "local",
    method: str | None = None,
) -> Recipe:
    """Check :func:`verify_folder`'s attacker options without loading any data (ConfigError, one
    line, for an unknown tier, regime, defense, model, device or engine, or bad seeds); returns the
    recipe. ``protect tune`` runs it before it stages or protects anything."""
    recipe = get_recipe(tier, model=model, epochs=epochs)
    grid_ = build_grid(trainings, defenses, recipe, method)
    from .learners import learner_info

    for t in grid_.regimes:  # a pretrained learner's weights must be here: one line now, not after loading
        if t.learner is not None:
            learner_info(t.learner)
    if seeds is not None:
        _seed_list(seeds)
    resolve_device(device)
    _check_engine(engine)
    from .models import create_model

    create_model(recipe.model, 2)  # unknown model names fail here, before any data is loaded
    if recipe.at_model is not None:
        create_model(recipe.at_model, 2)
    return recipe


def verify_folder(
    protected_dir: str | os.PathLike,
    test_dir: str | os.PathLike | None,
    clean_dir: str | os.PathLike | None = None,
    tier: str | Recipe = "quick",
    trainings: str | Sequence[str] | None = None,
    defenses: str | Sequence[str] | None = None,
    seeds: int | Sequence[int] | None = None,
    model: str | None = None,
    epochs: int | None = None,
    device: str = "auto",
    report_dir: str | os.PathLike | None | bool = None,
    cache_dir: str | os.PathLike | None | bool = None,
    baseline_per_defense: bool = False,
    max_per_class: int | None = None,
    progress: bool | Any = True,
    fresh: bool = False,
    relabel: str | os.PathLike | RelabelSpec | Labelling | None = None,
    labels_csv: str | os.PathLike | None = None,
    test_labels_csv: str | os.PathLike | None = None,
    engine: str = "local",
    val_dir: str | os.PathLike | None = None,
    allow_overlap: bool = False,
    method: str | None = None,
    holdout: float | None = None,
    resolution: int | str | None = None,
) -> dict:
    """Certify how much a protected folder takes away from models trained on it.

    Args:
        protected_dir: protected training images, one sub-folder per class (or ``labels_csv``).
        test_dir: clean test images with the same class folders (or ``test_labels_csv``).
        clean_dir: the clean training images (for the baselines and the score); optional.
        tier: ``quick`` (default), ``standard`` or ``paper`` (:mod:`verify.recipes`), or a
            :class:`verify.recipes.Recipe` (e.g. ``get_recipe("quick", batch_size=64)``).
        trainings: regimes, ``"erm,linf"`` by default (``erm``, ``linf``, ``linf4``, ``l2``, ``l2@EPS``).
        defenses: ``"none,grayscale,jpeg10"`` by default (:func:`verify.defenses.available`).
        seeds: a count N (seeds 0..N-1) or a list of seeds; accuracies are averaged over seeds.
            None: 3 for training sets under 2,000 images (one seed is too noisy there), else 1.
        model, epochs: override the tier's model and epochs.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
        report_dir: where certificate.json, report.md, curves.png, samples.png and the finished
            cells (``cells/``) go; None means ``<protected_dir>.verify`` beside the protected folder;
            False writes nothing (and nothing can be resumed).
        cache_dir: clean-baseline cache (default ``$PROTECT_CACHE`` or ``~/.cache/protect/baselines``);
            False disables it.
        baseline_per_defense: train the clean baseline under every defense too (else under none).
        max_per_class: use only the first N images per class of the protected and clean folders
            (quick subsets); the test and validation sets stay whole.
        progress: True for a progress bar per cell on a terminal (one line per finished cell when
            stderr is not a terminal), False for silence, or a callback (:class:`verify.train.EpochInfo`).
        fresh: retrain every cell: ignore the finished cells in the report folder and the clean
            baseline cache (both are overwritten with the new results).
        relabel: the attacker's labels (:mod:`verify.relabel`): a JSON map file ``{class: attacker
            class}`` or ``random:N[:SEED]``, applied to all three sets; None keeps the data's labels.
        labels_csv: a ``path,label`` CSV (as for ``protect images --labels``) that labels the protected
            folder and the clean folder alike (the protected folder holds the same relative paths);
            None: their class sub-folders.
        test_labels_csv: the same for the test folder (None: its class sub-folders).
        engine: ``local`` (every cell in this process, one after another) or ``ray`` (every cell
            to train is one Ray task, :mod:`verify.ray_cells`; the same cells and numbers).
        val_dir: validation images (same classes) that choose each cell's epoch; None: a keyed 20 %
            of the test images (:func:`verify.uncertainty.split_validation`), the rest is scored.
        allow_overlap: accept test (or validation) images whose pixels are also in the protected or
            clean folder; by default that is refused (InputError naming the file).
        method: the method that protected the folder (default: the run record beside it, if any);
            the default grid adds the breakers published against it (:mod:`verify.grid`).
        holdout: with ``clean_dir`` and no ``test_dir``: a keyed, stratified fraction of the clean
            images becomes the test set and their protected copies leave the training set
            (:func:`verify.uncertainty.split_holdout`), so one folder and its originals certify.
        resolution: the attacker resolutions (:mod:`verify.resolutions`): sizes R and/or
            ``"native"`` (``"32,64"``, ``64``, ``[32, None]``); at each R every image is brought to
            R x R as an attacker's pipeline does (shorter side to R, centre crop;
            :data:`verify.data.RESIZE_RULE`), so folders of mixed sizes and orientations certify.
            Several: the grid is trained at each and the headline is the lowest score over the resolutions
            (``verdict.per_resolution``). None: the tier's default for the images' sizes
            (:func:`verify.resolutions.default_resolutions`; CIFAR-sized images: native only).

    Returns the certificate dict (schema ``protect.certificate/1``). Raises ConfigError for unknown
    tiers, regimes, defenses, models or devices, InputError for unusable folders (missing, empty,
    unlabelled, mixed sizes, class folders that differ), all one-line messages.
    """
    # Validate the options before spending time on loading.
    sizes = parse_resolutions(resolution)
    if holdout is not None:
        if test_dir is not None:
            raise ConfigError("--holdout makes the test set from --clean: leave out --test (or --holdout)")
        if clean_dir is None:
            raise ConfigError("--holdout needs the clean originals (--clean DIR): their held-out share is the test set")
        if not 0 < float(holdout) < 1:
            raise ConfigError(f"--holdout must lie between 0 and 1 (e.g. 0.2), got {holdout}")
    elif test_dir is None:
        raise ConfigError("give the clean test images (--test DIR), or --holdout F with --clean to hold out a "
                          "share of the originals")
    recipe = check_options(tier, trainings, defenses, seeds, model=model, epochs=epochs, device=device, engine=engine,
                           method=method)
    spec = parse_relabel(relabel) if isinstance(relabel, (str, os.PathLike)) else relabel  # a bad map fails early
    protected_dir = Path(protected_dir)
    if sizes is None or (None in sizes and len(sizes) > 1):  # read the sizes from the headers, nothing decoded
        header_sizes = image_sizes(protected_dir, labels_csv, max_per_class)
        if sizes is None:
            sizes = default_resolutions(recipe.tier, header_sizes)
        elif header_sizes is not None and len(set(header_sizes)) > 1:  # before any resolution trains
            shown = sorted(set(header_sizes))[:2]
            raise InputError(f"--resolution native needs images of one size, but {protected_dir} holds "
                             f"{len(set(header_sizes))} sizes ({shown[0][0]}x{shown[0][1]}, {shown[1][0]}x{shown[1][1]}, "
                             "...): leave native out (e.g. --resolution 32,64)")
    if report_dir is None:
        out: Path | None = _default_report_dir(protected_dir)
    elif report_dir is False:
        out = None
    else:
        out = Path(report_dir)  # type: ignore[arg-type]

    def load_sets(size: int | None) -> tuple[TensorSet, TensorSet | None, TensorSet | None, TensorSet | None,
                                             dict | None, Labelling | None]:
        # The loading phase's lines (the cells' come from verify_sets; under torchrun rank 0 alone
        # prints) are held until every folder loaded, so a refused folder stays one line on stderr.
        loaded: list[str] = []

        def load(name: str, root: str | os.PathLike, csv: str | os.PathLike | None, **kw: Any) -> TensorSet:
            t0 = time.perf_counter()
            data = load_folder(root, csv, name=name, resolution=size, **kw)
            at = "" if size is None else f" at {size} x {size}"
            loaded.append(f"verify: loaded the {name} folder {root}{at}: {_count(len(data), 'image')} in "
                          f"{len(data.classes)} classes ({_duration(time.perf_counter() - t0)})")
            return data

        protected = load("protected", protected_dir, labels_csv, max_per_class=max_per_class)
        labelling = spec.resolve(protected.classes) if isinstance(spec, RelabelSpec) else spec  # before the other sets
        test = None if test_dir is None else load("test", test_dir, test_labels_csv, classes=protected.classes,
                                                  expected_name="protected")
        val = None
        if val_dir is not None:
            val = load("validation", val_dir, test_labels_csv, classes=protected.classes, expected_name="protected")
        clean = None
        if clean_dir is not None:
            clean = load("clean", clean_dir, labels_csv, classes=protected.classes, expected_name="protected",
                         max_per_class=max_per_class)
            if len(clean) != len(protected):
                log.warning("clean folder has %d images, protected folder %d: the baseline trains on a "
                            "different amount of data", len(clean), len(protected))
        held: dict | None = None
        if holdout is not None:
            assert clean is not None
            clean, protected, test, held = split_holdout(clean, protected, float(holdout))
            loaded.append(f"verify: held out {held['test_images']} of the clean images as the test set "
                          f"({100 * float(holdout):g} % of each class); {held['protected_removed']} protected copies "
                          "of them left the training set")
        if progress is True and os.environ.get("RANK", "0") == "0":
            for line in loaded:
                print(line, file=sys.stderr, flush=True)
        return protected, test, val, clean, held, labelling

    options: dict[str, Any] = dict(
        tier=recipe, trainings=trainings, defenses=defenses, seeds=seeds, device=device, report_dir=out,
        cache_dir=cache_dir, baseline_per_defense=baseline_per_defense, progress=progress, fresh=fresh,
        allow_overlap=allow_overlap, engine=engine,
        method=method if method is not None else recorded_method(protected_dir))
    if len(sizes) == 1:
        protected, test, val, clean, held, labelling = load_sets(sizes[0])
        assert test is not None
        cert = verify_sets(protected, test, clean, relabel=labelling, val=val, holdout=held, resolution=sizes[0],
                           **options)
    else:
        cert = _verify_resolutions(sizes, load_sets, options, out, progress)
    if out is not None:
        cert["report_dir"] = str(out)
    return cert
