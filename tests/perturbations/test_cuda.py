"""CUDA (Sadasivan et al., CVPR 2023): invariants, determinism under a key, bad arguments."""

from __future__ import annotations

import pytest
import torch

import perturbations
from perturbations import ConfigError, FitData, Keyring
from perturbations.cuda import CUDA, convolve_normalise, defaults_for_side, draw_filters

KEY = Keyring.from_seed(1)


def fitted(num_classes: int = 10, side: int = 32, key: Keyring = KEY, **kw) -> CUDA:
    method = CUDA(key, **kw)
    labels = list(range(num_classes))
    return method.fit(FitData(num_classes, labels, [(side, side)] * num_classes))


def batch(n: int = 8, c: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g)


def test_registered_with_paper_defaults() -> None:
    assert "cuda" in perturbations.available()
    assert perturbations.get("cuda") is CUDA
    assert CUDA.defaults() == {"num_classes": None, "filter_size": None, "blur": None, "padding": "zero",
                               "mix": 1.0, "universal": False}


@pytest.mark.parametrize("side,expected", [(28, (3, 0.3)), (32, (3, 0.3)), (127, (3, 0.3)), (128, (9, 0.06)), (224, (9, 0.06))])
def test_size_rule(side: int, expected: tuple[int, float]) -> None:
    assert defaults_for_side(side) == expected
    m = fitted(side=side)
    assert (m.filter_size, m.blur) == expected
    assert m.filters.shape == (10, expected[0], expected[0])


def test_filter_invariants() -> None:
    m = fitted(filter_size=5, blur=0.2)
    f = m.filters
    assert f.shape == (10, 5, 5)
    # exactly one entry equal to 1 per filter; all others in [0, blur)
    assert ((f == 1.0).flatten(1).sum(1) == 1).all()
    others = f[f != 1.0]
    assert others.min() >= 0 and others.max() < 0.2
    # the peak is not always at the centre: positions are drawn
    peaks = f.flatten(1).argmax(1)
    assert len(set(peaks.tolist())) > 1


def test_output_range_shape_and_channels_share_the_filter() -> None:
    m = fitted()
    x = batch()
    y = torch.arange(8)
    out = m.apply(x, y)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    # every image is normalised by its own global maximum
    assert torch.allclose(out.amax(dim=(1, 2, 3)), torch.ones(8))
    # same filter on every channel: an image with equal channels stays equal
    grey = x[:, :1].expand(-1, 3, -1, -1).contiguous()
    g_out = m.apply(grey, y)
    assert torch.equal(g_out[:, 0], g_out[:, 1]) and torch.equal(g_out[:, 1], g_out[:, 2])


def test_matches_direct_convolution() -> None:
    """The batched depthwise implementation equals a per-image, per-channel convolution."""
    m = fitted(padding="zero")
    x, y = batch(4), torch.tensor([3, 1, 4, 1])
    out = m.apply(x, y)
    for i in range(4):
        f = m.filters[y[i]][None, None]
        ref = torch.cat([torch.nn.functional.conv2d(x[i : i + 1, c : c + 1], f, padding=1) for c in range(3)], 1)
        ref = ref / ref.max()
        assert torch.allclose(out[i : i + 1], ref, atol=1e-6)


def test_grayscale_stays_single_channel() -> None:
    m = fitted(num_classes=2, side=28)
    out = m.apply(batch(4, c=1, h=28, w=28), torch.tensor([0, 1, 0, 1]))
    assert out.shape == (4, 1, 28, 28)


def test_class_dependence() -> None:
    """Same image, different labels -> different outputs; same label -> same output."""
    m = fitted()
    x = batch(1).expand(10, -1, -1, -1)
    out = m.apply(x, torch.arange(10))
    assert all(not torch.equal(out[0], out[i]) for i in range(1, 10))
    assert torch.equal(m.apply(x[:2], torch.tensor([5, 5]))[0], m.apply(x[:2], torch.tensor([5, 5]))[1])


def test_deterministic_under_key_and_independent_of_batching() -> None:
    x, y = batch(16), torch.arange(16) % 10
    a = fitted().apply(x, y)
    b = fitted().apply(x, y)
    assert torch.equal(a, b)
    single = torch.cat([fitted().apply(x[i : i + 1], y[i : i + 1]) for i in range(16)])
    assert torch.equal((a * 255).round(), (single * 255).round())
    other = fitted(key=Keyring.from_seed(2)).apply(x, y)
    assert not torch.allclose(a, other)
    assert not torch.equal(fitted().filters, fitted(key=Keyring.from_seed(2)).filters)


