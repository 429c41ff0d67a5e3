"""Fidelity of protected images: PSNR and SSIM, batched on the compute device.

SSIM follows Wang et al. (IEEE TIP 2004): an 11x11 Gaussian window with sigma 1.5 (shrunk for
images smaller than the window), K1 = 0.01, K2 = 0.03, data range 1, 'valid' filtering, mean over
channels and positions. The Gaussian is applied as two 1-D passes, which is what keeps it cheap
on large photos.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_C1, _C2 = 0.01**2, 0.03**2
PSNR_CAP = 100.0  # identical images report this instead of infinity


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of two N x C x H x W batches in [0, 1] (capped at 100 dB)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return torch.where(mse > 0, -10.0 * torch.log10(mse.clamp_min(1e-20)), torch.full_like(mse, PSNR_CAP)).clamp_max(PSNR_CAP)


def _window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image mean SSIM of two N x C x H x W batches in [0, 1]."""
    a, b = a.float(), b.float()
    size = min(window, a.shape[-1], a.shape[-2])
    size -= 1 - size % 2  # odd
    g = _window(size, sigma * size / window, a.device)
    mu_a, mu_b = _blur(a, g), _blur(b, g)
    aa, bb, ab = _blur(a * a, g) - mu_a**2, _blur(b * b, g) - mu_b**2, _blur(a * b, g) - mu_a * mu_b
    num = (2 * mu_a * mu_b + _C1) * (2 * ab + _C2)
    den = (mu_a**2 + mu_b**2 + _C1) * (aa + bb + _C2)
    return (num / den).flatten(1).mean(1)
