"""CUDA (Sadasivan et al., CVPR 2023): invariants, determinism under a key, bad arguments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import perturbations
from perturbations import ConfigError, FitData, Keyring
from perturbations.cuda import CUDA, convolve_normalise, defaults_for_side, draw_filters, integer_filters, weight_bits

KEY = Keyring.from_seed(1)


def fitted(num_classes: int = 10, side: int = 32, key: Keyring = KEY, **kw) -> CUDA:
    method = CUDA(key, **kw)
    labels = list(range(num_classes))
    return method.fit(FitData(num_classes, labels, [(side, side)] * num_classes))


def batch(n: int = 8, c: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    """Random 8-bit images as float in [0, 1] (what the pipeline decodes)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g).float() / 255


def exact_reference(v: np.ndarray, filt: np.ndarray, padding: str, rescale: str = "peak",
                    levels: int = 255) -> np.ndarray:
    """An independent, obviously exact CUDA: int64 sums of shifted integer images (one image
    C x H x W of integers on the grid 0..levels, integer filter k x k), divided by the maximum in
    float64 and cast to float32 like the method (float32 division for 8-bit values is the same
    correctly rounded result). ``rescale``: ``"input"`` multiplies the float64 quotient by the input's
    maximum as a float32 ``max / levels``; ``"auto"`` does so unless every value is on the 8-bit grid."""
    k = filt.shape[0]
    r = k // 2
    mode = {"zero": "constant", "reflect": "reflect", "replicate": "edge"}[padding]
    p = np.pad(v.astype(np.int64), ((0, 0), (r, r), (r, r)), mode=mode)
    h, w = v.shape[1:]
    acc = np.zeros(v.shape, dtype=np.int64)
    for i in range(k):
        for j in range(k):
            acc += int(filt[i, j]) * p[:, i:i + h, j:j + w]
    r = acc / max(1, int(acc.max()))
    eight_bit = not np.any(v.astype(np.int64) * 255 % levels)
    if rescale == "input" or (rescale == "auto" and not eight_bit):
        r = r * np.float64(np.float32(v.max()) / np.float32(levels))
    return r.astype(np.float32)


def quantised(y: np.ndarray, levels: int) -> np.ndarray:
    """``round(y * levels)`` in float32, as the method quantises."""
    return np.rint(y * np.float32(levels)).astype(np.int64)


def psnr(a: torch.Tensor, b: torch.Tensor, levels: int) -> float:
    mse = float(((a.double() - b.double()) / levels).pow(2).mean())
    return 10 * float(np.log10(1 / mse))


