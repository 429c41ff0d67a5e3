"""Composed protection: ``cuda+uc`` applies CUDA, then Unlearnable Clusters to CUDA's output.

A chain is a :class:`~perturbations.base.Perturbation` built from registered methods, named by
joining their names with ``+`` (``perturbations.get("cuda+uc")``); each method appears at most
once. It behaves as one method everywhere (one record, one state, ``--state`` reuse, resume):

* **fit**: the stages fit in order, each on the previous stages' output (the fit pass's resized
  images run through the fitted stages before the next stage sees them, so UC clusters and
  optimises against CUDA-blurred pixels). A stage's fit sees the images at its own working size;
  CUDA's blur is applied there too, not at full resolution and then resized (close, not equal).
* **protect**: ``protect_levels`` runs every stage's integer path in order, so each stage's output
  is quantised to the image's grid before the next stage, as if each wrote its file; the chain is
  exact when every stage is.
* **parameters**: ``STAGE.NAME`` (``uc.eps``, ``cuda.filter_size``) sets one stage's parameter; a
  plain ``NAME`` goes to every stage that takes it (``--eps`` to UC and SALM; ``--clusters K
  --surrogate S`` make both CUDA and UC label-agnostic), except that a parameter a stage only uses
  with another one (:attr:`~perturbations.base.Perturbation.companion_params`: CUDA's surrogate
  needs ``clusters``) skips that stage unless the other is given too. A prefixed value wins.
* **state**: every stage's state under ``STAGE:KEY``; per-image state likewise.
* keys: every stage draws from the same keyring (its own purposes, ``cuda/...``, ``uc/...``), so
  the first stage of a chain protects exactly as that method alone would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .base import FitData, Perturbation
from .errors import ConfigError
from .keyring import Keyring

SEP = "+"


class Chain(Perturbation):
    """Stages applied in order (see module doc); subclasses are made by :func:`chain_class`."""

    stage_classes: ClassVar[tuple[type[Perturbation], ...]] = ()

    def __init__(self, keyring: Keyring, **params: Any) -> None:
        super().__init__(keyring)
        own = self._by_stage(params)
        self.stages = [cls(keyring, **own[cls.name]) for cls in self.stage_classes]
        self.needs_labels = any(s.needs_labels for s in self.stages)  # type: ignore[misc]  # clustered CUDA needs none

    # -- parameters ------------------------------------------------------------------------
    @classmethod
    def _by_stage(cls, params: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """``STAGE.NAME`` parameters split per stage; ConfigError for a key that names no stage."""
        own: dict[str, dict[str, Any]] = {s.name: {} for s in cls.stage_classes}
        for key, value in params.items():
            stage, dot, name = key.partition(".")
            if not dot or stage not in own:
                raise ConfigError(f"method '{cls.name}': parameter '{key}' names no stage; write STAGE.NAME with "
                                  f"STAGE one of {', '.join(own)}")
            own[stage][name] = value
        return own

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f"{s.name}.{k}": v for s in cls.stage_classes for k, v in s.defaults().items()}

    @classmethod
    def resolve_params(cls, given: dict[str, Any]) -> dict[str, Any]:
        """Route plain names to the stages that take them (see module doc); prefixed names win."""
        given = {k: v for k, v in given.items() if v is not None}
        plain = {k: v for k, v in given.items() if "." not in k}
        prefixed = {k: v for k, v in given.items() if "." in k}
        cls._by_stage(prefixed)  # every prefix names a stage
        routed: dict[str, Any] = {}
        for name, value in plain.items():
            takers = []
            for s in cls.stage_classes:
                if name not in s.defaults():
                    continue
                needs = s.companion_params.get(name)
                if needs is not None and needs not in plain and f"{s.name}.{needs}" not in prefixed:
                    continue
                takers.append(s.name)
            if not takers:
                owners = [s for s in cls.stage_classes if name in s.defaults()]
                if owners:
                    need = owners[0].companion_params[name]
                    raise ConfigError(f"method '{cls.name}': {owners[0].name} uses '{name}' only with '{need}'; "
                                      f"give {need} too, or set another stage's with STAGE.{name}")
                raise ConfigError(f"method '{cls.name}': no stage takes parameter '{name}'; "
                                  f"they take {', '.join(sorted(cls.defaults()))}")
            routed.update({f"{t}.{name}": value for t in takers})
        params = super().resolve_params({**routed, **prefixed})
        own = cls._by_stage(params)  # each stage fills in what it chooses itself (a default surrogate)
        return {f"{s.name}.{k}": v for s in cls.stage_classes for k, v in s.resolve_params(own[s.name]).items()}

    def params(self) -> dict[str, Any]:
        return {f"{s.name}.{k}": v for s in self.stages for k, v in s.params().items()}

    # -- fitting ---------------------------------------------------------------------------
    def _staged(self, data: FitData, upto: int, label: str) -> FitData:
        """``data`` whose images went through stages ``[0, upto)``; progress stages named ``label: ...``."""
        done = self.stages[:upto]
        source = data.batches

        def progress(stage: str, n: int, total: int) -> None:
            data.report(f"{label}: {stage}", n, total)

        if source is None or not done:
            return dataclasses.replace(data, progress=progress if data.progress else None)

        def batches(size, channels=3, batch_size=64, only=None):  # noqa: ANN001, ANN202 - FitData's factory
            for images, idx in source(size, channels=channels, batch_size=batch_size, only=only):
                labels = None if data.labels is None else torch.tensor([int(data.labels[i]) for i in idx])
                ids = [data.ids[i] for i in idx]
                for stage in done:
                    images = stage.apply(images, labels, ids)
                yield images, idx

        return dataclasses.replace(data, batches=batches, progress=progress if data.progress else None)

    def fit(self, data: FitData) -> "Chain":
        super().fit(data)
        for i, stage in enumerate(self.stages):
            stage.fit(self._staged(data, i, stage.name))
        self.fitted = True
        return self

    def extend(self, data: FitData) -> bool:
        changed = False
        for i, stage in enumerate(self.stages):
            changed = stage.extend(self._staged(data, i, stage.name)) or changed
        return changed

    def fit_report(self) -> dict[str, Any]:
        return {s.name: s.fit_report() for s in self.stages}

    def notes(self) -> list[str]:
        return [line if line.startswith(f"{s.name}:") else f"{s.name}: {line}"
                for s in self.stages for line in s.notes()]

    # -- protecting ------------------------------------------------------------------------
    def apply(self, x: torch.Tensor, labels: torch.Tensor | None = None,
              ids: Sequence[str] | None = None) -> torch.Tensor:
        """The float path: every stage's ``apply`` in order (no quantisation in between)."""
        for stage in self.stages:
            x = stage.apply(x, labels, ids)
        return x

    def protect_levels(self, v: torch.Tensor, labels: torch.Tensor | None = None,
                       ids: Sequence[str] | None = None, levels: int = 255) -> torch.Tensor:
        """Every stage's integer path in order (each output on the image's grid)."""
        for stage in self.stages:
            v = stage.protect_levels(v, labels, ids, levels)
        return v

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{s.name}:{k}": v for s in self.stages for k, v in s.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        known = tuple(f"{s.name}:" for s in self.stages)
        stray = sorted(k for k in state if not k.startswith(known))
        if stray:
            raise ConfigError(f"{self.name}: saved state has keys of no stage ({', '.join(stray[:3])})")
        for s in self.stages:
            prefix = f"{s.name}:"
            s.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        self.fitted = True


