"""The attacker grid: which (training regime, defense) cells a verification trains.

**The default grid follows the method.** An attacker who knows which method protected the images
picks the breakers published against it. So when the protected folder has a run record beside it
(``OUT_DIR.protect``, written by ``protect images``) or the method is named (``--method``), the
default grid adds that method's published breakers (:attr:`perturbations.Perturbation.breakers`:
CUDA and clustered CUDA ``coin, rskff``; the additive noises UC and SALM ``jpeg10, grayscale,
ueraser``; a composition the union) to the generic ``none, grayscale, jpeg10``. Every default
defense is crossed with ERM, and adversarial training (``linf``, the attacker every method must
face) runs once, without a defense: AT crossed with defenses stays on request (``--training`` and
``--defenses`` together give their full product, as before).

The certificate lists the breakers in the grid and the known ones left out (:func:`breakers_report`),
so a grid chosen by hand says what it did not try.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from perturbations.errors import ConfigError, ProtectError

from . import defenses as defense_registry
from .recipes import Recipe, Training, parse_trainings

__all__ = ["DEFAULT_DEFENSES", "DEFAULT_TRAININGS", "Grid", "breakers_report", "build_grid", "known_breakers",
           "recorded_method"]

log = logging.getLogger(__name__)

DEFAULT_TRAININGS = "erm,linf"
DEFAULT_DEFENSES = "none,grayscale,jpeg10"
#: The regime every method's grid includes (the adversarial trainer), run without a defense by default.
AT_REGIME = "linf"


@dataclass(frozen=True)
class Grid:
    """The cells to train: ``pairs`` in grid order, with the regimes and defenses they use."""

    pairs: tuple[tuple[Training, defense_registry.Defense], ...]
    method: str | None
    default: bool

    @property
    def regimes(self) -> list[Training]:
        return list(dict.fromkeys(t for t, _ in self.pairs))

    @property
    def defenses(self) -> list[defense_registry.Defense]:
        seen: dict[str, defense_registry.Defense] = {}
        for _, d in self.pairs:
            seen.setdefault(d.name, d)
        return list(seen.values())


def known_breakers(method: str | None) -> list[str]:
    """The defenses published against ``method`` (a registered method or a composition ``a+b``);
    empty for None. ConfigError for an unknown method."""
    if method is None:
        return []
    import perturbations

    try:
        cls = perturbations.get(method)
    except ProtectError as exc:
        raise ConfigError(f"--method: {exc}") from None
    return list(cls.breakers)


def recorded_method(protected_dir: str | os.PathLike) -> str | None:
    """The method of the run record beside ``protected_dir`` (``OUT_DIR.protect``), None when there
    is none or it cannot be read (verify then uses the generic grid, and says so)."""
    from protect.record import RunRecord, default_record_dir

    try:
        record = RunRecord.find(default_record_dir(Path(protected_dir)))
    except (ProtectError, OSError) as exc:
        log.warning("verify: the run record beside %s cannot be read (%s): the generic grid is used", protected_dir, exc)
        return None
    method = record.header.get("method") if record is not None else None
    return method if isinstance(method, str) else None


def build_grid(trainings: str | Sequence[str] | None, defenses: str | Sequence[str] | None,
               recipe: Recipe, method: str | None = None) -> Grid:
    """The cells for ``trainings`` x ``defenses`` as given (their full product), or the default grid
    (see the module doc) where both are None; one of them None takes its generic default."""
    breakers = known_breakers(method)
    if trainings is None and defenses is None:
        names = defense_registry.parse_list(",".join([DEFAULT_DEFENSES, *breakers]))
        dfns = [defense_registry.get(n) for n in names]
        erm, at = parse_trainings(f"erm,{AT_REGIME}", recipe)
        pairs = [(erm, d) for d in dfns] + [(at, defense_registry.get("none"))]
        return Grid(tuple(pairs), method, True)
    regimes = parse_trainings(trainings if trainings is not None else DEFAULT_TRAININGS, recipe)
    spec = defenses if defenses is not None else DEFAULT_DEFENSES
    names = defense_registry.parse_list(spec if isinstance(spec, str) else ",".join(spec))
    dfns = [defense_registry.get(n) for n in names]
    return Grid(tuple((t, d) for t in regimes for d in dfns), method, False)


def breakers_report(grid: Grid) -> dict:
    """For the certificate: the method the grid followed, its known breakers, those in the grid and
    those left out (adversarial training counted as ``linf``)."""
    known = known_breakers(grid.method) + [AT_REGIME]
    tried = {d.name for d in grid.defenses} | {t.name for t in grid.regimes if t.adversarial}
    tried |= {AT_REGIME for t in grid.regimes if t.norm == "linf"}
    return {
        "method": grid.method,
        "default_grid": grid.default,
        "known": known,
        "in_grid": [b for b in known if b in tried],
        "left_out": [b for b in known if b not in tried],
        "source": _source(grid.method),
    }


def _source(method: str | None) -> str | None:
    if method is None:
        return None
    import perturbations

    return perturbations.get(method).breakers_source or None