def twelve_bit(n: int = 2, side: int = 48, seed: int = 0) -> torch.Tensor:
    """Smooth 12-bit grey images (values 128..2191, like pydicom's CT_small), int32 N x 1 x H x W."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    base = 0.5 + 0.5 * torch.sin(6 * xx + 3 * yy)[None, None] * torch.cos(4 * yy)[None, None]
    noise = torch.rand(n, 1, side, side, generator=g) * 0.1
    img = (base + noise - (base + noise).amin()) / (base + noise - (base + noise).amin()).amax()
    return (128 + img * (2191 - 128)).round().to(torch.int32)


def test_registered_with_paper_defaults() -> None:
    assert "cuda" in perturbations.available()
    assert perturbations.get("cuda") is CUDA
    assert CUDA.defaults() == {"num_classes": None, "filter_size": None, "blur": None, "padding": "zero",
                               "mix": 1.0, "universal": False, "clusters": None, "surrogate": None,
                               "surrogate_weights": None, "rescale": "auto",
                               "reference": None}


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
    """The batched depthwise implementation equals a per-image, per-channel float convolution
    (up to float rounding)."""
    m = fitted(padding="zero")
    x, y = batch(4), torch.tensor([3, 1, 4, 1])
    out = m.apply(x, y)
    for i in range(4):
        f = m.filters[y[i]][None, None]
        ref = torch.cat([torch.nn.functional.conv2d(x[i : i + 1, c : c + 1], f, padding=1) for c in range(3)], 1)
        ref = ref / ref.max()
        assert torch.allclose(out[i : i + 1], ref, atol=1e-6)


@pytest.mark.parametrize("padding", ["zero", "reflect", "replicate"])
@pytest.mark.parametrize("size,side", [(3, 32), (9, 40)])
def test_exact_integer_arithmetic(padding: str, size: int, side: int) -> None:
    """Bit for bit equal to an int64 reference: the convolution has one exact result, so no
    kernel, ISA, thread count or batch shape can change a byte."""
    m = fitted(padding=padding, filter_size=size, blur=0.06 if size == 9 else 0.3, side=side)
    x, y = batch(5, h=side, w=side + 3, seed=7), torch.tensor([0, 9, 3, 3, 7])
    out = m.apply(x, y)
    ints = integer_filters(m.filters)
    v = (x * 255).round().numpy()
    for i in range(5):
        ref = exact_reference(v[i], ints[y[i]].numpy(), padding)
        assert np.array_equal(out[i].numpy(), ref), i


def test_filters_lie_on_an_exact_grid() -> None:
    for size, blur, bits in ((3, 0.3, 14), (9, 0.06, 13)):
        m = fitted(filter_size=size, blur=blur)
        assert weight_bits(size, blur) == bits
        ints = m.filters * (1 << bits)
        assert torch.equal(ints, ints.round())
        assert (ints.flatten(1).sum(1) * 255 < 2**24).all()


def test_protect_levels_equals_quantised_apply_for_8_and_16_bits() -> None:
    m = fitted(filter_size=5, blur=0.2)
    y = torch.tensor([1, 2, 5])
    v8 = (batch(3, h=20, w=24, seed=3) * 255).round().to(torch.uint8)
    q8 = m.protect_levels(v8, y)
    assert q8.dtype == torch.uint8 and q8.shape == v8.shape
    assert torch.equal(q8, (m.apply(v8.float() / 255, y) * 255).round().to(torch.uint8))
    g = torch.Generator().manual_seed(4)
    v16 = torch.randint(0, 60000, (3, 1, 20, 24), generator=g, dtype=torch.int32)
    for rescale, top in (("peak", torch.full((3,), 65535)), ("auto", v16.amax(dim=(1, 2, 3)))):
        m = fitted(filter_size=5, blur=0.2, rescale=rescale)
        q16 = m.protect_levels(v16, y, levels=65535)
        assert q16.dtype == torch.int32 and int(q16.min()) >= 0
        assert torch.equal(q16.amax(dim=(1, 2, 3)), top)
        assert torch.equal(q16, (m.apply(v16.float() / 65535, y) * 65535).round().to(torch.int32))
        # 16-bit values are convolved exactly too (split into two 8-bit halves)
        ints = integer_filters(m.filters)
        ref = exact_reference(v16[0].numpy(), ints[1].numpy(), "zero", rescale, 65535)
        assert np.array_equal(m.apply(v16[:1].float() / 65535, y[:1])[0].numpy(), ref)


@pytest.mark.parametrize("rescale", ["peak", "input", "auto"])
@pytest.mark.parametrize("levels", [255, 4095, 65535])
@pytest.mark.parametrize("padding", ["zero", "reflect"])
def test_rescale_modes_are_exact(rescale: str, levels: int, padding: str) -> None:
    """Every mode, on every depth, equals the int64 reference bit for bit, in apply (float) and in
    protect_levels (integers): protect_levels(v) == round(apply(v / levels) * levels)."""
    m = fitted(filter_size=5, blur=0.2, padding=padding, rescale=rescale)
    g = torch.Generator().manual_seed(levels)
    dtype = torch.uint8 if levels == 255 else torch.int32
    v = torch.randint(0, levels // 2, (4, 3, 17, 21), generator=g).to(dtype)
    step = levels // math.gcd(levels, 255)  # image 1: 8-bit content (multiples of 257 at 16 bits)
    v[1] = (torch.randint(0, levels // step + 1, v[1].shape, generator=g) * step).to(dtype)
    v[2, 0, 0, 0] = levels  # image 2 reaches the top of the grid
    y = torch.tensor([0, 3, 7, 9])
    out = m.apply(v.float() / levels, y)
    q = m.protect_levels(v, y, levels=levels)
    assert q.dtype == dtype
    assert torch.equal(q, (out * levels).round().to(dtype))
    if rescale != "input":
        assert float(out[1].amax()) == 1.0  # 8-bit content: the paper's peak rescaling
    ints = integer_filters(m.filters)
    for i in range(4):
        ref = exact_reference(v[i].numpy(), ints[y[i]].numpy(), padding, rescale, levels)
        assert np.array_equal(out[i].numpy(), ref), i
        assert np.array_equal(q[i].numpy().astype(np.int64), quantised(ref, levels)), i


def test_auto_leaves_8_bit_images_byte_identical() -> None:
    """8-bit images: auto is the paper's peak rescaling, byte for byte (apply and protect_levels)."""
    x, y = batch(6, seed=11), torch.tensor([0, 1, 2, 3, 4, 5])
    v = (x * 255).round().to(torch.uint8)
    auto, peak = fitted(), fitted(rescale="peak")
    assert torch.equal(auto.apply(x, y), peak.apply(x, y))
    assert torch.equal(auto.protect_levels(v, y), peak.protect_levels(v, y))
    assert (auto.protect_levels(v, y).flatten(1).amax(1) == 255).all()
    # an 8-bit image stored at 16 bits (every value a multiple of 257) is 8-bit content: peak too
    v16 = v.to(torch.int32) * 257
    assert torch.equal(auto.protect_levels(v16, y, levels=65535), peak.protect_levels(v16, y, levels=65535))


