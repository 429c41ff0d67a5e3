"""Class-wise keyed waves: keyed and deterministic, bounded, the same change in every channel, exact
integer arithmetic, scale-free (the attacker's resize keeps the pattern), and a shortcut a model
learns after that resize."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import perturbations
from perturbations import ConfigError, Keyring
from perturbations.waves import parse_cycles

Waves = perturbations.get("waves")


def test_keyed_deterministic_bounded_and_the_same_in_every_channel() -> None:
    """The wave itself (``budget="flat"``: the change is the wave everywhere, exact)."""
    a, b = (Waves(Keyring.from_seed(1), num_classes=3, budget="flat") for _ in range(2))
    other = Waves(Keyring.from_seed(2), num_classes=3, budget="flat")
    assert a.exact and not Waves(Keyring.from_seed(1), num_classes=3).exact
    assert torch.equal(a.waves, b.waves) and not torch.equal(a.waves, other.waves)
    x = torch.randint(0, 256, (4, 3, 40, 56), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0])
    y = a.protect_levels(x, labels)
    assert torch.equal(y, b.protect_levels(x, labels)) and not torch.equal(y, other.protect_levels(x, labels))
    d = y.int() - x.int()
    inner = (x > 16) & (x < 239)  # away from clipping, the change is the wave itself
    assert d.abs().max() <= 16 and d[inner].abs().max() >= 12  # eps 16/255 is the peak, and it is reached
    delta = [a.delta(c, (40, 56)) for c in range(3)]
    for i, c in enumerate(labels.tolist()):
        full = inner[i].all(0)
        assert all(torch.equal(d[i, ch][full], delta[c][full].int()) for ch in range(3))  # brightness, not colour
    assert not torch.equal(delta[0], delta[1])  # class-wise
    # an 8-bit protect_levels is exactly the rounded float apply; a loaded state gives the same bytes
    assert torch.equal((a.apply(x.float() / 255, labels) * 255).round().byte(), y)
    c = Waves(Keyring.from_seed(1), budget="flat")
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.protect_levels(x, labels), y)
    # 16-bit pixels get the change at their own levels
    deep = torch.randint(4096, 60000, (1, 1, 24, 24), dtype=torch.int32)
    out = a.protect_levels(deep, torch.tensor([1]), levels=65535)
    assert (out - deep).abs().max() <= round(16 / 255 * 65535) and (out - deep).abs().max() > 255
    # and under the perceptual budget (int32 arithmetic): random 16-bit texture takes most of the bound
    masked = Waves(Keyring.from_seed(1), num_classes=3).protect_levels(deep, torch.tensor([1]), levels=65535)
    assert round(16 / 255 * 65535) >= (masked - deep).abs().max() > 2000 and masked.dtype == deep.dtype


def test_the_pattern_is_defined_per_shorter_side_so_a_resize_keeps_it() -> None:
    """The change made at a photo's size and downscaled as an attacker does is the change the same
    class gets at the small size (correlation > 0.98 on 3 keys), for both orientations; a pattern
    fixed in pixels would not be."""
    for seed in range(3):
        m = Waves(Keyring.from_seed(seed), num_classes=2)
        for big, small in (((600, 900), (60, 90)), ((900, 600), (64, 43))):
            down = F.interpolate(m.delta(1, big).float()[None, None], size=small, mode="bilinear", antialias=True)
            r = torch.corrcoef(torch.stack([down.flatten(), m.delta(1, small).float().flatten()]))[0, 1]
            assert r > 0.98, (seed, big, float(r))


def flat_and_textured(mean: int, gen: torch.Generator, grain: int = 40, h: int = 96, w: int = 192) -> torch.Tensor:
    """One 8-bit image: the left half flat at ``mean``, the right half the same mean with fine
    texture (+-``grain`` levels of noise)."""
    x = torch.full((1, 3, h, w), mean, dtype=torch.int16)
    x[..., w // 2:] += torch.randint(-grain, grain + 1, (1, 1, h, w // 2), generator=gen, dtype=torch.int16)
    return x.clamp_(0, 255).to(torch.uint8)


def test_the_default_budget_keeps_the_waves_off_flat_areas_at_any_brightness_and_in_texture() -> None:
    """``budget="jnd"``: on flat areas the change stays within the mid-grey JND (3 levels, plus the
    rounding), in the dark as in mid-grey (a dark sky showed light patches under the pixel model's
    8-20 levels); texture takes several times more (+-40 levels of grain: 4.4-4.7x on average over
    4 seeds) at mid-grey and above, within eps; in a dark textured area the dark term keeps it low
    (1.6 levels on average at 60, against 4.4-4.6 at 128 and 4.5-4.7 with ``dark=0``: 16 levels in a
    shadow's wood grain showed as mottling); still brightness only, keyed, deterministic, the
    rounded float apply, the same after a state round trip."""
    gen = torch.Generator().manual_seed(0)
    m = Waves(Keyring.from_seed(3), num_classes=2)
    flat = Waves(Keyring.from_seed(3), num_classes=2, budget="flat")
    no_dark = Waves(Keyring.from_seed(3), num_classes=2, dark=0)
    assert m.params()["budget"] == "jnd" and m.params()["jnd_scale"] == 1.0 and m.params()["dark"] == 2.0
    textured = {}
    for mean in (60, 128, 200):
        x = flat_and_textured(mean, gen)
        y = m.protect_levels(x, torch.tensor([1]))
        d = (y.int() - x.int())[0]
        assert torch.equal(d[0], d[1]) and torch.equal(d[1], d[2])  # brightness, not colour
        left, right = d[0, :, 8:80].abs(), d[0, :, 112:].abs()  # away from the seam the smoothing blurs
        whole = (flat.protect_levels(x, torch.tensor([1])).int() - x.int())[0, 0, :, 8:80].abs()
        assert left.max() <= 4 and whole.max() >= 14, (mean, int(left.max()))
        assert d.abs().max() <= 16, mean
        textured[mean] = float(right.float().mean())
        if mean == 60:
            lit = (no_dark.protect_levels(x, torch.tensor([1])).int() - x.int())[0, 0, :, 112:].abs()
            assert float(lit.float().mean()) >= 2 * textured[60]
        else:
            assert textured[mean] >= 3 * float(left.float().mean()), mean
        assert torch.equal((m.apply(x.float() / 255, torch.tensor([1])) * 255).round().byte(), y)
        c = Waves(Keyring.from_seed(3), dark=2)
        c.load_state_dict(m.state_dict())
        assert torch.equal(c.protect_levels(x, torch.tensor([1])), y)
        assert not torch.equal(Waves(Keyring.from_seed(4), num_classes=2).protect_levels(x, torch.tensor([1])), y)
    assert textured[60] <= 0.5 * textured[128]


def test_the_budget_is_computed_in_strips_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """A photo too large for one strip (here: strips of 7 rows) gets the same bytes as in one strip."""
    import perturbations.waves as waves_module

    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (1, 3, 300, 420), generator=gen, dtype=torch.uint8)
    m = Waves(Keyring.from_seed(5), num_classes=2)
    whole = m.protect_levels(x, torch.tensor([0]))
    monkeypatch.setattr(waves_module, "STRIP_VALUES", 7 * 420)
    m._cache.clear()
    assert torch.equal(m.protect_levels(x, torch.tensor([0])), whole)


def smooth_images(n: int, gen: torch.Generator, size: int = 64) -> torch.Tensor:
    """Photo-like content without any class signal: smooth random colour fields in [0.15, 0.85]."""
    low = torch.rand(n, 3, 6, 6, generator=gen)
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1) * 0.7 + 0.15


@pytest.mark.parametrize("seed", [0, 1])
def test_a_model_trained_at_the_attackers_size_learns_the_classes_from_the_waves_alone(seed: int) -> None:
    """Images whose content carries no class signal, protected at 64 px and downscaled to 16 px:
    a linear (ridge) classifier trained on 300 of them learns the labels from the waves (held-out
    accuracy >= 0.9; measured 1.0 on seeds 0-4 with 200 or 1,000 training images at 8/255) and is
    at chance without them (<= 0.7; measured 0.47-0.54)."""
    gen = torch.Generator().manual_seed(seed)
    m = Waves(Keyring.from_seed(seed), eps="8/255", num_classes=2)

    def data(n: int, protect: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = smooth_images(n, gen)
        y = torch.randint(0, 2, (n,), generator=gen)
        if protect:
            x = m.apply(x, y)
        return F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True).flatten(1), y

    def held_out_accuracy(protect: bool) -> float:
        (xtr, ytr), (xte, yte) = data(300, protect), data(300, protect)
        mean, std = xtr.mean(0), xtr.std(0) + 1e-6
        a, t = ((xtr - mean) / std).double(), (ytr.double() * 2 - 1)
        w = torch.linalg.solve(a.T @ a + 10.0 * torch.eye(a.shape[1], dtype=a.dtype), a.T @ t)  # ridge classifier
        return float(((((xte - mean) / std).double() @ w > 0).long() == yte).double().mean())

    assert held_out_accuracy(True) >= 0.9
    assert held_out_accuracy(False) <= 0.7


def test_bad_parameters_and_missing_labels_are_config_errors() -> None:
    assert parse_cycles("3-8") == (3.0, 8.0) and parse_cycles(4) == (4.0, 4.0)
    for bad in ({"cycles": "8-3"}, {"cycles": "x"}, {"cycles": "0-100"}, {"components": 0}, {"eps": 0},
                {"budget": "soft"}, {"jnd_scale": 0}, {"texture": "x"}, {"dark": -1}):
        with pytest.raises(ConfigError):
            Waves(Keyring.from_seed(0), **bad)
    m = Waves(Keyring.from_seed(0), num_classes=2)
    with pytest.raises(ConfigError, match="label"):
        m.apply(torch.rand(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="0-1"):
        m.apply(torch.rand(1, 3, 8, 8), torch.tensor([2]))
    with pytest.raises(ConfigError, match="fit"):
        Waves(Keyring.from_seed(0)).apply(torch.rand(1, 3, 8, 8), torch.tensor([0]))
