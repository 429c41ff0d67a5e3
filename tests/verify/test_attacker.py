"""The attacker value: the learner each regime gets, its spec, and the plan the grid becomes."""

from __future__ import annotations

import dataclasses

import pytest

from perturbations.errors import ConfigError
from verify import defenses
from verify.attacker import NATIVE, Attacker, learner_kind, plan_attackers
from verify.cells import train_attacker
from verify.grid import build_grid
from verify.recipes import get_recipe, parse_training


def test_each_regime_gets_its_learner() -> None:
    quick = get_recipe("quick")
    none = defenses.get("none")
    erm = Attacker.of(parse_training("erm", quick), none, quick)
    at = Attacker.of(parse_training("linf", quick), none, quick, seed=2)
    probe = Attacker.of(parse_training("probe:random:tiny", quick), none, quick)
    # the quick tier's adversarial trainer is its own, wider model (it must learn under AT)
    assert (erm.learner, at.learner, probe.learner) == ("fastcnn", "fastcnn_wide", "probe:random:tiny")
    assert (erm.kind, at.kind, probe.kind) == ("scratch", "scratch", "probe")
    assert at.seed == 2 and at.resolution == NATIVE and at.name == "linf/none"
    # an explicit --model is every regime's learner
    one = get_recipe("quick", model="resnet20")
    assert Attacker.of(parse_training("linf", one), none, one).learner == "resnet20"
    assert at.spec() == {"learner": "fastcnn_wide", "learner_kind": "scratch", "regime": "linf", "norm": "linf",
                         "eps": pytest.approx(8 / 255), "defense": "none", "resolution": "native"}
    assert "fastcnn_wide from scratch" in at.describe() and "L-inf AT" in at.describe()
    assert learner_kind("finetune:cifar-resnet56") == "finetune"
    with pytest.raises(ConfigError):
        learner_kind("probe:")


def test_attackers_are_values_and_the_plan_is_the_grid_times_the_seeds() -> None:
    quick = get_recipe("quick")
    grid = build_grid(None, None, quick, "cuda")
    plan = plan_attackers(grid.pairs, quick, [0, 1])
    assert len(plan) == 2 * len(grid.pairs) and len(set(plan)) == len(plan)  # hashable, all distinct
    assert [a.name for a in plan[:2]] == ["erm/none", "erm/none"] and [a.seed for a in plan[:2]] == [0, 1]
    assert {a.defense.name for a in plan} >= {"coin", "rskff"}  # CUDA's breakers are attackers of the grid
    assert plan[0] == dataclasses.replace(plan[1], seed=0)


def test_an_attacker_at_a_resolution_refuses_sets_of_another_size() -> None:
    import torch

    from verify.data import TensorSet

    quick = get_recipe("quick", epochs=1)
    a = dataclasses.replace(Attacker.of(parse_training("erm", quick), defenses.get("none"), quick), resolution="64")
    s = TensorSet(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]), ["a", "b"], None, "x")
    with pytest.raises(ValueError, match="64 px"):
        train_attacker(s, s, quick, a, "cpu")