def test_input_equals_peak_when_the_image_reaches_the_top() -> None:
    x, y = batch(6, seed=12), torch.arange(6)
    v = (x * 255).round().to(torch.uint8)
    v[:, 0, 0, 0] = 255
    assert torch.equal(fitted(rescale="input").protect_levels(v, y), fitted(rescale="peak").protect_levels(v, y))
    x = v.float() / 255
    assert torch.equal(fitted(rescale="input").apply(x, y), fitted(rescale="peak").apply(x, y))
    v12 = twelve_bit(2)
    v12[:, 0, 5, 5] = 4095
    y2 = torch.tensor([3, 8])
    assert torch.equal(fitted().protect_levels(v12, y2, levels=4095),
                       fitted(rescale="peak").protect_levels(v12, y2, levels=4095))


@pytest.mark.parametrize("padding", ["zero", "reflect"])
def test_twelve_bit_image_keeps_its_range(padding: str) -> None:
    """A 12-bit image (values 128..2191 of 4095): auto keeps each image's maximum exactly and stays
    far closer to the input than the paper's peak rescaling, which stretches it to 4095."""
    v, y = twelve_bit(3), torch.tensor([1, 4, 4])
    auto = fitted(padding=padding).protect_levels(v, y, levels=4095)
    peak = fitted(padding=padding, rescale="peak").protect_levels(v, y, levels=4095)
    assert torch.equal(auto.amax(dim=(1, 2, 3)), v.amax(dim=(1, 2, 3)))
    assert (peak.amax(dim=(1, 2, 3)) == 4095).all()
    close, stretched = psnr(auto, v, 4095), psnr(peak, v, 4095)
    assert close > stretched + 15 and close > 25, (close, stretched)
    assert not torch.equal(auto, v)  # still protected


