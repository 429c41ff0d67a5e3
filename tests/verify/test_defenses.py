"""Tests for verify.defenses: registry, invariants over every defense, and per-defense properties."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from perturbations.errors import ConfigError, InputError
from verify import defenses
from verify.defenses import dct_matrix, lowpass_band

ALL = defenses.available()
RANDOM = [name for name in ALL if not defenses.get(name).static]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def smooth_batch(n: int = 8, c: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Natural-looking images: upsampled noise, contrast spread over [0.1, 0.9]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, c, size // 8, size // 8, generator=g)
    fine = torch.rand(n, c, size // 2, size // 2, generator=g)
    x = 0.7 * F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)
    x = x + 0.3 * F.interpolate(fine, size=size, mode="bilinear", align_corners=False)
    return (0.1 + 0.8 * x).clamp(0, 1)


def onehot(n: int = 8, k: int = 10) -> torch.Tensor:
    return F.one_hot(torch.arange(n) % k, k).float()


def run(name: str, x: torch.Tensor, y: torch.Tensor | None = None, seed: int = 1, **kw):
    y = onehot(x.shape[0]).to(x.device) if y is None else y
    return defenses.get(name, **kw)(x, y, generator=torch.Generator().manual_seed(seed))


# registry ------------------------------------------------------------------------------------------


def test_registry_contents() -> None:
    expected = {"none", "grayscale", "jpeg10", "blur", "bdr", "cutout", "cutmix", "mixup", "ueraser", "coin", "rskff"}
    assert expected <= set(ALL)
    assert ALL == sorted(ALL)
    for name in ALL:
        d = defenses.get(name)
        assert d.name == name and d.source and isinstance(d.static, bool)
    assert {n for n in ALL if defenses.get(n).static} >= {"none", "grayscale", "jpeg10", "blur", "bdr"}
    assert set(RANDOM) >= {"cutout", "cutmix", "mixup", "ueraser", "coin", "rskff"}


def test_unknown_names_raise() -> None:
    with pytest.raises(ConfigError, match="'nope'"):
        defenses.get("nope")
    with pytest.raises(ConfigError, match="'nope'"):
        defenses.parse_list("none,nope")
    for bad in ("", " , ", "none,,blur"):
        with pytest.raises(ConfigError):
            defenses.parse_list(bad)
    with pytest.raises(ConfigError):
        defenses.get("coin", alpha=-1)
    with pytest.raises(ConfigError):
        defenses.get("blur", bogus=1)


def test_parse_list() -> None:
    assert defenses.parse_list("none,grayscale, jpeg10") == ["none", "grayscale", "jpeg10"]
    assert defenses.parse_list(" coin ,coin") == ["coin"]


def test_bad_input_shape() -> None:
    with pytest.raises(InputError):
        defenses.get("blur")(torch.rand(2, 4, 8, 8), onehot(2))
    with pytest.raises(InputError):
        defenses.get("blur")(torch.rand(2, 3, 8, 8), onehot(3))


# invariants over every defense ---------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name", ALL)
def test_invariants(name: str, channels: int, device: str) -> None:
    x = smooth_batch(c=channels).to(device)
    y = onehot().to(device)
    xo, yo = run(name, x, y)
    assert xo.shape == x.shape and xo.dtype == x.dtype and xo.device == x.device
    assert yo.shape == y.shape and yo.dtype == y.dtype and yo.device == y.device
    assert xo.min() >= 0 and xo.max() <= 1 and torch.isfinite(xo).all()
    torch.testing.assert_close(yo.sum(1), torch.ones(8, device=device))
    assert (yo >= 0).all()
    if name not in ("cutmix", "mixup"):
        assert torch.equal(yo, y)
    changes = name != "none" and not (name == "grayscale" and channels == 1)
    diff = (xo - x).abs().mean().item()
    assert (diff > 5e-3) if changes else (diff == 0), f"{name}: mean |diff| = {diff}"


def test_default_generator_and_nonsquare() -> None:
    x = smooth_batch(n=4, size=32)[..., :24, :]
    for name in ALL:
        a, _ = defenses.get(name)(x, onehot(4))
        b, _ = defenses.get(name)(x, onehot(4))
        assert a.shape == x.shape and torch.equal(a, b), name


@pytest.mark.parametrize("name", ALL)
def test_determinism(name: str) -> None:
    x = smooth_batch()
    a, ya = run(name, x, seed=3)
    b, yb = run(name, x, seed=3)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    if name in RANDOM:
        c, _ = run(name, x, seed=4)
        assert not torch.equal(a, c), f"{name} ignores the generator"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ALL)
def test_cpu_cuda_agree(name: str) -> None:
    x = smooth_batch()
    a, ya = run(name, x, seed=5)
    b, yb = run(name, x.cuda(), seed=5)
    tol = 2 / 255 if name in ("ueraser",) else 1e-4
    assert (a - b.cpu()).abs().mean() < tol and torch.allclose(ya, yb.cpu(), atol=1e-6)


# per-defense properties ----------------------------------------------------------------------------


def test_grayscale_equal_channels() -> None:
    xo, _ = run("grayscale", smooth_batch())
    assert torch.equal(xo[:, 0], xo[:, 1]) and torch.equal(xo[:, 1], xo[:, 2])
    expected = 0.299 * smooth_batch()[:, 0] + 0.587 * smooth_batch()[:, 1] + 0.114 * smooth_batch()[:, 2]
    torch.testing.assert_close(xo[:, 0], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels", [3, 1])
def test_jpeg_matches_pillow(channels: int) -> None:
    x = smooth_batch(n=3, c=channels)
    xo, _ = run("jpeg10", x)
    for i in range(3):
        arr = (x[i] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        img = Image.fromarray(arr[..., 0]) if channels == 1 else Image.fromarray(arr)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=10)
        ref = np.asarray(Image.open(io.BytesIO(buf.getvalue()))).reshape(arr.shape)
        got = (xo[i] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.array_equal(got, ref)
    assert (xo - x).abs().mean() > 5e-3
    assert not torch.equal(run("jpeg10", x, quality=90)[0], xo)


def test_bdr_four_levels() -> None:
    xo, _ = run("bdr", smooth_batch())
    for ch in range(3):
        values = torch.unique(xo[:, ch])
        assert len(values) <= 4  # the top 2 bits: 0, 64, 128, 192 of 255
        assert torch.allclose(values * 255 / 64, (values * 255 / 64).round(), atol=1e-5) and values.max() < 0.76


def test_blur_smooths() -> None:
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    xo, _ = run("blur", x)
    tv = lambda t: (t[..., 1:, :] - t[..., :-1, :]).abs().mean()  # noqa: E731
    assert tv(xo) < 0.7 * tv(x)
    torch.testing.assert_close(xo.mean(), x.mean(), atol=0.02, rtol=0)


def test_cutout_zeroed_square() -> None:
    x = smooth_batch()  # strictly positive everywhere
    assert x.min() > 0
    xo, _ = run("cutout", x)
    for i in range(8):
        zero = xo[i, 0] == 0
        assert torch.equal(zero, (xo[i] == 0).all(0))
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        assert len(rows) <= 16 and len(cols) <= 16 and zero.sum() > 0
        box = zero[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all() and zero.sum() == box.numel()  # one solid rectangle
        assert torch.equal(xo[i][:, ~zero], x[i][:, ~zero])


@pytest.mark.parametrize("name", ["cutmix", "mixup"])
def test_mixed_labels(name: str) -> None:
    x, y = smooth_batch(), onehot()  # 8 distinct classes
    xo, yo = run(name, x, y, seed=2)
    nonzero = (yo > 1e-6).sum(1)
    assert (nonzero <= 2).all() and (nonzero == 2).any()
    own = yo[torch.arange(8), torch.arange(8)]
    assert (own > 0).all() or name == "cutmix"
    for i in range(8):
        if nonzero[i] == 2 and name == "cutmix":
            unchanged = (xo[i] == x[i]).all(0).float().mean()
            torch.testing.assert_close(own[i], unchanged, atol=1e-6, rtol=0)
        if nonzero[i] == 2 and name == "mixup":
            j = int((yo[i] > 1e-6).logical_and(torch.arange(10) != i).nonzero())
            torch.testing.assert_close(xo[i], own[i] * x[i] + yo[i, j] * x[j], atol=1e-5, rtol=0)


def test_coin_bounded() -> None:
    const = torch.full((4, 3, 16, 16), 0.37)
    xo, _ = run("coin", const)
    torch.testing.assert_close(xo, const, atol=1e-6, rtol=0)
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(2, 3, 32, 32).contiguous()
    xo, _ = run("coin", ramp, alpha=2.0)
    step = 1 / 31
    inner = (xo - ramp)[..., 3:-3].abs()  # away from the seam, where samples wrap to the other edge
    assert inner.max() <= 2 * step + 1e-5  # horizontal shift at most alpha pixels
    assert inner.max() > 0.5 * step
    xs, _ = run("coin", smooth_batch(), alpha=0.05)
    assert (xs - smooth_batch()).abs().mean() < (run("coin", smooth_batch())[0] - smooth_batch()).abs().mean()


def test_coin_wraps_around_like_the_reference() -> None:
    """COIN's reference samples with scipy's mode="wrap": a pixel shifted past the right edge reads the
    left edge. One bright left column, alpha 2: right-edge pixels displaced to the right pick it up
    (border padding would keep them exactly 0), and every output pixel equals a periodic bilinear
    interpolation at the displaced coordinates, computed here independently in float64."""
    n, c, h, w, alpha = 2, 3, 8, 12, 2.0
    x = torch.zeros(n, c, h, w)
    x[..., 0] = 1.0
    xo, _ = run("coin", x, alpha=alpha, seed=5)
    assert xo[..., -1].max() > 0.3 and xo[..., -2].max() > 0.0  # wrapped from column 0
    assert (xo[..., 3:w - 3] == 0).all()  # out of the bright column's reach either way
    # the same displacements as the defense draws: (dx, dy) per pixel, uniform in [-alpha, alpha]
    disp = ((2 * torch.rand(n, h, w, 2, generator=torch.Generator().manual_seed(5)) - 1) * alpha).double()
    img = torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(9))
    out, _ = run("coin", img, alpha=alpha, seed=5)
    ref = torch.zeros(n, c, h, w, dtype=torch.float64)
    src = img.double()
    for b in range(n):
        for i in range(h):
            for j in range(w):
                sy, sx = i + float(disp[b, i, j, 1]), j + float(disp[b, i, j, 0])
                y0, x0 = math.floor(sy), math.floor(sx)
                fy, fx = sy - y0, sx - x0
                for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
                    for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
                        ref[b, :, i, j] += wy * wx * src[b, :, yy % h, xx % w]
    torch.testing.assert_close(out.double(), ref.clamp(0, 1), atol=1e-5, rtol=0)


def test_rskff_removes_high_band() -> None:
    """The filtered image is the valid convolution's 30 x 30 (at 32 px): its DCT keeps int(0.3 x 30) = 9
    frequencies per axis; the 1-pixel border around it is a replicated copy."""
    x = 0.4 + 0.2 * smooth_batch(n=4, size=32)  # low contrast: sharpening never leaves [0, 1]
    xo, _ = run("rskff", x)
    inner = xo[..., 1:-1, 1:-1]
    d = dct_matrix(30, xo.device, torch.float64)
    coef = d @ inner.double() @ d.T
    kh, kw = lowpass_band(30, 30, 0.3)
    assert (kh, kw) == (9, 9)  # int(0.3 x 30), as the reference
    band = torch.ones(30, 30, dtype=torch.bool)
    band[:kh, :kw] = False
    assert ((inner > 0) & (inner < 1)).all()  # so clamping added no energy
    assert coef[..., band].abs().max() < 1e-5
    assert coef[..., ~band].abs().sum() > 1
    assert torch.equal(xo[..., 0, 1:-1], xo[..., 1, 1:-1]) and torch.equal(xo[..., -1, 1:-1], xo[..., -2, 1:-1])
    assert torch.equal(xo[..., :, 0], xo[..., :, 1]) and torch.equal(xo[..., :, -1], xo[..., :, -2])


def test_dct_orthonormal() -> None:
    d = dct_matrix(12, torch.device("cpu"), torch.float64)
    torch.testing.assert_close(d @ d.T, torch.eye(12, dtype=torch.float64))


def test_ueraser_each_op() -> None:
    ue = defenses.get("ueraser")
    x = smooth_batch(n=2, size=16)
    for k, kind in enumerate(ue.OPS):
        for m in (0.05, 0.95):
            out = ue._trivial_augment(x, torch.Generator(), torch.full((2,), k), torch.full((2,), m))
            assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1, kind
            diff = (out - x).abs().mean()
            # identity; 8-bit posterize of 8-bit-exact values; solarize above the brightest pixel
            unchanged = kind == "identity" or (kind, m) == ("posterize", 0.95) or (kind == "solarize" and m > x.max())
            if unchanged:
                assert diff < 2e-3, kind
            else:
                assert diff > 2e-3, f"{kind} at magnitude {m} changes nothing"


def test_bdr_posterises_like_pil() -> None:
    """ISS's bit-depth reduction truncates the 8-bit value (PIL ImageOps.posterize), it does not round."""
    from PIL import ImageOps

    arr = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255
    for bits in (1, 2, 4):
        xo, _ = run("bdr", x, bits=bits)
        got = (xo[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.array_equal(got, np.asarray(ImageOps.posterize(Image.fromarray(arr), bits)))


def test_rskff_follows_its_reference() -> None:
    """A plus-shaped kernel (corners 0) summing to 1 without spread, a valid convolution clamped to
    [0, 1], int(0.3 x 32) = 9 DCT frequencies kept, applied before the crop; differences named."""
    rsk = defenses.get("rskff")
    assert rsk.before_crop and rsk.differences
    assert lowpass_band(32, 32, 0.3) == (9, 9) and lowpass_band(28, 28, 0.3) == (8, 8)
    # a constant image through an exact kernel (no spread): unchanged, so the weights sum to 1
    flat = torch.full((2, 3, 32, 32), 0.4)
    out, _ = run("rskff", flat, centre_std=0.0)
    torch.testing.assert_close(out, flat, atol=1e-5, rtol=0)
    # one darker pixel on grey: a plus-shaped kernel leaves the diagonal neighbours at 0.5 (an
    # 8-neighbour kernel would move them), the 4 arms get 0.5 + 0.2 x (2.5 - 1) / 4 = 0.575
    dot = torch.full((1, 1, 9, 9), 0.5)
    dot[..., 4, 4] = 0.3
    out, _ = run("rskff", dot, centre_std=0.0, keep=1.0)
    assert out[0, 0, 3, 3] == pytest.approx(0.5, abs=1e-6) and out[0, 0, 5, 5] == pytest.approx(0.5, abs=1e-6)
    assert out[0, 0, 3, 4] == pytest.approx(0.575, abs=1e-6) and out[0, 0, 4, 5] == pytest.approx(0.575, abs=1e-6)
    assert out[0, 0, 4, 4] == pytest.approx(0.0, abs=1e-6)  # 2.5 x 0.3 - 4 x 0.375 x 0.5 < 0: clamped
    x = 0.4 + 0.2 * smooth_batch(n=4, size=32)
    xo, _ = run("rskff", x)
    d = dct_matrix(30, xo.device, torch.float64)  # the valid convolution's 30 x 30, filtered before padding
    coef = d @ xo[..., 1:-1, 1:-1].double() @ d.T
    assert coef[..., 9:, :].abs().max() < 1e-5 and coef[..., :, 9:].abs().max() < 1e-5
    assert coef[..., 8, :9].abs().sum() > 0


def test_ueraser_uses_its_trainers_ranges_and_the_color_op() -> None:
    ue = defenses.get("ueraser")
    assert ue.ROUGHNESS == (0.3, 0.7) and ue.INTENSITY == (0.5, 1.0) and "color" in ue.OPS
    x = smooth_batch(n=2, size=16)
    k = ue.OPS.index("color")
    gray_out = ue._trivial_augment(x, torch.Generator(), torch.full((2,), k), torch.zeros(2))  # factor 0.1
    sat = (gray_out - gray_out.mean(1, keepdim=True)).abs().mean()
    assert sat < 0.2 * (x - x.mean(1, keepdim=True)).abs().mean()  # nearly grey
    grey = x.mean(1, keepdim=True).expand(-1, 3, -1, -1).contiguous()
    same = ue._trivial_augment(grey, torch.Generator(), torch.full((2,), k), torch.ones(2))
    torch.testing.assert_close(same, grey, atol=1e-5, rtol=0)  # a grey image has no colour to change


def test_every_defense_names_its_differences() -> None:
    """``differences``: a tuple of plain sentences (empty when the defense matches its reference);
    ``before_crop`` only on the random defense whose reference filters before the crop (RSK+FF)."""
    for name in ALL:
        d = defenses.get(name)
        assert isinstance(d.differences, tuple) and all(isinstance(s, str) and s.strip() for s in d.differences), name
        assert all(not s.endswith(".") and "\n" not in s for s in d.differences), name
        assert isinstance(d.before_crop, bool) and not (d.before_crop and d.static), name
    assert {n for n in ALL if defenses.get(n).before_crop} == {"rskff"}
    assert defenses.get("none").differences == () and defenses.get("bdr").differences == ()
    assert defenses.get("jpeg10").differences == ()
    assert defenses.Defense.before_crop is False and defenses.Defense.differences == ()


def test_rskff_kernels_follow_the_reference() -> None:
    """The reference draws c ~ N(2.5, 0.1) and every one of the 4 neighbours ~ N(-(c - 1) / 4, 0.1)
    independently; corners stay 0 (a plus-shaped kernel, not 8 equal neighbours)."""
    k = defenses.get("rskff")._kernels(20000, torch.Generator().manual_seed(0)).double()
    corners = k[:, [0, 0, 2, 2], [0, 2, 0, 2]]
    assert (corners == 0).all()
    centre = k[:, 1, 1]
    arms = torch.stack([k[:, 0, 1], k[:, 2, 1], k[:, 1, 0], k[:, 1, 2]], 1)
    assert abs(centre.mean() - 2.5) < 0.005 and abs(centre.std() - 0.1) < 0.005
    dev = arms + (centre.view(-1, 1) - 1) / 4  # each arm's own draw around -(c - 1) / 4
    assert dev.mean().abs() < 0.005 and (dev.std(0) - 0.1).abs().max() < 0.005
    corr = torch.corrcoef(dev.T)
    assert (corr - torch.eye(4, dtype=corr.dtype)).abs().max() < 0.05  # drawn independently
    assert abs(k.sum((1, 2)).mean() - 1) < 0.005  # sums to 1 on average
    exact = defenses.get("rskff", centre_std=0.0)._kernels(3, torch.Generator())
    torch.testing.assert_close(exact.sum((1, 2)), torch.ones(3))


def test_rskff_matches_its_reference_pipeline() -> None:
    """Recomputed independently in float64 numpy, as the reference does it per image: a valid 3 x 3
    convolution clamped to [0, 1] (32 -> 30 px), an orthonormal 2-D DCT-II keeping int(30 x 30 / 100) = 9
    rows and columns, the inverse DCT clamped to [0, 1]. The defense returns that 30 x 30 in the middle
    of a 32 x 32 whose border is replicated."""
    n, c, size = 3, 3, 32
    x = smooth_batch(n=n, c=c, size=size)  # full contrast: some sharpened pixels leave [0, 1] and clamp
    rsk = defenses.get("rskff")
    out, _ = rsk(x, onehot(n), generator=torch.Generator().manual_seed(7))
    kernel = rsk._kernels(n, torch.Generator().manual_seed(7)).double().numpy()
    src, v = x.double().numpy(), size - 2
    sharp = np.zeros((n, c, v, v))
    for a in range(3):
        for b in range(3):
            sharp += kernel[:, a, b].reshape(n, 1, 1, 1) * src[:, :, a : a + v, b : b + v]
    sharp = np.clip(sharp, 0, 1)
    assert ((sharp == 0) | (sharp == 1)).any()  # the clamp matters here
    k = np.arange(v).reshape(-1, 1)
    d = np.sqrt(2 / v) * np.cos(np.pi * (2 * np.arange(v).reshape(1, -1) + 1) * k / (2 * v))
    d[0] /= np.sqrt(2)
    keep = int(v * 30 / 100)
    assert keep == 9
    coef = d @ sharp @ d.T
    coef[..., keep:, :] = 0
    coef[..., :, keep:] = 0
    ref = np.clip(d.T @ coef @ d, 0, 1)
    got = out.double().numpy()
    np.testing.assert_allclose(got[..., 1:-1, 1:-1], ref, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got[..., 0, 1:-1], got[..., 1, 1:-1])
    np.testing.assert_array_equal(got[..., :, -1], got[..., :, -2])


def test_ueraser_plasma_draws_use_its_trainers_ranges(monkeypatch) -> None:
    """Roughness of both plasma maps ~ U(0.3, 0.7) and brightness intensity ~ U(0.5, 1.0) per image
    (kornia's defaults U(0.1, 0.7) and U(0, 1) would fall outside). Flat fake maps isolate the draws:
    brightness map 1 adds the intensity to a black image, contrast map 0.25 is the identity."""
    seen: list[torch.Tensor] = []

    def fake_diamond_square(shape, roughness, random_fn=None, device=None, dtype=None):
        seen.append(torch.as_tensor(roughness).flatten().clone())
        return torch.full(shape, 1.0 if len(seen) % 2 else 0.25, device=device, dtype=dtype)

    monkeypatch.setattr(defenses, "diamond_square", fake_diamond_square)
    monkeypatch.setattr(defenses.UEraserLite, "_trivial_augment", lambda self, x, g: x)
    n = 256
    out, _ = run("ueraser", torch.zeros(n, 3, 8, 8), onehot(n))
    assert len(seen) == 2
    rough = torch.cat(seen)
    assert rough.min() >= 0.3 and rough.max() <= 0.7 and rough.min() < 0.32 and rough.max() > 0.68
    intensity = out[:, 0, 0, 0]
    assert torch.equal(out, intensity.view(n, 1, 1, 1).expand_as(out))
    assert intensity.min() >= 0.5 and intensity.max() <= 1.0 and intensity.min() < 0.52 and intensity.max() > 0.98


def test_jpeg_at_any_quality_is_its_own_defense() -> None:
    """jpegQ is the Pillow round trip at quality Q, named as given: publishing qualities (75, 90)
    change the images less than ISS's 10, and each quality is a different cell (own name, own key)."""
    assert defenses.parse_list("none,jpeg75,jpeg90,jpeg75") == ["none", "jpeg75", "jpeg90"]
    d75, d90 = defenses.get("jpeg75"), defenses.get("jpeg90")
    assert (d75.name, d75.quality, d90.name, defenses.get("jpeg10").name) == ("jpeg75", 75, "jpeg90", "jpeg10")
    x = smooth_batch(n=2)
    changes = [float((run(name, x)[0] - x).abs().mean()) for name in ("jpeg10", "jpeg75", "jpeg90")]
    assert changes[0] > changes[1] > changes[2] > 0
    torch.testing.assert_close(run("jpeg75", x)[0], run("jpeg10", x, quality=75)[0])
    for bad in ("jpeg0", "jpeg96", "jpegx"):
        with pytest.raises(ConfigError):
            defenses.parse_list(bad)
