"""verify.uncertainty: the keyed validation split and the bootstrap interval of the headline score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from verify.certificate import score
from verify.data import TensorSet
from verify.uncertainty import bootstrap_interval, split_validation


def _set(counts: list[int], sha: str = "ab" * 32) -> TensorSet:
    y = torch.cat([torch.full((n,), k, dtype=torch.int64) for k, n in enumerate(counts)])
    x = torch.arange(len(y) * 3 * 4 * 4, dtype=torch.int64).remainder(256).to(torch.uint8).view(len(y), 3, 4, 4)
    return TensorSet(x, y, [f"c{k}" for k in range(len(counts))], Path("/t"), sha, [f"{i}.png" for i in range(len(y))])


def test_the_split_is_stratified_disjoint_complete_and_keyed_by_the_test_set() -> None:
    test = _set([100, 30, 2, 1])
    val, rest = split_validation(test)
    assert val.counts() == [20, 6, 1, 0] and rest.counts() == [80, 24, 1, 1]  # a class of one stays scored
    assert sorted(val.rels + rest.rels) == sorted(test.rels) and not set(val.rels) & set(rest.rels)
    again, _ = split_validation(test)
    assert again.rels == val.rels  # the same test set: the same split, in every cell and run
    other, _ = split_validation(_set([100, 30, 2, 1], sha="cd" * 32))
    assert other.rels != val.rels  # another test set: another draw
    assert val.sha256 != rest.sha256 != test.sha256


def _preds(y: np.ndarray, acc: float, rng: np.random.Generator) -> list[int]:
    """Predictions right on a fraction ``acc`` of the images (at random), else a wrong class."""
    right = rng.random(y.shape[0]) < acc
    return np.where(right, y, (y + 1) % 10).tolist()


def test_the_interval_covers_the_score_and_shrinks_with_more_test_images() -> None:
    rng = np.random.default_rng(0)
    widths = []
    for n in (200, 5000):
        y = np.arange(n) % 10
        ref, prot = _preds(y, 0.7, rng), _preds(y, 0.3, rng)
        point = score(np.mean(np.array(ref) == y), np.mean(np.array(prot) == y), 0.1)
        lo, hi = bootstrap_interval([ref], [[prot]], y.tolist(), "accuracy", 0.1)
        assert lo < point < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 3  # ~ 1/sqrt(n): 5x narrower for 25x the images


def test_a_protection_that_does_nothing_gets_an_interval_around_zero() -> None:
    rng = np.random.default_rng(1)
    y = np.arange(300) % 10
    ref = _preds(y, 0.6, rng)
    cells = [[_preds(y, 0.6, rng)], [_preds(y, 0.58, rng)]]  # as good as the clean reference
    lo, hi = bootstrap_interval([ref], cells, y.tolist(), "accuracy", 0.1)
    assert lo < 0 < hi


def test_seeds_widen_the_interval_and_balanced_accuracy_is_supported() -> None:
    rng = np.random.default_rng(2)
    y = np.array([0] * 300 + [1] * 60)
    same = _preds(y, 0.5, rng)
    one = bootstrap_interval([_preds(y, 0.9, rng)], [[same]], y.tolist(), "balanced_accuracy", 0.5)
    spread = bootstrap_interval([_preds(y, 0.9, rng), _preds(y, 0.9, rng)],
                                [[same, _preds(y, 0.8, rng)]], y.tolist(), "balanced_accuracy", 0.5)
    assert one is not None and spread is not None and one[0] <= one[1] and spread[0] <= spread[1]
    assert spread[1] - spread[0] > one[1] - one[0]  # seeds that disagree add their spread


def test_missing_predictions_give_no_interval() -> None:
    assert bootstrap_interval([[]], [[[0, 1]]], [0, 1], "accuracy", 0.5) is None
    assert bootstrap_interval([[0, 1]], [[[0]]], [0, 1], "accuracy", 0.5) is None
    with pytest.raises(ValueError):
        split_validation(_set([4, 4]), fraction=1.0)