def test_auto_decides_per_image_whatever_the_batch() -> None:
    """8-bit content and deep images in one batch each get the result they get alone."""
    m = fitted(filter_size=5, blur=0.2)
    g = torch.Generator().manual_seed(5)
    deep = torch.randint(0, 40000, (2, 3, 16, 16), generator=g, dtype=torch.int32)
    eight = (batch(2, h=16, w=16, seed=6) * 255).round().to(torch.int32) * 257
    v, y = torch.cat([deep[:1], eight[:1], deep[1:], eight[1:]]), torch.tensor([0, 1, 2, 3])
    together = m.protect_levels(v, y, levels=65535)
    alone = torch.cat([m.protect_levels(v[i:i + 1], y[i:i + 1], levels=65535) for i in range(4)])
    assert torch.equal(together, alone)
    assert (together[1].amax() == 65535) and (together[3].amax() == 65535)  # peak: 8-bit content
    assert torch.equal(together[[0, 2]].amax(dim=(1, 2, 3)), deep.amax(dim=(1, 2, 3)))  # input
    assert torch.equal((m.apply(v.float() / 65535, y) * 65535).round().to(torch.int32), together)


def test_params_record_the_rescale_mode() -> None:
    assert fitted().params()["rescale"] == "auto"
    assert "8-bit" in fitted().params()["rescale_rule"]
    assert fitted(rescale="input").params()["rescale"] == "input"


def test_large_images_in_strips_equal_one_piece(monkeypatch) -> None:
    """Row strips (used for photos) give exactly the one-piece result."""
    import perturbations.cuda as cuda_mod

    m = fitted(filter_size=9, blur=0.06, side=200)
    v = (batch(2, h=61, w=50, seed=5) * 255).round().to(torch.uint8)
    y = torch.tensor([4, 8])
    whole = m.protect_levels(v, y)
    v12 = twelve_bit(2, side=61)[..., :50].expand(-1, 3, -1, -1).contiguous()
    whole12 = m.protect_levels(v12, y, levels=4095)
    monkeypatch.setattr(cuda_mod, "STRIP_VALUES", 50 * 3 * 7)  # 7-row strips
    assert torch.equal(m.protect_levels(v, y), whole)
    assert torch.equal(torch.cat([m.protect_levels(v[i:i + 1], y[i:i + 1]) for i in range(2)]), whole)
    assert torch.equal(m.protect_levels(v12, y, levels=4095), whole12)  # rescale to the input's maximum


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
    x = torch.full((2, 3, 16, 16), 128 / 255)  # 8-bit: the paper's max-normalisation
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
     ({"mix": 0.0}, "mix"), ({"mix": 1.2}, "mix"), ({"padding": "wrap"}, "padding"),
     ({"num_classes": 0}, "num_classes"),
     ({"rescale": "max"}, "rescale must be one of auto, peak, input"), ({"rescale": None}, "rescale"),
     ({"reference": 4}, "reference must be"), ({"reference": 32.5}, "reference must be")],
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
    # any float input is taken at 16-bit precision
    xf = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(convolve_normalise(xf, ident), xf / xf.amax(dim=(1, 2, 3), keepdim=True), atol=2e-5)


# -- reference resolution: dilated filters --------------------------------------------------------
def dilated(filt: np.ndarray, s: int) -> np.ndarray:
    """``filt`` (k x k) with taps ``s`` apart: a ``s (k - 1) + 1`` square filter, zeros in between."""
    k = filt.shape[0]
    out = np.zeros((s * (k - 1) + 1,) * 2, dtype=filt.dtype)
    out[::s, ::s] = filt
    return out


