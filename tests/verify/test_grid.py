"""verify.grid: the default grid follows the method that protected the folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from perturbations.errors import ConfigError
from protect.keys import derive_keyring
from protect.pipeline import ProtectOptions, protect_folder
from tests.tiny import copy_classes
from verify.grid import breakers_report, build_grid, known_breakers, recorded_method
from verify.recipes import get_recipe

RECIPE = get_recipe("quick")


def cells(grid) -> list[str]:
    return [f"{t.name}/{d.name}" for t, d in grid.pairs]


def test_each_method_brings_its_published_breakers_and_linf_runs_once_without_a_defense() -> None:
    assert cells(build_grid(None, None, RECIPE)) == ["erm/none", "erm/grayscale", "erm/jpeg10", "linf/none"]
    assert cells(build_grid(None, None, RECIPE, "cuda")) == [
        "erm/none", "erm/grayscale", "erm/jpeg10", "erm/coin", "erm/rskff", "linf/none"]
    assert cells(build_grid(None, None, RECIPE, "uc"))[-2:] == ["erm/ueraser", "linf/none"]
    assert "erm/ueraser" in cells(build_grid(None, None, RECIPE, "salm"))
    union = cells(build_grid(None, None, RECIPE, "cuda+uc"))
    assert {"erm/coin", "erm/rskff", "erm/ueraser", "erm/jpeg10", "erm/grayscale"} <= set(union)
    assert len(union) == len(set(union))  # a breaker of both stages is trained once
    assert known_breakers("cuda+uc") == ["coin", "rskff", "jpeg10", "grayscale", "ueraser"]


def test_a_grid_given_by_hand_is_the_full_product_and_says_what_it_left_out() -> None:
    g = build_grid("erm,linf", "none,grayscale", RECIPE, "cuda")
    assert cells(g) == ["erm/none", "erm/grayscale", "linf/none", "linf/grayscale"] and not g.default
    report = breakers_report(g)
    assert report["known"] == ["coin", "rskff", "linf"] and report["in_grid"] == ["linf"]
    assert report["left_out"] == ["coin", "rskff"] and "COIN" in report["source"]
    assert breakers_report(build_grid(None, None, RECIPE, "cuda"))["left_out"] == []
    assert breakers_report(build_grid("erm", "none", RECIPE))["left_out"] == ["linf"]
    with pytest.raises(ConfigError, match="--method"):
        build_grid(None, None, RECIPE, "nonsense")


def test_the_method_is_read_from_the_run_record_beside_the_folder(tmp_path: Path) -> None:
    src = copy_classes("train", tmp_path / "in", 2)
    out = tmp_path / "out"
    assert recorded_method(out) is None  # nothing there yet
    protect_folder(src, out, derive_keyring("grid-test-key"), ProtectOptions(method="cuda"))
    assert recorded_method(out) == "cuda"
    assert recorded_method(src) is None  # the originals have no record