def test_filters_come_from_their_own_stream() -> None:
    """The key's filter stream is not the global torch RNG (no training seed leaks in)."""
    torch.manual_seed(0)
    a = fitted().filters
    torch.manual_seed(123)
    b = fitted().filters
    assert torch.equal(a, b)
    expected = draw_filters(KEY.generator("cuda/filters"), 10, 3, 0.3)
    assert torch.equal(a, expected)


def test_universal_ablation_shares_one_filter() -> None:
    m = fitted(universal=True)
    assert all(torch.equal(m.filters[0], m.filters[i]) for i in range(10))


@pytest.mark.parametrize("padding", ["reflect", "replicate", "zero", "faithful"])
def test_padding_modes(padding: str) -> None:
    m = fitted(padding=padding)
    x = torch.full((2, 3, 16, 16), 0.5)
    out = m.apply(x, torch.tensor([0, 1]))
    border = out[:, :, 0, :].mean()
    centre = out[:, :, 8, 8].mean()
    if padding in ("zero", "faithful"):
        assert border < centre - 0.01  # the dark frame a detector can spot
    else:
        assert torch.allclose(out, torch.ones_like(out))  # flat image stays flat (max-normalised)


def test_reflect_padding_on_tiny_images_falls_back() -> None:
    m = fitted(filter_size=9, blur=0.06)
    out = m.apply(batch(2, h=3, w=3), torch.tensor([0, 1]))
    assert out.shape == (2, 3, 3, 3) and torch.isfinite(out).all()


def test_black_image_stays_black() -> None:
    out = fitted().apply(torch.zeros(1, 3, 8, 8), torch.tensor([0]))
    assert torch.equal(out, torch.zeros(1, 3, 8, 8))


def test_mix_protects_a_keyed_fraction() -> None:
    m = fitted(mix=0.5)
    ids = [f"img{i}.png" for i in range(200)]
    x, y = batch(200, h=8, w=8), torch.arange(200) % 10
    out = m.apply(x, y, ids)
    changed = [not torch.equal(out[i], x[i]) for i in range(200)]
    assert changed == m.is_protected(ids)
    assert 70 < sum(changed) < 130
    # the choice depends on the image id, not on its position in the batch
    rev = m.apply(x.flip(0), y.flip(0), ids[::-1])
    assert torch.equal(rev.flip(0), out)
    with pytest.raises(ConfigError, match="id"):
        m.apply(x, y)


def test_state_round_trip() -> None:
    m = fitted(side=200)
    fresh = CUDA(Keyring.from_seed(99))
    fresh.load_state_dict(m.state_dict())
    x, y = batch(3, h=40, w=40), torch.tensor([0, 4, 9])
    assert torch.equal(fresh.apply(x, y), m.apply(x, y))
    with pytest.raises(ConfigError):
        fresh.load_state_dict({})


@pytest.mark.parametrize(
    "kwargs,match",
    [({"filter_size": 4}, "odd"), ({"filter_size": 0}, "odd"), ({"blur": 0.0}, "blur"), ({"blur": 1.5}, "blur"),
     ({"mix": 0.0}, "mix"), ({"mix": 1.2}, "mix"), ({"padding": "wrap"}, "padding"), ({"num_classes": 0}, "num_classes")],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        CUDA(KEY, **kwargs)


def test_bad_batches() -> None:
    m = fitted()
    with pytest.raises(ConfigError, match="labels"):
        m.apply(batch(2), None)
    with pytest.raises(ConfigError, match="labels"):
        m.apply(batch(2), torch.tensor([0, 10]))
    with pytest.raises(ConfigError):
        m.apply(torch.rand(2, 4, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="Keyring"):
        CUDA("not a key")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="class labels"):
        CUDA(KEY).fit(FitData(0, None, []))


def test_convolve_normalise_identity_filter() -> None:
    x = batch(2)
    ident = torch.zeros(2, 3, 3)
    ident[:, 1, 1] = 1
    out = convolve_normalise(x, ident)
    assert torch.allclose(out, x / x.amax(dim=(1, 2, 3), keepdim=True))
