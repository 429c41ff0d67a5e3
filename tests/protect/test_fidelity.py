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
