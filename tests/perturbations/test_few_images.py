"""Fewer images than clusters (issue 17): at most one cluster per image, recorded and said; too few
images to cluster at all are refused with a hint to --state."""

from __future__ import annotations

import pytest
import torch

import perturbations
from perturbations import ConfigError, Keyring
from tests.methods import fit_data
from tests.perturbations.test_uc import _images

SURROGATE = "cifar-resnet20"
QUICK = dict(surrogate=SURROGATE, steps=4, batch=2)


@pytest.fixture(scope="module")
def three():
    x8, ids, _ = _images(per_class=1)
    return x8[:3].float() / 255, ids[:3], x8[3:5].float() / 255, ids[3:5]


def _data(x, ids):
    return fit_data(x, [0] * len(ids), ids, 0)


def _uc(seed: int = 1, **extra):
    return perturbations.get("uc")(Keyring.from_seed(seed), clusters=10, **{**QUICK, **extra})


def test_uc_fits_three_images_with_ten_clusters_deterministically(three):
    x, ids, _, _ = three
    a, b = _uc(), _uc()
    a.fit(_data(x, ids))
    b.fit(_data(x, ids))
    assert a.clusters.k == 10 and a.clusters.k_eff == 3 and a.deltas.shape[0] == 3
    assert sorted(a.cluster_of(ids)) == [0, 1, 2]  # one cluster per image
    assert torch.equal(a.deltas, b.deltas) and torch.equal(a.targets, b.targets)
    levels = (x * 255).round().to(torch.uint8)
    assert torch.equal(a.protect_levels(levels, ids=ids), b.protect_levels(levels, ids=ids))
    c = _uc(seed=2)
    c.fit(_data(x, ids))
    assert not torch.equal(a.deltas, c.deltas)
    assert sorted(a.targets.tolist()) == [0, 1, 2] and all(int(t) != i for i, t in enumerate(a.targets))


def test_the_fewer_clusters_are_recorded_and_said(three):
    x, ids, _, _ = three
    method = _uc()
    method.fit(_data(x, ids))
    report = method.fit_report()
    assert report["clusters_used"] == 3
    note = report["clusters_note"]
    assert "\n" not in note and "3 clusters, not the 10 asked for" in note and "--state RECORD" in note
    assert note in method.notes() and method.notes()[0] == method.surrogate_choice
    state = method.state_dict()
    assert int(state["clusters_used"]) == 3 and state["centres"].shape[0] == 3
    assert method.params()["clusters"] == 10  # the parameter stays what was asked for


def test_the_state_reloads_and_takes_new_images(three):
    x, ids, new_x, new_ids = three
    method = _uc()
    method.fit(_data(x, ids))
    state = method.state_dict()
    fresh = _uc()
    fresh.load_state_dict(state)
    assert fresh.clusters.k_eff == 3 and fresh.fit_report()["clusters_used"] == 3
    levels = (x * 255).round().to(torch.uint8)
    assert torch.equal(fresh.protect_levels(levels, ids=ids), method.protect_levels(levels, ids=ids))
    # --state: a finished run's clusters take new photos without a fit (the per-image table is not carried)
    later = _uc()
    later.load_state_dict({k: v for k, v in state.items() if k not in later.per_image_state})
    assert later.extend(_data(new_x, new_ids))
    assert set(later.cluster_of(new_ids)) <= {0, 1, 2}
    out = later.protect_levels((new_x * 255).round().to(torch.uint8), ids=new_ids)
    assert out.shape == new_x.shape


def test_inconsistent_fewer_cluster_states_are_refused(three):
    x, ids, _, _ = three
    method = _uc()
    method.fit(_data(x, ids))
    state = method.state_dict()
    with pytest.raises(ConfigError, match="clusters"):
        _uc().load_state_dict({**state, "clusters_used": torch.tensor(2)})
    no_mark = {k: v for k, v in state.items() if k != "clusters_used"}
    with pytest.raises(ConfigError, match="3 clusters, the method 10"):
        _uc().load_state_dict(no_mark)
    with pytest.raises(ConfigError, match="clusters"):  # more centres than the method's K
        perturbations.get("uc")(Keyring.from_seed(1), clusters=2, **QUICK).load_state_dict(state)


def test_one_image_is_refused_with_a_hint_to_state(three):
    x, ids, _, _ = three
    with pytest.raises(ConfigError) as e:
        _uc().fit(_data(x[:1], ids[:1]))
    msg = str(e.value)
    assert "\n" not in msg and "at least 2 readable images, got 1" in msg
    assert "--clusters" in msg and "--state RECORD" in msg
    cuda = perturbations.get("cuda")(Keyring.from_seed(1), clusters=5, surrogate=SURROGATE)
    with pytest.raises(ConfigError, match="--state RECORD"):
        cuda.fit(_data(x[:1], ids[:1]))


def test_clustered_cuda_fits_three_images_with_ten_clusters(three):
    x, ids, _, _ = three
    make = perturbations.get("cuda")
    a = make(Keyring.from_seed(1), clusters=10, surrogate=SURROGATE)
    b = make(Keyring.from_seed(1), clusters=10, surrogate=SURROGATE)
    a.fit(_data(x, ids))
    b.fit(_data(x, ids))
    assert a.clusters.k_eff == 3 and a.fit_report()["clusters_used"] == 3
    levels = (x * 255).round().to(torch.uint8)
    assert torch.equal(a.protect_levels(levels, ids=ids), b.protect_levels(levels, ids=ids))
    fresh = make(Keyring.from_seed(1), clusters=10, surrogate=SURROGATE)
    fresh.load_state_dict(a.state_dict())
    assert torch.equal(fresh.protect_levels(levels, ids=ids), a.protect_levels(levels, ids=ids))


def test_a_run_of_three_photos_then_one_more_with_state(tmp_path, keyring):
    """The photographer's case: a small flat folder with K=10, then one new photo via --state."""
    from PIL import Image

    from protect import ProtectOptions, protect_folder

    x8, _, _ = _images(per_class=1)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(x8[i].permute(1, 2, 0).numpy()).save(folder / f"p{i}.png")
    later = tmp_path / "later"
    later.mkdir()
    (folder / "p3.png").rename(later / "p3.png")
    opts = dict(method="uc", params={"surrogate": SURROGATE, "steps": 3, "batch": 2}, workers=1)
    summary = protect_folder(folder, tmp_path / "out", keyring, ProtectOptions(**opts))
    assert summary.done == 3 and summary.failed == 0
    assert summary.fit_report["clusters_used"] == 3 and "--state RECORD" in summary.fit_report["clusters_note"]
    with pytest.raises(perturbations.ProtectError, match="--state RECORD"):
        protect_folder(later, tmp_path / "alone", keyring, ProtectOptions(**opts))
    more = protect_folder(later, tmp_path / "more", keyring,
                          ProtectOptions(state_from=tmp_path / "out.protect", workers=1))
    assert more.done == 1 and more.failed == 0