_CHAINS: dict[str, type[Chain]] = {}


def chain_class(name: str, lookup: Any) -> type[Chain]:
    """The chain class for ``name`` (``a+b[+c...]``); ``lookup(stage_name)`` gives a method class."""
    if name in _CHAINS:
        return _CHAINS[name]
    names = [n.strip() for n in name.split(SEP)]
    if any(not n for n in names):
        raise ConfigError(f"method '{name}': empty stage name (write e.g. cuda+uc)")
    if len(set(names)) < len(names):
        raise ConfigError(f"method '{name}': a method may appear once in a chain")
    classes = tuple(lookup(n) for n in names)
    attrs = {
        "name": SEP.join(names),
        "summary": "composition: " + ", then ".join(c.name for c in classes),
        "paper": "; ".join(c.paper for c in classes if c.paper),
        "needs_labels": any(c.needs_labels for c in classes),
        "exact": all(c.exact for c in classes),
        "work_bytes_per_value": max(c.work_bytes_per_value for c in classes),
        "per_image_state": tuple(f"{c.name}:{k}" for c in classes for k in c.per_image_state),
        "stage_classes": classes,
        "breakers": tuple(dict.fromkeys(b for c in classes for b in c.breakers)),  # the union, in stage order
        "breakers_source": "; ".join(c.breakers_source for c in classes if c.breakers_source),
    }
    cls = type("Chain_" + "_".join(names), (Chain,), attrs)
    _CHAINS[name] = cls
    return cls
