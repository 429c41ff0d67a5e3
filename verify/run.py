"""``verify_folder``: the whole verification of a protected folder, from folders to certificate.

Loads the protected training folder, the clean test folder and (optionally) the clean training
folder; checks that their class maps agree; trains the grid of cells (training regime x defense x
seed) on the protected data and the clean baselines; scores them (:mod:`verify.certificate`); writes
``certificate.json``, ``report.md``, ``curves.png`` and ``samples.png``; returns the certificate.

Clean baselines are cached as small JSON files under ``cache_dir`` (default ``$PROTECT_CACHE`` or
``~/.cache/protect/baselines``), keyed by the sha256 of: the clean training data hash, the test data
hash (the baseline's numbers are test accuracies), every recipe field, the training regime with its
eps and attack, the baseline's defense (``none`` unless ``baseline_per_defense``), the seed and a
cache format version. Repeated runs on the same clean data reuse them instead of retraining.

Multi-GPU: under ``torchrun`` every process runs the same call; each cell is then trained
data-parallel with DDP across the processes (:mod:`verify.distributed`), and only rank 0 prints,
writes the cache and the report. Without ``torchrun``, the grid can also be split by hand: one
process per GPU (``CUDA_VISIBLE_DEVICES``) with a share of the grid and a shared ``PROTECT_CACHE``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from perturbations.errors import ConfigError, InputError

from . import defenses as defense_registry
from . import distributed
from .certificate import build_certificate, cell_entry, save_certificate
from .data import TensorSet, check_same_classes, load_folder
from .recipes import Recipe, Training, fit_to_data, get_recipe, parse_trainings
from .report import write_report
from .train import CellResult, resolve_device, train_cell

__all__ = [
    "DEFAULT_DEFENSES",
    "DEFAULT_TRAININGS",
    "BaselineCache",
    "default_cache_dir",
    "verify_folder",
    "verify_sets",
]

log = logging.getLogger(__name__)

DEFAULT_TRAININGS = "erm,linf"
DEFAULT_DEFENSES = "none,grayscale,jpeg10"
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$PROTECT_CACHE`` if set, else ``~/.cache/protect/baselines``."""
    env = os.environ.get("PROTECT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "protect" / "baselines"


class BaselineCache:
    """Clean-baseline results on disk, one JSON file per key (see module doc)."""

    def __init__(self, root: str | os.PathLike | None) -> None:
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(clean: TensorSet, test: TensorSet, recipe: Recipe, training: Training, defense: str, seed: int) -> str:
        fields = recipe.to_dict()
        fields.pop("description", None)
        payload = {
            "version": CACHE_VERSION, "clean": clean.sha256, "test": test.sha256, "recipe": fields,
            "training": [training.name, training.norm, training.eps], "attack": recipe.attack(training),
            "defense": defense, "seed": seed,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / f"{key[:40]}.json"

    def get(self, key: str) -> CellResult | None:
        if self.root is None:
            return None
        path = self._path(key)
        try:
            blob = json.loads(path.read_text(encoding="utf-8"))
            if blob.get("key") != key:
                raise ValueError("key mismatch")
            result = CellResult.from_dict(blob["result"])
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable baseline cache file %s (%s)", path, exc)
            self.misses += 1
            return None
        self.hits += 1
        return result

    def put(self, key: str, result: CellResult, meta: dict | None = None) -> None:
        if self.root is None:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            text = json.dumps({"key": key, "meta": meta or {}, "result": result.to_dict()}, indent=1)
            fd, tmp = tempfile.mkstemp(prefix=".baseline-", suffix=".json", dir=self.root)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, self._path(key))
        except OSError as exc:  # a cache that cannot be written only costs time later
            log.warning("cannot write baseline cache in %s: %s", self.root, exc)


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


def _defense_list(spec: str | Sequence[str] | None) -> list[defense_registry.Defense]:
    if spec is None:
        spec = DEFAULT_DEFENSES
    names = defense_registry.parse_list(spec if isinstance(spec, str) else ",".join(spec))
    return [defense_registry.get(n) for n in names]


def _check_shapes(a: TensorSet, b: TensorSet, name_a: str, name_b: str) -> None:
    if a.x.shape[1:] != b.x.shape[1:]:
        ca, ha, wa = a.x.shape[1:]
        cb, hb, wb = b.x.shape[1:]
        raise InputError(
            f"{name_a} images are {wa}x{ha} with {ca} channel(s) but {name_b} images are {wb}x{hb} with "
            f"{cb} channel(s): verification needs one size and channel count"
        )


def _default_report_dir(protected_dir: Path) -> Path:
    return protected_dir.parent / f"{protected_dir.name}.verify"


def verify_sets(
    protected: TensorSet,
    test: TensorSet,
    clean: TensorSet | None = None,
    tier: str | Recipe = "quick",
    trainings: str | Sequence[str] | None = None,
    defenses: str | Sequence[str] | None = None,
    seeds: int | Sequence[int] = 1,
    model: str | None = None,
    epochs: int | None = None,
    device: str | torch.device = "auto",
    report_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None | bool = None,
    baseline_per_defense: bool = False,
    progress: bool | Any = True,
) -> dict:
    """:func:`verify_folder` on data already in memory (``report_dir=None`` writes no files;
    ``cache_dir=False`` disables the baseline cache)."""
    started = time.perf_counter()
    recipe = get_recipe(tier, model=model, epochs=epochs)
    dev = resolve_device(distributed.setup(device))  # joins the torchrun group first: rank 0 alone prints
    main = distributed.is_main()
    adapted = fit_to_data(recipe, len(protected))
    if adapted is not recipe:
        note = (f"only {len(protected)} training images: training with batch {adapted.batch_size} for "
                f"{adapted.epochs} epochs (at least {adapted.min_steps} steps; --epochs N overrides)")
        log.info("verify: %s", note)
        if progress is True and main:
            print(f"note: {note}", file=sys.stderr, flush=True)
        recipe = adapted
    regimes = parse_trainings(trainings if trainings is not None else DEFAULT_TRAININGS, recipe)
    dfns = _defense_list(defenses)
    seed_list = _seed_list(seeds)
    check_same_classes(test.classes, protected.classes, "test", "protected")
    _check_shapes(protected, test, "protected", "test")
    if clean is not None:
        check_same_classes(clean.classes, protected.classes, "clean", "protected")
        _check_shapes(protected, clean, "protected", "clean")
    cache = BaselineCache(None if cache_dir is False else (cache_dir if cache_dir is not None else default_cache_dir()))
    chance = 1.0 / protected.num_classes

    plan: list[tuple[str, Training, defense_registry.Defense]] = []  # (role, training, defense)
    for t in regimes:
        if clean is not None:
            for d in (dfns if baseline_per_defense else [defense_registry.get("none")]):
                plan.append(("clean", t, d))
        for d in dfns:
            plan.append(("protected", t, d))
    total = len(plan) * len(seed_list)
    log.info("verify: %s tier, %d cells x %d seed(s) on %s", recipe.tier, len(plan), len(seed_list), dev)

    protected_runs: dict[tuple[str, str], list[CellResult]] = {}
    clean_runs: dict[tuple[str, str], list[CellResult]] = {}
    clean_cached: dict[tuple[str, str], list[bool]] = {}
    done = 0
    for role, t, d in plan:
        for seed in seed_list:
            done += 1
            label = f"[{done}/{total}] {role} {t.name}/{d.name} seed {seed}"
            if role == "clean":
                assert clean is not None
                key = cache.key(clean, test, recipe, t, d.name, seed)
                # Rank 0 decides (a cache shared by all processes must not be read half-written).
                result = distributed.broadcast_object(cache.get(key) if main else None)
                if result is not None:
                    log.info("%s: clean baseline from cache (peak %.3f)", label, result.peak_acc)
                    if progress is True and main:
                        print(f"{label}: cached clean baseline, peak {100 * result.peak_acc:.1f}%",
                              file=sys.stderr, flush=True)
                    clean_runs.setdefault((t.name, d.name), []).append(result)
                    clean_cached.setdefault((t.name, d.name), []).append(True)
                    continue
                result = train_cell(clean, test, recipe, t, d, seed, dev, progress=progress, label=label)
                if main:
                    cache.put(key, result, {"clean_root": str(clean.root), "tier": recipe.tier, "training": t.name,
                                            "defense": d.name, "seed": seed})
                clean_runs.setdefault((t.name, d.name), []).append(result)
                clean_cached.setdefault((t.name, d.name), []).append(False)
            else:
                result = train_cell(protected, test, recipe, t, d, seed, dev, progress=progress, label=label)
                protected_runs.setdefault((t.name, d.name), []).append(result)
            log.info("%s: peak %.3f final %.3f (%.0f s)", label, result.peak_acc, result.final_acc, result.wall_s)

    cells = []
    for t in regimes:
        for d in dfns:
            base_d = d.name if baseline_per_defense else "none"
            base = clean_runs.get((t.name, base_d))
            cells.append(cell_entry(
                t.name, d.name, protected_runs[(t.name, d.name)], base, chance, baseline_defense=base_d,
                clean_cached=clean_cached.get((t.name, base_d)),
                extra={"eps": t.eps if t.adversarial else None},
            ))
    data = {"train": protected.describe(), "test": test.describe()}
    if clean is not None:
        data["clean"] = clean.describe()
    device_name = str(dev)
    if dev.type == "cuda":
        device_name += f" ({torch.cuda.get_device_name(dev)})"
    if distributed.world() > 1:
        device_name += f" x {distributed.world()} processes (DDP)"
    cert = build_certificate(
        recipe=recipe, trainings=regimes, defenses=dfns, seeds=seed_list, classes=protected.classes,
        cells=cells, data=data, device=device_name, wall_s=time.perf_counter() - started,
        baseline_per_defense=baseline_per_defense,
        extra={"baseline_cache": {"dir": str(cache.root) if cache.root else None, "hits": cache.hits,
                                  "misses": cache.misses}},
    )
    if report_dir is not None and main:
        out = Path(report_dir)
        save_certificate(cert, out / "certificate.json")
        write_report(cert, out, clean=clean, protected=protected)
        log.info("verify: report written to %s", out)
    return cert


def verify_folder(
    protected_dir: str | os.PathLike,
    test_dir: str | os.PathLike,
    clean_dir: str | os.PathLike | None = None,
    tier: str | Recipe = "quick",
    trainings: str | Sequence[str] | None = None,
    defenses: str | Sequence[str] | None = None,
    seeds: int | Sequence[int] = 1,
    model: str | None = None,
    epochs: int | None = None,
    device: str = "auto",
    report_dir: str | os.PathLike | None | bool = None,
    cache_dir: str | os.PathLike | None | bool = None,
    baseline_per_defense: bool = False,
    max_per_class: int | None = None,
    progress: bool | Any = True,
) -> dict:
    """Certify how much a protected folder takes away from models trained on it.

    Args:
        protected_dir: protected training images, one sub-folder per class.
        test_dir: clean test images with the same class folders.
        clean_dir: the clean training images (for the baselines and the score); optional.
        tier: ``quick`` (default), ``standard`` or ``paper`` (:mod:`verify.recipes`), or a
            :class:`verify.recipes.Recipe` (e.g. ``get_recipe("quick", batch_size=64)``).
        trainings: regimes, ``"erm,linf"`` by default (``erm``, ``linf``, ``linf4``, ``l2``, ``l2@EPS``).
        defenses: ``"none,grayscale,jpeg10"`` by default (:func:`verify.defenses.available`).
        seeds: a count N (seeds 0..N-1) or a list of seeds; accuracies are averaged over seeds.
        model, epochs: override the tier's model and epochs.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
        report_dir: where certificate.json, report.md, curves.png and samples.png go; None means
            ``<protected_dir>.verify`` beside the protected folder; False writes nothing.
        cache_dir: clean-baseline cache (default ``$PROTECT_CACHE`` or ``~/.cache/protect/baselines``);
            False disables it.
        baseline_per_defense: train the clean baseline under every defense too (else under none).
        max_per_class: use only the first N images per class of every folder (quick subsets).
        progress: True for a progress bar per cell, False for silence, or a callback
            (:class:`verify.train.EpochInfo`).

    Returns the certificate dict (schema ``protect.certificate/1``). Raises ConfigError for unknown
    tiers, regimes, defenses, models or devices, InputError for unusable folders (missing, empty,
    unlabelled, mixed sizes, class folders that differ), all one-line messages.
    """
    # Validate the options before spending time on loading.
    recipe = get_recipe(tier, model=model, epochs=epochs)
    parse_trainings(trainings if trainings is not None else DEFAULT_TRAININGS, recipe)
    _defense_list(defenses)
    _seed_list(seeds)
    resolve_device(device)
    from .models import create_model

    create_model(recipe.model, 2)  # unknown model names fail here, before any data is loaded

    protected_dir = Path(protected_dir)
    protected = load_folder(protected_dir, max_per_class=max_per_class, name="protected")
    test = load_folder(test_dir, classes=protected.classes, max_per_class=max_per_class,
                       name="test", expected_name="protected")
    clean = None
    if clean_dir is not None:
        clean = load_folder(clean_dir, classes=protected.classes, max_per_class=max_per_class,
                            name="clean", expected_name="protected")
        if len(clean) != len(protected):
            log.warning("clean folder has %d images, protected folder %d: the baseline trains on a "
                        "different amount of data", len(clean), len(protected))
    if report_dir is None:
        out: Path | None = _default_report_dir(protected_dir)
    elif report_dir is False:
        out = None
    else:
        out = Path(report_dir)  # type: ignore[arg-type]
    cert = verify_sets(
        protected, test, clean, tier=recipe, trainings=trainings, defenses=defenses, seeds=seeds,
        device=device, report_dir=out, cache_dir=cache_dir, baseline_per_defense=baseline_per_defense,
        progress=progress,
    )
    if out is not None:
        cert["report_dir"] = str(out)
    return cert
