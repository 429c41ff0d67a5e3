"""Fidelity of protected images: PSNR and SSIM, batched on the compute device.

PSNR is over all channels. SSIM follows Wang et al. (IEEE TIP 2004) on the luma channel
(ITU-R BT.601 weights) for colour images, as their reference implementation did on grayscale:
an 11x11 Gaussian window with sigma 1.5 (shrunk for images smaller than the window), K1 = 0.01,
K2 = 0.03, data range 1, 'valid' filtering, mean over positions. The Gaussian is applied as two
1-D depthwise passes over the five local statistics at once, in channels-last layout, which is what
keeps it cheap on large photos.

:func:`measure` takes the integer pixels the pipeline holds and works on large images in row strips
(SSIM with a window-sized overlap), so its memory is a few strips, never float copies of a photo.
The values are reported to 3 (PSNR) and 5 (SSIM) decimals; they are float computations, so another
machine may differ in the last digit (the protected pixels themselves are exact).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_C1, _C2 = 0.01**2, 0.03**2
_LUMA = (0.299, 0.587, 0.114)
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
    # channels-last makes the depthwise convolutions about 10x faster on CPU (oneDNN)
    x = x.contiguous(memory_format=torch.channels_last)
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def luma(x: torch.Tensor) -> torch.Tensor:
    """N x 1 x H x W luma of an RGB batch (unchanged if already one channel)."""
    if x.shape[1] == 1:
        return x.float()
    w = torch.tensor(_LUMA, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x.float() * w).sum(1, keepdim=True)


def _window_size(h: int, w: int, window: int) -> int:
    size = min(window, h, w)
    return size - (1 - size % 2)  # odd


def _ssim_map(a: torch.Tensor, b: torch.Tensor, size: int, sigma: float, window: int) -> torch.Tensor:
    """N x H' x W' SSIM map ('valid' positions) of two N x 1 x H x W luma batches."""
    g = _window(size, sigma * size / window, a.device)
    stats = _blur(torch.cat([a, b, a * a, b * b, a * b], dim=1), g)
    mu_a, mu_b, aa, bb, ab = stats.unbind(1)
    mu_ab, mu_aa, mu_bb = mu_a * mu_b, mu_a * mu_a, mu_b * mu_b
    num = (2 * mu_ab + _C1) * (2 * (ab - mu_ab) + _C2)
    den = (mu_aa + mu_bb + _C1) * ((aa - mu_aa) + (bb - mu_bb) + _C2)
    return num / den


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image mean SSIM (on luma) of two N x C x H x W batches in [0, 1]."""
    a, b = luma(a), luma(b)
    size = _window_size(a.shape[-2], a.shape[-1], window)
    return _ssim_map(a, b, size, sigma, window).flatten(1).mean(1)


#: Values per strip when measuring large images.
STRIP_VALUES = 1 << 21


def measure(x: torch.Tensor, q: torch.Tensor, levels: int, window: int = 11,
            sigma: float = 1.5) -> tuple[list[float], list[float]]:
    """Per-image PSNR and SSIM of integer batches ``x`` (original) and ``q`` (protected),
    ``N x C x H x W`` with values in ``[0, levels]``; large images go strip by strip."""
    n, c, h, w = x.shape
    if c * h * w <= STRIP_VALUES:
        xf, qf = x.float().div_(levels), q.float().div_(levels)
        return psnr(xf, qf).tolist(), ssim(xf, qf, window, sigma).tolist()
    size = _window_size(h, w, window)
    rows = max(size, STRIP_VALUES // max(1, c * w))
    ps, ss = [], []
    for i in range(n):
        sq_err, ssim_sum = 0.0, 0.0
        for r0 in range(0, h, rows):
            xs = x[i:i + 1, :, r0:r0 + rows].float().div_(levels)
            qs = q[i:i + 1, :, r0:r0 + rows].float().div_(levels)
            sq_err += float((xs - qs).pow_(2).sum(dtype=torch.float64))
        for r0 in range(0, h - size + 1, rows):  # SSIM positions r0 .. r0 + rows need size - 1 more rows
            r1 = min(h, r0 + rows + size - 1)
            a = luma(x[i:i + 1, :, r0:r1].float().div_(levels))
            b = luma(q[i:i + 1, :, r0:r1].float().div_(levels))
            ssim_sum += float(_ssim_map(a, b, size, sigma, window).sum(dtype=torch.float64))
        mse = sq_err / (c * h * w)
        ps.append(min(PSNR_CAP, -10.0 * math.log10(mse)) if mse > 0 else PSNR_CAP)
        ss.append(ssim_sum / ((h - size + 1) * (w - size + 1)))
    return ps, ss
