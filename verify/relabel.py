"""The attacker's labelling: train and score surrogates on the data's classes, or on remapped ones.

A label-agnostic protection (Unlearnable Clusters) claims to hold even when the attacker trains on
labels the protector never saw. ``protect verify --relabel MAP`` tests that claim: every image's
class is replaced by an *attacker class* before training, in the protected training set, the clean
training set and the test set alike, so baselines, chance and scores all use the attacker's labels.

MAP is one of:

* a JSON file ``{"data class": "attacker class", ...}`` (e.g. ``samples/cifar10/coarse.json``:
  the ten CIFAR-10 classes as ``animal`` / ``vehicle``). Every class of the data must be mapped and
  every key must be a class of the data; attacker classes are names (JSON integers are taken as
  their decimal text) and get indices in natural order of their names (digit runs compare as
  numbers: ``group2`` before ``group10``, ``2`` before ``10``). At least two attacker classes.
* ``random:N`` or ``random:N:SEED``: the data's K classes shuffled by a CPU ``torch.Generator``
  seeded with SEED (default :data:`RELABEL_SEED` = 0, fixed, not the training seed: every cell of
  a run must see the same labels) and dealt round-robin into N groups ``group0 .. group{N-1}``, so
  every group holds ``K // N`` or ``K // N + 1`` classes and none is empty. ``2 <= N <= K - 1``:
  one group cannot be trained, and K groups would only rename the classes.

The certificate records the map itself, its source (file path and sha256 of its bytes, or the
spec with its seed) and the map's fingerprint. A relabelled :class:`verify.data.TensorSet` gets a
hash that covers its parent's hash and that fingerprint, so the baseline cache and the saved cells
(both keyed on the data hashes, :func:`verify.store.cell_key`) never mix results of different
labellings; two sources that give the same map share their cells.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from perturbations.errors import ConfigError, InputError

from .data import TensorSet

__all__ = ["RELABEL_SEED", "Labelling", "RelabelSpec", "natural_key", "original_labelling", "parse_relabel"]

#: The seed of ``random:N`` when the spec names none.
RELABEL_SEED = 0

_RANDOM = re.compile(r"random:(?P<n>[^:]*)(?::(?P<seed>.*))?")
_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key: digit runs compare as numbers (``group2`` < ``group10``), ties broken by the text."""
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in _DIGITS.split(name) if p)
    return parts, name


def _names(items: Sequence[str], limit: int = 8) -> str:
    """``['a', 'b', ...]`` with at most ``limit`` names and a count of the rest (keeps errors one short line)."""
    items = list(items)
    shown = ", ".join(repr(s) for s in items[:limit])
    more = f", ... {len(items) - limit} more" if len(items) > limit else ""
    return f"[{shown}{more}]"


@dataclass(frozen=True)
class Labelling:
    """A map from the data's class names to attacker class names, with where it came from.

    Attributes:
        mapping: data class -> attacker class, for every data class.
        source: JSON-ready description of the origin (``{"kind": "file", "path", "sha256"}`` or
            ``{"kind": "random", "spec", "groups", "seed"}``).
    """

    mapping: dict[str, str]
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        """The attacker classes in natural order of their names (their label indices)."""
        return sorted(set(self.mapping.values()), key=natural_key)

    @property
    def fingerprint(self) -> str:
        """sha256 hex of the map alone (not its source): equal maps train equal cells."""
        blob = json.dumps({"relabel": 1, "map": self.mapping}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def check(self, classes: Sequence[str], where: str = "the data") -> None:
        """InputError (one line, naming them) unless the map's keys are exactly ``classes``."""
        unmapped = [c for c in classes if c not in self.mapping]
        unknown = sorted((c for c in self.mapping if c not in set(classes)), key=natural_key)
        if not unmapped and not unknown:
            return
        parts = []
        if unmapped:
            parts.append(f"does not map class(es) {_names(unmapped)} of {where}")
        if unknown:
            parts.append(f"maps class(es) {_names(unknown)} that {where} does not have")
        raise InputError(f"relabel map {self.describe_source()} {' and '.join(parts)}; every class of "
                         f"{where} needs exactly one entry (the classes are {_names(classes)})")

    def apply(self, data: TensorSet) -> TensorSet:
        """``data`` with every label replaced by its attacker class (the images are shared, not copied)."""
        self.check(data.classes, f"{data.root}")
        attacker = self.classes
        index = {name: i for i, name in enumerate(attacker)}
        lut = torch.tensor([index[self.mapping[c]] for c in data.classes], dtype=torch.int64)
        sha = hashlib.sha256(f"{data.sha256}/relabel/{self.fingerprint}".encode()).hexdigest()
        source = (hashlib.sha256(f"{data.source_sha256}/relabel/{self.fingerprint}".encode()).hexdigest()
                  if data.source_sha256 else "")
        return TensorSet(data.x, lut[data.y], attacker, data.root, sha, list(data.rels), source)

    def describe_source(self) -> str:
        """The source in words: the file's path, or ``random:N (seed S)``."""
        if self.source.get("kind") == "file":
            return str(self.source.get("path"))
        if self.source.get("kind") == "random":
            return f"random:{self.source.get('groups')} (seed {self.source.get('seed')})"
        return "given in code"

    def describe(self, data_classes: Sequence[str]) -> dict[str, Any]:
        """The certificate's ``labelling`` entry."""
        groups = {a: [c for c in data_classes if self.mapping.get(c) == a] for a in self.classes}
        return {
            "attacker": "remapped",
            "description": (f"the attacker trained and was scored on {len(self.classes)} classes remapped from "
                            f"the data's {len(data_classes)} classes by {self.describe_source()}"),
            "source": dict(self.source),
            "map": {c: self.mapping[c] for c in data_classes if c in self.mapping},
            "groups": groups,
            "classes": self.classes,
            "data_classes": list(data_classes),
            "sha256": self.fingerprint,
        }


def original_labelling(classes: Sequence[str]) -> dict[str, Any]:
    """The certificate's ``labelling`` entry when the attacker used the data's own labels."""
    return {"attacker": "original", "classes": list(classes),
            "description": "the attacker trained and was scored on the data's own class labels"}


@dataclass(frozen=True)
class RelabelSpec:
    """A parsed ``--relabel`` value, checked for syntax; :meth:`resolve` makes the map for given classes."""

    text: str
    table: dict[str, str] | None = None  # a JSON file's map
    source: dict[str, Any] = field(default_factory=dict)
    groups: int | None = None  # random:N
    seed: int = RELABEL_SEED

    def resolve(self, classes: Sequence[str]) -> Labelling:
        """The :class:`Labelling` for data with ``classes`` (InputError/ConfigError when it cannot fit)."""
        if self.table is not None:
            lab = Labelling(dict(self.table), dict(self.source))
            lab.check(classes)
            return lab
        assert self.groups is not None
        k = len(classes)
        if not 2 <= self.groups <= k - 1:
            hint = ("it needs at least 3 classes" if k < 3 else f"use 2 <= N <= {k - 1}")
            raise ConfigError(f"--relabel random:{self.groups} does not fit {k} classes: {hint} (1 group cannot be "
                              f"trained, {k} groups only rename the classes)")
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(k, generator=g).tolist()
        mapping = {classes[c]: f"group{i % self.groups}" for i, c in enumerate(perm)}
        return Labelling({c: mapping[c] for c in classes}, dict(self.source))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"class '{key}' is listed twice")
        seen[key] = value
    return seen


