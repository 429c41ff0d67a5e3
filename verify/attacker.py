"""The attacker: one value for everything that decides what a cell of the grid trains.

An :class:`Attacker` is ``(learner, regime, defense, resolution, seed)``:

- ``learner``: what learns, from the learner registry (:func:`learner_kind`): a scratch model of
  :mod:`verify.models` by name (``fastcnn``, ``fastcnn_wide``, ``resnet18``, ...), or a pretrained
  backbone, ``probe:SPEC`` (a linear head on frozen features) or ``finetune:SPEC`` (every weight,
  a small learning rate), :mod:`verify.learners`;
- ``regime``: how it learns (:class:`verify.recipes.Training`: ERM, L-inf or L2 adversarial
  training with its budget);
- ``defense``: what it does to the training images first (:mod:`verify.defenses`);
- ``resolution``: the size it trains at; ``"native"`` (the data's own size) is the only one today;
  attacker resolutions (``32``, ``64``, ...) come with the photo work that follows;
- ``seed``: its random draws (initialisation, batch order, crops, defense and attack draws).

The grid (:mod:`verify.grid`) is a product of the registries, :func:`plan_attackers` turns it into
attackers, and a cell is one function of one attacker and one training set
(:func:`verify.cells.train_attacker`). The certificate records each cell's whole attacker
(:meth:`Attacker.spec`), so a reader sees exactly who attacked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import defenses as defense_registry
from .learners import split_learner
from .recipes import Recipe, Training

__all__ = ["NATIVE", "Attacker", "learner_kind", "plan_attackers"]

#: The data's own size: the attacker trains on the images as they are.
NATIVE = "native"


def learner_kind(name: str) -> str:
    """``"probe"`` or ``"finetune"`` for a pretrained learner name, ``"scratch"`` for a model of
    :mod:`verify.models` (ConfigError for ``probe:`` / ``finetune:`` without a backbone)."""
    split = split_learner(name)
    return split[0] if split is not None else "scratch"


@dataclass(frozen=True)
class Attacker:
    """One attacker of the grid (see the module doc). Frozen and hashable."""

    learner: str
    regime: Training
    defense: defense_registry.Defense
    resolution: str = NATIVE
    seed: int = 0

    @classmethod
    def of(cls, regime: Training, defense: defense_registry.Defense, recipe: Recipe, seed: int = 0,
           resolution: str = NATIVE) -> Attacker:
        """The attacker of ``regime`` x ``defense`` under ``recipe``: its learner is the regime's
        pretrained one where set, else the recipe's model for that regime (the adversarial trainer
        has its own, :meth:`verify.recipes.Recipe.for_training`)."""
        learner = regime.learner if regime.learner is not None else recipe.for_training(regime).model
        return cls(learner, regime, defense, resolution, int(seed))

    @property
    def name(self) -> str:
        """``regime/defense``, the cell's name in the certificate."""
        return f"{self.regime.name}/{self.defense.name}"

    @property
    def kind(self) -> str:
        return learner_kind(self.learner)

    def spec(self) -> dict[str, Any]:
        """The attacker as the certificate records it (the seed is per run: the cell lists its seeds)."""
        return {
            "learner": self.learner,
            "learner_kind": self.kind,
            "regime": self.regime.name,
            "norm": self.regime.norm,
            "eps": self.regime.eps if self.regime.adversarial else None,
            "defense": self.defense.name,
            "resolution": self.resolution,
        }

    def describe(self) -> str:
        """One line for people: learner, regime and defense."""
        regime = self.regime.describe()
        learner = "" if self.kind != "scratch" else f"{self.learner} from scratch, "
        defense = "no defense" if self.defense.name == "none" else f"defense {self.defense.name}"
        return f"{learner}{regime}, {defense}"


def plan_attackers(pairs: Sequence[tuple[Training, defense_registry.Defense]], recipe: Recipe,
                   seeds: Sequence[int], resolution: str = NATIVE) -> list[Attacker]:
    """Every attacker of the grid's ``(regime, defense)`` pairs, each with every seed (pair-major)."""
    return [Attacker.of(t, d, recipe, s, resolution) for t, d in pairs for s in seeds]