@pytest.mark.parametrize("padding", ["zero", "reflect"])
@pytest.mark.parametrize("h,w,s", [(97, 128, 3), (128, 96, 3), (40, 33, 1), (70, 64, 2)])
def test_reference_is_the_exact_dilated_filter(padding: str, h: int, w: int, s: int) -> None:
    """With ``reference=32`` each image is convolved with its class filter dilated by
    round(shorter side / 32), exactly (an independent int64 convolution with the zero-stuffed filter)."""
    m = fitted(reference=32, padding=padding, side=h)
    assert (m.filter_size, m.blur) == (3, 0.3)  # the paper's setting for the reference, not for h
    v = (batch(2, h=h, w=w, seed=3) * 255).round().to(torch.uint8)
    y = torch.tensor([2, 7])
    got = m.protect_levels(v, y).numpy().astype(np.int64)
    ints = integer_filters(m.filters).numpy()
    for i in range(2):
        want = quantised(exact_reference(v[i].numpy(), dilated(ints[int(y[i])], s), padding), 255)
        assert np.array_equal(got[i], want)


def test_reference_at_its_own_size_changes_nothing() -> None:
    """At the reference size (dilation 1) the output is byte for byte the paper's CUDA."""
    x = batch(4, h=32, w=40, seed=1)
    y = torch.tensor([0, 3, 5, 9])
    assert torch.equal(fitted(reference=32).apply(x, y), fitted().apply(x, y))
    assert fitted(reference=32).params()["reference"] == 32 and fitted().params()["reference"] is None


def _unit_peak(t: torch.Tensor) -> torch.Tensor:
    return t / t.amax(dim=(1, 2, 3), keepdim=True)


@pytest.mark.parametrize("padding", ["zero", "reflect"])
def test_attacker_downscale_sees_the_papers_filter(padding: str) -> None:
    """The reason for ``reference``: downscaling the protected 128-px image 4x (box filter) gives the
    paper's CUDA of the downscaled clean image (up to each image's peak normalisation), while the
    unreferenced 9-px filter at 128 px leaves something else."""
    x = batch(3, h=128, w=128, seed=2)
    y = torch.tensor([1, 4, 6])
    ref = fitted(reference=32, padding=padding, side=128)
    small = torch.nn.functional.avg_pool2d(x, 4)
    paper = CUDA(KEY, filter_size=3, blur=0.3, padding=padding).fit(FitData(10, list(range(10)), [(32, 32)] * 10))
    assert torch.equal(paper.filters, ref.filters)
    want = _unit_peak(paper.apply(small, y))
    got = _unit_peak(torch.nn.functional.avg_pool2d(ref.apply(x, y), 4))
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))  # reflection differs at the border
    assert torch.allclose(_unit_peak(got[inner]), _unit_peak(want[inner]), atol=1e-5)
    if padding == "zero":
        assert torch.allclose(got, want, atol=1e-5)
    # bilinear with antialiasing (what resize pipelines use) commutes as well, away from the border
    bil = _unit_peak(torch.nn.functional.interpolate(ref.apply(x, y), size=32, mode="bilinear", antialias=True))
    want_bil = _unit_peak(paper.apply(torch.nn.functional.interpolate(x, size=32, mode="bilinear",
                                                                      antialias=True).clamp(0, 1), y))
    core = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    assert float((_unit_peak(bil[core]) - _unit_peak(want_bil[core])).abs().max()) < 2e-3
    plain = fitted(side=128, padding=padding)  # k=9 at 128 px: not the paper's filter after the resize
    off = _unit_peak(torch.nn.functional.avg_pool2d(plain.apply(x, y), 4))
    gap = float((_unit_peak(got[inner]) - _unit_peak(want[inner])).abs().mean())
    assert float((_unit_peak(off[inner]) - _unit_peak(want[inner])).abs().mean()) > 20 * gap + 1e-2


def test_reference_in_strips_equals_one_piece(monkeypatch) -> None:
    import perturbations.cuda as cuda_mod

    m = fitted(reference=16, side=96)
    v = (batch(2, h=96, w=50, seed=5) * 255).round().to(torch.uint8)  # dilation 6: an 6-row halo
    y = torch.tensor([4, 8])
    whole = m.protect_levels(v, y)
    monkeypatch.setattr(cuda_mod, "STRIP_VALUES", 50 * 3 * 5)  # 5-row strips, narrower than the halo
    assert torch.equal(m.protect_levels(v, y), whole)