def _read_map(path: Path) -> tuple[dict[str, str], str]:
    """The ``{class: attacker class}`` table of a JSON file and the sha256 of its bytes."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"relabel map not found: {path} (give a JSON file {{class: attacker class}} "
                         "or random:N)") from None
    except OSError as exc:
        raise InputError(f"cannot read relabel map {path}: {exc.strerror or exc}") from None
    try:
        blob = json.loads(raw.decode("utf-8-sig"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise InputError(f"relabel map {path} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"relabel map {path} is not valid JSON: {exc.msg} at line {exc.lineno} column "
                         f"{exc.colno}") from None
    except ValueError as exc:
        raise InputError(f"relabel map {path}: {exc}") from None
    if not isinstance(blob, dict):
        raise InputError(f"relabel map {path} must be a JSON object {{\"class\": \"attacker class\", ...}}, "
                         f"not a {type(blob).__name__}")
    if not blob:
        raise InputError(f"relabel map {path} is empty: map every class to an attacker class")
    table: dict[str, str] = {}
    for key, value in blob.items():
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"relabel map {path}: class '{key}' maps to {json.dumps(value)}; "
                             "attacker classes are non-empty names")
        table[key] = value.strip()
    if len(set(table.values())) < 2:
        raise InputError(f"relabel map {path} maps every class to '{next(iter(table.values()))}': "
                         "the attacker needs at least 2 classes")
    return table, hashlib.sha256(raw).hexdigest()


def parse_relabel(spec: str | os.PathLike) -> RelabelSpec:
    """Parse a ``--relabel`` value (see module doc): a JSON map file, or ``random:N[:SEED]``.

    The file is read and checked here (before any image is loaded); whether it covers the data's
    classes, or N fits their number, is checked by :meth:`RelabelSpec.resolve`."""
    text = os.fspath(spec)
    m = _RANDOM.fullmatch(text)
    if m:
        n_text, seed_text = m.group("n").strip(), m.group("seed")
        try:
            n = int(n_text)
            seed = RELABEL_SEED if seed_text is None else int(seed_text)
        except ValueError:
            raise ConfigError(f"--relabel '{text}': expected random:N or random:N:SEED with integers "
                              "(e.g. random:2)") from None
        if n < 2:
            raise ConfigError(f"--relabel '{text}': N must be at least 2 (the attacker needs 2 classes)")
        if seed < 0:
            raise ConfigError(f"--relabel '{text}': SEED must be >= 0")
        return RelabelSpec(text, groups=n, seed=seed,
                           source={"kind": "random", "spec": f"random:{n}", "groups": n, "seed": seed})
    path = Path(text)
    table, digest = _read_map(path)
    return RelabelSpec(text, table=table, source={"kind": "file", "path": str(path), "sha256": digest})
