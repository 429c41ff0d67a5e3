"""Every registered method: smoke, state round trip, determinism (parametrised over the registry)."""

from __future__ import annotations

import pytest
import torch

import perturbations
from perturbations import ConfigError, Keyring


from tests.methods import every_method, fit_data, params

IMAGES = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def build(name: str, seed: int = 0) -> perturbations.Perturbation:
    cls = perturbations.get(name)
    method = cls(Keyring.from_seed(seed), **params(name))
    return method.fit(fit_data(IMAGES, [0, 1, 2, 3] * 4, [f"{i}.png" for i in range(16)], 4))


@pytest.mark.parametrize("name", every_method())
def test_method_smoke(name: str) -> None:
    method = build(name)
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = method.apply(x, torch.arange(4), [f"{i}.png" for i in range(4)])
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    assert not torch.equal(out, x)
    assert torch.equal(out, build(name).apply(x, torch.arange(4), [f"{i}.png" for i in range(4)]))
    clone = perturbations.get(name)(Keyring.from_seed(0), **params(name))
    clone.load_state_dict(method.state_dict())
    assert torch.equal(clone.apply(x, torch.arange(4), [f"{i}.png" for i in range(4)]), out)
    assert isinstance(method.params(), dict) and method.summary and method.paper


def test_unknown_method() -> None:
    with pytest.raises(ConfigError, match="unknown method 'nope'.*cuda"):
        perturbations.get("nope")


def test_keyring_streams_are_independent_and_reproducible() -> None:
    k = Keyring.from_seed(5)
    a = torch.rand(8, generator=k.generator("a"))
    assert torch.equal(a, torch.rand(8, generator=Keyring.from_seed(5).generator("a")))
    assert not torch.equal(a, torch.rand(8, generator=k.generator("b")))
    assert 0 <= k.unit("mix", "x.png") < 1 and k.unit("mix", "x.png") == k.unit("mix", "x.png")
    assert k.unit("mix", "x.png") != k.unit("mix", "y.png")
    assert "fingerprint" in repr(k) and k.fingerprint() not in ("", None)
    with pytest.raises(perturbations.KeyMaterialError):
        Keyring(b"short")
