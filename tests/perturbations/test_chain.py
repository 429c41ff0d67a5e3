"""Composed methods (perturbations.chain): routing of parameters, order, bounds, state, and the
pipeline's resume and --state reuse for a chain."""

from __future__ import annotations


import pytest
import torch
from click.testing import CliRunner

import perturbations
from cli.main import cli
from perturbations import ConfigError, Keyring
from protect import ProtectOptions, protect_folder
from tests.clitools import kill_when_paused
from tests.methods import fit_data, params
from tests.tiny import tree

X = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(3))
LABELS = [i % 3 for i in range(12)]
IDS = [f"{i}.png" for i in range(12)]


def fitted(name: str, seed: int = 0, **extra):
    cls = perturbations.get(name)
    method = cls(Keyring.from_seed(seed), **cls.resolve_params({**params(name), **extra}))
    return method.fit(fit_data(X, LABELS, IDS, 3))


def levels(x: torch.Tensor = X) -> torch.Tensor:
    return x.mul(255).round().to(torch.uint8)


def test_a_chain_is_its_stages_in_order_and_keeps_the_last_stages_bound():
    chain = fitted("cuda+uc")
    v, labels = levels(), torch.tensor(LABELS)
    out = chain.protect_levels(v, labels, IDS)
    first = fitted("cuda").protect_levels(v, labels, IDS)  # same key: the first stage is plain CUDA
    assert torch.equal(chain.stages[0].protect_levels(v, labels, IDS), first)
    bound = int(chain.stages[1].eps * 255 + 1e-9)
    assert 0 < int((out.int() - first.int()).abs().max()) <= bound
    assert torch.equal(out, chain.stages[1].protect_levels(first, labels, IDS))
    assert not torch.equal(out, first)


def test_the_second_stage_fits_on_the_first_stages_output(monkeypatch):
    seen = []
    uc_fit = perturbations.get("uc").fit

    def spy(self, data):
        seen.append(torch.cat([b for b, _ in data.batches((16, 16), channels=3, batch_size=64)]))
        return uc_fit(self, data)

    monkeypatch.setattr(perturbations.get("uc"), "fit", spy)
    chain = fitted("cuda+uc")
    expected = chain.stages[0].apply(X, torch.tensor(LABELS), IDS)
    assert torch.allclose(seen[0], expected) and not torch.allclose(seen[0], X)


def test_chains_are_deterministic_under_the_key_and_differ_across_keys():
    v, labels = levels(), torch.tensor(LABELS)
    a = fitted("cuda+uc", seed=0).protect_levels(v, labels, IDS)
    assert torch.equal(a, fitted("cuda+uc", seed=0).protect_levels(v, labels, IDS))
    assert not torch.equal(a, fitted("cuda+uc", seed=1).protect_levels(v, labels, IDS))


def test_the_state_round_trips_with_prefixed_keys():
    chain = fitted("cuda+salm")
    state = chain.state_dict()
    assert state and all(k.startswith(("cuda:", "salm:")) for k in state)
    assert set(chain.per_image_state) <= set(state) | {"cuda:table_hashes", "cuda:table_clusters"}
    clone = perturbations.get("cuda+salm")(Keyring.from_seed(0), **chain.resolve_params(params("cuda+salm")))
    clone.load_state_dict(state)
    v, labels = levels(), torch.tensor(LABELS)
    assert torch.equal(clone.protect_levels(v, labels, IDS), chain.protect_levels(v, labels, IDS))
    with pytest.raises(ConfigError, match="keys of no stage"):
        clone.load_state_dict({**state, "uc:deltas": torch.zeros(1)})


def test_plain_parameters_go_to_every_stage_that_takes_them():
    cls = perturbations.get("cuda+uc")
    p = cls.resolve_params({"eps": "8/255", "num_classes": 3, "uc.steps": 7})
    assert p["uc.eps"] == "8/255" and p["cuda.num_classes"] == 3 and p["uc.steps"] == 7
    assert p["cuda.surrogate"] is None  # CUDA takes a surrogate only with clusters
    p = cls.resolve_params({"surrogate": "cifar-resnet20"})
    assert p["uc.surrogate"] == "cifar-resnet20" and p["cuda.surrogate"] is None
    p = cls.resolve_params({"surrogate": "cifar-resnet20", "clusters": 4})  # both label-agnostic
    assert p["cuda.surrogate"] == p["uc.surrogate"] == "cifar-resnet20" and p["cuda.clusters"] == 4
    p = cls.resolve_params({"clusters": 4, "uc.clusters": 6})  # a prefixed value wins
    assert (p["cuda.clusters"], p["uc.clusters"]) == (4, 6)
    assert cls(Keyring.from_seed(0), **cls.resolve_params({"clusters": 4, "surrogate": "random:tiny"})).needs_labels is False
    assert cls(Keyring.from_seed(0), **cls.resolve_params({})).needs_labels is True


@pytest.mark.parametrize("name, given, message", [
    ("cuda+uc", {"mask_ratio": 0.1}, "no stage takes parameter 'mask_ratio'"),
    ("cuda+uc", {"salm.eps": 0.1}, "names no stage"),
    ("cuda+uc", {"uc.nope": 1}, "has no parameter"),
    ("cuda+salm", {"surrogate_weights": "w.pt"}, "no stage takes|uses 'surrogate_weights' only with"),
])
def test_bad_chain_parameters_are_one_clear_error(name, given, message):
    cls = perturbations.get(name)
    with pytest.raises(ConfigError, match=message):
        cls(Keyring.from_seed(0), **cls.resolve_params(given))


def test_bad_chain_names():
    with pytest.raises(ConfigError, match="appear once"):
        perturbations.get("uc+uc")
    with pytest.raises(ConfigError, match="empty stage"):
        perturbations.get("cuda+")
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        perturbations.get("cuda+nope")


# -- the pipeline ---------------------------------------------------------------------------
CLI_ARGS = ["--method", "cuda+uc", "--param", "uc.surrogate=cifar-resnet20", "--param", "uc.clusters=3",
            "--param", "uc.steps=3", "--param", "uc.batch=4", "--workers", "1", "--batch-size", "2"]


def test_a_killed_chain_run_resumes_byte_identically_and_its_state_protects_more(tmp_path, make_folder, test_key):
    inp = make_folder(classes=3, per_class=4)
    ref = tmp_path / "ref"
    result = CliRunner().invoke(cli, ["images", str(inp), str(ref), "--key", test_key, *CLI_ARGS, "-q"],
                                env={"PROTECT_KEY": None})
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    args = ["images", str(inp), str(out), "--key", test_key, *CLI_ARGS]
    kill_when_paused([*args, "-q"], tmp_path, PROTECT_TEST_PAUSE_AFTER="4")
    result = CliRunner().invoke(cli, [*args, "-q", "--json"], env={"PROTECT_KEY": None})
    assert result.exit_code == 0, result.output
    assert '"skipped": 0' not in result.stdout  # the journalled files were not redone
    assert tree(out) == tree(ref)

    # --state: more images of the same classes get the chain fitted above
    more = make_folder("more", classes=3, per_class=2)
    from protect.keys import derive_keyring

    summary = protect_folder(more, tmp_path / "more-out", derive_keyring(test_key),
                             ProtectOptions(state_from=str(tmp_path / "ref.protect"), workers=1))
    assert summary.method == "cuda+uc" and summary.done == 6 and summary.failed == 0
