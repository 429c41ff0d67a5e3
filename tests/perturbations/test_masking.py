"""Perceptual budgets: the JND model's values, the weights, and budget="jnd" in the additive methods."""

from __future__ import annotations

import pytest
import torch

import perturbations
from perturbations import Keyring
from perturbations.errors import ConfigError
from perturbations.masking import budget_weights, jnd_levels, parse_budget
from tests.methods import fit_data
from tests.perturbations.test_uc import SURROGATE, _images


def test_jnd_of_flat_images_is_the_luminance_adaptation_curve():
    """Flat luminance b has no texture: JND = 17 (1 - sqrt(b / 127)) + 3 up to 127, then
    3 / 128 (b - 127) + 3: 20 levels in black, 3 in mid-grey, 6 in white."""
    for b, want in ((0, 20.0), (127, 3.0), (255, 6.0), (64, 17 * (1 - (64 / 127) ** 0.5) + 3)):
        y = torch.full((1, 1, 9, 11), float(b))
        assert torch.allclose(jnd_levels(y), torch.full_like(y, want), atol=1e-4), b


def test_texture_raises_the_jnd_and_weights_are_bounded():
    gen = torch.Generator().manual_seed(0)
    flat = torch.full((1, 1, 32, 32), 127.0)
    busy = (127 + 60 * torch.randn(1, 1, 32, 32, generator=gen)).clamp(0, 255)
    assert float(jnd_levels(busy)[..., 4:-4, 4:-4].mean()) > 6.0 > 3.0 + 1e-3 >= float(jnd_levels(flat).max())
    rgb = torch.randint(0, 256, (2, 3, 20, 24), generator=gen)
    w = budget_weights(rgb, 255, 16 / 255)
    assert w.shape == (2, 1, 20, 24) and float(w.min()) > 0 and float(w.max()) <= 1.0
    assert torch.equal(budget_weights(rgb, 255, 1 / 255), torch.ones_like(w))  # eps below any JND: no change
    # 16-bit is read on the 8-bit scale
    assert torch.allclose(budget_weights(rgb * 257, 65535, 16 / 255), w, atol=1e-5)
    assert torch.allclose(budget_weights(rgb, 255, 16 / 255, scale=2.0), (2 * w).clamp(max=1), atol=1e-5)
    assert parse_budget(None, "b") == "flat" and parse_budget("JND", "b") == "jnd"
    with pytest.raises(ValueError, match="one of flat, jnd"):
        parse_budget("jnd2", "b")


@pytest.mark.parametrize("method", ["uc", "salm"])
@pytest.mark.parametrize("kwargs", [dict(budget="pixel"), dict(budget="jnd", jnd_scale=0), dict(jnd_scale="x")])
def test_bad_budget_arguments(method, kwargs):
    with pytest.raises(ConfigError):
        perturbations.get(method)(Keyring.from_seed(0), **kwargs)


@pytest.fixture(scope="module")
def jnd_uc():
    x8, ids, _ = _images(4)
    m = perturbations.get("uc")(Keyring.from_seed(2), clusters=4, surrogate=SURROGATE, steps=8, batch=4,
                                budget="jnd")
    return m.fit(fit_data(x8.float() / 255, [0] * len(ids), ids, 0)), x8, ids


def test_jnd_budget_keeps_flat_regions_under_one_jnd_and_textured_ones_at_eps(jnd_uc):
    """An image whose left half is flat mid-grey and right half strong texture: with budget="jnd"
    the flat half changes by at most its JND (3 levels, rounded), the textured half by several
    times more (up to eps where the JND reaches it);
    the integer and float paths agree; the same key gives the same output; the record holds."""
    m, x8, ids = jnd_uc
    assert m.params()["budget"] == "jnd" and m.params()["jnd_scale"] == 1.0
    gen = torch.Generator().manual_seed(5)
    v = torch.full((len(ids), 3, 64, 64), 127, dtype=torch.uint8)
    v[..., 32:] = torch.randint(0, 256, (len(ids), 3, 64, 32), generator=gen, dtype=torch.uint8)
    out = m.protect_levels(v, None, ids, 255)
    change = (out.int() - v.int()).abs()
    flat, busy = change[..., 4:-4, 2:28], change[..., 4:-4, 36:-2]
    assert int(flat.max()) <= 3 and int(busy.max()) >= 8 and float(busy.float().mean()) > 2 * float(flat.float().mean())
    assert torch.equal(out, (m.apply(v.float() / 255, None, ids) * 255).round().to(torch.uint8))
    plain = perturbations.get("uc")(Keyring.from_seed(2), clusters=4, surrogate=SURROGATE, steps=8, batch=4)
    plain.load_state_dict(m.state_dict())
    full = (plain.protect_levels(v, None, ids, 255).int() - v.int()).abs()
    assert bool((change <= full).all()) and int(full[..., 4:-4, 2:28].max()) == 16  # the weight only lowers
