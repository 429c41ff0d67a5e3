"""Fidelity metrics: PSNR and SSIM against an independent reference, one piece and in strips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from protect import fidelity


def reference_ssim(a: np.ndarray, b: np.ndarray, stride: int = 1) -> float:
    """Wang et al. (2004) mean SSIM of two grayscale images in [0, 1]: an 11x11 Gaussian window
    (sigma 1.5), K1 0.01, K2 0.03, 'valid' positions (every ``stride``-th), float64."""
    k = np.arange(11) - 5.0
    g = np.exp(-(k**2) / (2 * 1.5**2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for i in range(0, a.shape[0] - 10, stride):
        for j in range(0, a.shape[1] - 10, stride):
            pa, pb = a[i:i + 11, j:j + 11], b[i:i + 11, j:j + 11]
            ma, mb = (win * pa).sum(), (win * pb).sum()
            va, vb = (win * pa * pa).sum() - ma * ma, (win * pb * pb).sum() - mb * mb
            cov = (win * pa * pb).sum() - ma * mb
            vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def pair(h: int, w: int, c: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (1, c, h, w), generator=g, dtype=torch.uint8)
    q = (x.int() + torch.randint(-20, 21, x.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    return x, q


def test_small_images_match_the_reference():
    x, q = pair(40, 37)
    ps, ss = fidelity.measure(x, q, 255)
    xa, qa = x[0, 0].double().numpy() / 255, q[0, 0].double().numpy() / 255
    assert ps[0] == pytest.approx(-10 * math.log10(((xa - qa) ** 2).mean()), abs=1e-4)
    assert ss[0] == pytest.approx(reference_ssim(xa, qa), abs=1e-5)


def test_large_images_exact_psnr_and_ssim_on_a_grid(monkeypatch):
    x, q = pair(90, 60, c=3, seed=1)
    whole_ps, _ = fidelity.measure(x, q, 255)
    monkeypatch.setattr(fidelity, "STRIP_VALUES", 3 * 60 * 9)  # 8-row strips (multiples of the stride)
    ps, ss = fidelity.measure(x, q, 255)
    assert ps[0] == pytest.approx(whole_ps[0], abs=1e-6)
    luma = fidelity.luma(torch.cat([x, q]).double().div(255)).numpy()[:, 0]
    assert ss[0] == pytest.approx(reference_ssim(luma[0], luma[1], stride=fidelity.LARGE_STRIDE), abs=1e-5)


def test_identical_images():
    x, _ = pair(20, 20)
    ps, ss = fidelity.measure(x, x.clone(), 255)
    assert ps == [fidelity.PSNR_CAP] and ss[0] == pytest.approx(1.0, abs=1e-6)


# -- low-frequency colour difference (dE) --------------------------------------------------------
def reference_delta_e(x: torch.Tensor, q: torch.Tensor, levels: int = 255) -> float:
    """The definition, at full size: kornia's Gaussian blur (sigma = shorter side / 256, reflect)
    of both images, kornia's CIELAB, mean dE76 (what bench/photo_crops.py measured)."""
    import kornia

    a, b = (t.double().div(levels).float() for t in (x, q))
    if a.shape[1] == 1:
        a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
    sigma = min(a.shape[2:]) / 256
    if sigma >= 0.5:
        size = int(2 * round(3 * sigma) + 1)
        a, b = (kornia.filters.gaussian_blur2d(t, (size, size), (sigma, sigma), border_type="reflect") for t in (a, b))
    la, lb = kornia.color.rgb_to_lab(a), kornia.color.rgb_to_lab(b)
    return float((la - lb).pow(2).sum(1).sqrt().mean())


def smooth_pair(h: int, w: int, seed: int = 0, blotch: float = 12.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth 'photo' and a copy with a low-frequency colour blotch and +-8 grain, uint8 RGB."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 9, generator=g) * 200 + 25, size=(h, w),
                                           mode="bicubic", align_corners=False)
    spot = torch.nn.functional.interpolate(torch.randn(1, 3, 4, 6, generator=g) * blotch, size=(h, w),
                                           mode="bicubic", align_corners=False)
    grain = torch.randint(-8, 9, (1, 3, h, w), generator=g).float()
    x = base.round().clamp(0, 255).to(torch.uint8)
    q = (base + spot + grain).round().clamp(0, 255).to(torch.uint8)
    return x, q


def test_delta_e_is_the_definition_at_photo_size():
    x, q = smooth_pair(300, 420)  # sigma 1.17: the full-size path
    assert fidelity.delta_e(x, q, 255)[0] == pytest.approx(reference_delta_e(x, q), rel=1e-4)
    assert fidelity.delta_e(x, x.clone(), 255) == [0.0]


def test_delta_e_of_large_images_is_within_a_percent_of_the_full_size_blur(monkeypatch):
    x, q = smooth_pair(720, 900, seed=1)  # sigma 2.8: 2x2 blocks, then the rest of the blur
    ref = reference_delta_e(x, q)
    whole = fidelity.delta_e(x, q, 255)[0]
    assert whole == pytest.approx(ref, rel=0.01) and ref > 1.0
    monkeypatch.setattr(fidelity, "STRIP_VALUES", 3 * 900 * 30)  # 30-row strips: the same blocks
    assert fidelity.delta_e(x, q, 255)[0] == pytest.approx(whole, rel=1e-6)


def test_delta_e_of_a_flat_colour_change_is_the_lab_distance_and_grey_is_lightness():
    import kornia

    x = torch.full((2, 3, 64, 64), 100, dtype=torch.uint8)
    q = x.clone()
    q[1, 0] = 110  # the second image: red up by 10 levels
    want = float((kornia.color.rgb_to_lab(torch.tensor([110, 100, 100]).view(1, 3, 1, 1) / 255)
                  - kornia.color.rgb_to_lab(torch.tensor([100, 100, 100]).view(1, 3, 1, 1) / 255)).norm())
    de = fidelity.delta_e(x, q, 255)
    assert de[0] == 0.0 and de[1] == pytest.approx(want, rel=1e-4) and want > 2.3  # visible
    grey, brighter = torch.full((1, 1, 64, 64), 100, dtype=torch.uint8), torch.full((1, 1, 64, 64), 110, dtype=torch.uint8)
    lab = kornia.color.rgb_to_lab(torch.tensor([[100.0], [110.0]]).view(2, 1, 1, 1).expand(-1, 3, -1, -1) / 255)
    assert fidelity.delta_e(grey, brighter, 255)[0] == pytest.approx(float(lab[1, 0] - lab[0, 0]), rel=1e-4)
    # 16-bit levels: the same colours in 0..65535 give the same dE
    assert fidelity.delta_e(x.int() * 257, q.int() * 257, 65535)[1] == pytest.approx(want, rel=1e-4)


def test_lab_is_kornias_conversion():
    import kornia

    x = torch.rand(4, 3, 17, 23, generator=torch.Generator().manual_seed(3))
    x[0, :, 0, 0] = 0.0  # black and white and the dark branch
    x[0, :, 0, 1] = 1.0
    x[1] *= 0.05
    torch.testing.assert_close(fidelity._lab(x), kornia.color.rgb_to_lab(x), atol=2e-3, rtol=1e-4)
