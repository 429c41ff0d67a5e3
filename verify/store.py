"""Trained cells on disk: the clean-baseline cache and the finished cells of one report folder.

Both hold one small JSON file per trained cell (a :class:`verify.train.CellResult`), named by the
sha256 of everything that determines the cell (:func:`cell_key`): the hash of the training data
and of the test data (the numbers are test accuracies; a set relabelled for the attacker,
``--relabel``, has a hash that also covers the map, :mod:`verify.relabel`, so cells and baselines
trained on other labels are never reused), every recipe field but the free-text
description, the training regime with its eps and its attack (method, steps, step size, model
mode), the defense with its parameters, the seed, the validation set that chose the epoch, the
versions of this project and of torch (code that trains differently never reuses older numbers),
and a format version (:data:`CACHE_VERSION`, raised when results gain fields or change meaning:
version 2 added balanced accuracy and AUC, version 3 the validation-chosen epoch and the test
predictions, so files of older versions are never reused and those cells are trained again). A changed input or option
therefore never reuses a stale result. Files are written atomically (a temporary file, fsync,
rename), so a run killed at any moment leaves only whole files; an unreadable file is ignored with
a warning and the cell is trained again.

* :class:`BaselineCache`: clean baselines shared by every run (``$PROTECT_CACHE`` or
  ``~/.cache/protect/baselines``), so repeated runs on the same clean data reuse them.
* :class:`CellStore`: ``<report>/cells/``, every finished cell of a verification (protected and
  clean), written as it finishes, so a run that is interrupted (Ctrl-C, kill -9, a lost machine)
  and started again with the same command trains only the cells that were missing.

Not in the key: the device, the number of processes and the other library versions. A cell trained on
a GPU, or under torchrun, is reused by a rerun on a CPU (the certificate records where each cell
was trained, under ``per_seed[].device``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from perturbations.errors import RecordError

from .certfile import write_text_atomic
from .data import TensorSet
from .recipes import Recipe, Training
from .train import CellResult

__all__ = ["CACHE_VERSION", "CELL_SCHEMA", "BaselineCache", "CellStore", "cell_key", "default_cache_dir"]

log = logging.getLogger(__name__)

#: Format version in every key. 2: results carry balanced accuracy and AUC; 3: the epoch chosen on
#: validation and the test predictions; 4: the overfitting guard checks every k epochs and, when it
#: fires, trains the epochs since its last passing check again; 5: every epoch's answers renamed
#: where the validation images say so (``Recipe.remap_answers``); 6: two-class answers decided at the
#: threshold the validation images choose, where they say so (replacing the own answers; clean
#: baselines too); 7: the read answers beside the own ones, the better kept, protected cells only,
#: and per-class offsets for more classes. Files of older versions are never looked up again, so
#: cells and baselines saved by older versions train again.
CACHE_VERSION = 7


def _versions() -> dict[str, str | None]:
    """The versions of this project and of torch, part of every key."""
    from importlib import metadata

    import torch

    try:
        protect = metadata.version("protect")
    except metadata.PackageNotFoundError:
        protect = None
    return {"protect": protect, "torch": torch.__version__}
CELL_SCHEMA = "protect.verify-cell/1"


def default_cache_dir() -> Path:
    """``$PROTECT_CACHE`` if set, else ``~/.cache/protect/baselines``."""
    env = os.environ.get("PROTECT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "protect" / "baselines"


def _recipe_fields(recipe: Recipe, training: Training) -> dict:
    """The fields of the recipe ``training``'s cell trains with (the adversarial trainer's own model
    and epochs for AT, :meth:`Recipe.for_training`), so the AT learner never changes an ERM key."""
    fields = recipe.for_training(training).to_dict()
    for name in ("description", "at_model", "at_epochs"):
        fields.pop(name, None)
    return fields


def _learner_id(learner: str | None) -> list | None:
    """A pretrained learner's canonical backbone spec and weights SHA-256 (None for the tier's model)."""
    if learner is None:
        return None
    from .learners import learner_info

    info = learner_info(learner)
    return [info["kind"], info["backbone"], info["weights_sha256"]]


def cell_key(train: TensorSet, test: TensorSet, recipe: Recipe, training: Training, defense: Any, seed: int,
             role: str | None = None, val: TensorSet | None = None) -> str:
    """sha256 hex of everything that determines one trained cell (see module doc). ``defense``: a
    Defense (its name and parameters are hashed) or a name; ``role``: ``"protected"``/``"clean"``
    for the cells of a report (None: the baseline cache's key layout); ``val``: the validation
    set that chose the epoch (None: the test set chose)."""
    name = getattr(defense, "name", defense)
    payload: dict[str, Any] = {
        "version": CACHE_VERSION, "clean": train.sha256, "test": test.sha256, "recipe": _recipe_fields(recipe, training),
        "training": [training.name, training.norm, training.eps], "attack": recipe.attack(training),
        "learner": _learner_id(training.learner),
        "defense": name, "seed": seed, "val": val.sha256 if val is not None else None, "versions": _versions(),
    }
    if role is not None:
        params = {k: v for k, v in vars(defense).items() if not k.startswith("_")} if not isinstance(defense, str) else {}
        payload.update(schema=CELL_SCHEMA, role=role, defense_params=params)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _read(path: Path, key: str, what: str) -> dict | None:
    """The JSON object in ``path`` if it is whole and belongs to ``key``; None (with a warning
    when the file exists but is unusable)."""
    try:
        blob = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(blob, dict) or blob.get("key") != key:
            raise ValueError("key mismatch")
        result = CellResult.from_dict(blob["result"])  # validates the fields
        if result.guard_fired_epoch is not None and not result.guard_fgsm_acc:
            # the catastrophic-overfitting guard of before 2026-12-03 fired on a fall of PGD accuracy
            # alone and stopped the cell: a weaker attacker than today's; it trains again
            log.info("%s %s: trained under the old catastrophic-overfitting rule; training it again", what, path)
            return None
        return blob
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable %s %s (%s)", what, path, exc)
        return None


class BaselineCache:
    """Clean-baseline results on disk, one JSON file per key (see module doc); ``root=None``
    disables it. ``hits`` and ``misses`` count lookups."""

    def __init__(self, root: str | os.PathLike | None) -> None:
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(clean: TensorSet, test: TensorSet, recipe: Recipe, training: Training, defense: str, seed: int) -> str:
        return cell_key(clean, test, recipe, training, defense, seed)

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / f"{key[:40]}.json"

    def get(self, key: str) -> CellResult | None:
        if self.root is None:
            return None
        blob = _read(self._path(key), key, "baseline cache file")
        if blob is None:
            self.misses += 1
            return None
        self.hits += 1
        return CellResult.from_dict(blob["result"])

    def put(self, key: str, result: CellResult, meta: dict | None = None) -> None:
        if self.root is None:
            return
        try:
            text = json.dumps({"key": key, "meta": meta or {}, "result": result.to_dict()}, indent=1)
            write_text_atomic(self._path(key), text, ".baseline-")
        except OSError as exc:  # a cache that cannot be written only costs time later
            log.warning("cannot write baseline cache in %s: %s", self.root, exc)


class CellStore:
    """The finished cells of one report folder, ``<report>/cells/<key>.json`` (see module doc);
    ``root=None`` keeps nothing. ``reused`` and ``trained`` count this run's cells."""

    def __init__(self, root: str | os.PathLike | None) -> None:
        self.root = Path(root) if root is not None else None
        self.reused = 0
        self.trained = 0

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / f"{key[:40]}.json"

    def get(self, key: str) -> tuple[CellResult, dict] | None:
        """The saved result and its metadata, or None when the cell has not finished before."""
        if self.root is None:
            return None
        blob = _read(self._path(key), key, "saved cell")
        if blob is None:
            return None
        return CellResult.from_dict(blob["result"]), dict(blob.get("meta") or {})

    def put(self, key: str, result: CellResult, meta: dict) -> None:
        """Save a finished cell; an unwritable folder is an error (the report goes there too)."""
        if self.root is None:
            return
        text = json.dumps({"schema": CELL_SCHEMA, "key": key, "meta": meta, "result": result.to_dict()}, indent=1)
        try:
            write_text_atomic(self._path(key), text, ".cell-")
        except OSError as exc:
            raise RecordError(f"cannot save a finished cell in {self.root}: {exc.strerror or exc}") from None
