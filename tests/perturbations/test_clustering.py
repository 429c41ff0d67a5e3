"""Keyed K-means, the target derangement and the per-image cluster table."""

from __future__ import annotations

import pytest
import torch

from perturbations.clustering import ClusterTable, derangement, id_hash, kmeans, nearest, normalise
from perturbations.errors import ConfigError


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_kmeans_finds_separated_blobs():
    centres = torch.eye(4, 16) * 10
    x = torch.cat([c + torch.randn(50, 16, generator=_gen(i)) for i, c in enumerate(centres)])
    truth = torch.arange(4).repeat_interleave(50)
    found, assign, inertia = kmeans(x, 4, _gen(7))
    # each found cluster is exactly one true blob
    for c in range(4):
        assert truth[assign == c].unique().numel() == 1
    assert torch.equal(assign, nearest(x, found))
    assert inertia > 0


def test_kmeans_is_deterministic_under_a_key_and_differs_between_keys():
    x = normalise(torch.randn(600, 32, generator=_gen(0)))  # no structure: the seeding decides
    a1 = kmeans(x, 8, _gen(1))[1]
    a2 = kmeans(x, 8, _gen(1))[1]
    b = kmeans(x, 8, _gen(2))[1]
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, b)


def test_kmeans_never_leaves_a_cluster_empty_and_rejects_bad_k():
    x = torch.cat([torch.zeros(30, 4), torch.ones(3, 4)])  # few distinct points
    _, assign, _ = kmeans(x, 2, _gen(3))
    assert torch.bincount(assign, minlength=2).min() > 0
    with pytest.raises(ConfigError):
        kmeans(x, 0, _gen(0))
    with pytest.raises(ConfigError):
        kmeans(x[:3], 4, _gen(0))


@pytest.mark.parametrize("k", range(2, 21))
def test_derangement_has_no_fixed_point(k):
    for seed in range(5):
        t = derangement(k, _gen(seed))
        assert sorted(t.tolist()) == list(range(k))
        assert not bool((t == torch.arange(k)).any())


def test_derangement_depends_on_the_key():
    assert len({tuple(derangement(10, _gen(s)).tolist()) for s in range(10)}) > 1


def test_cluster_table_round_trip_and_missing():
    ids = ["a/1.png", "a/2.png", "b/3.png"]
    t = ClusterTable.build(ids, [2, 0, 1])
    assert t.clusters_of(["b/3.png", "a/1.png"], "x").tolist() == [1, 2]
    assert t.missing(["a/2.png", "c/4.png"]) == [1]
    again = ClusterTable(t.hashes.clone(), t.clusters.clone())
    assert again.clusters_of(ids, "x").tolist() == [2, 0, 1]
    with pytest.raises(ConfigError, match="c/4.png"):
        t.clusters_of(["c/4.png"], "x")
    merged = t.merged(ClusterTable.build(["c/4.png", "a/1.png"], [3, 3]))
    assert merged.clusters_of(["c/4.png", "a/1.png"], "x").tolist() == [3, 2]  # the existing entry wins
    assert id_hash("a/1.png") != id_hash("a/2.png")
