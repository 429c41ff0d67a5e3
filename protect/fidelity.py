"""Fidelity of protected images: PSNR and SSIM, batched on the compute device.

PSNR is over all channels. SSIM follows Wang et al. (IEEE TIP 2004) on the luma channel
(ITU-R BT.601 weights) for colour images, as their reference implementation did on grayscale:
an 11x11 Gaussian window with sigma 1.5 (shrunk for images smaller than the window), K1 = 0.01,
K2 = 0.03, data range 1, 'valid' filtering, mean over positions. The Gaussian is applied as two
1-D depthwise passes over the five local statistics at once, in channels-last layout, which is what
keeps it cheap on large photos.

:func:`measure` takes the integer pixels the pipeline holds and works on large images in row strips
(SSIM with a window-sized overlap), so its memory is a few strips, never float copies of a photo.
:func:`max_delta` is the largest absolute change of any value, in the image's own levels (exact).
The pipeline measures the file as written: for a lossy output (JPEG, HEIF) it decodes the encoded
bytes and compares those pixels with the input, so the numbers include the encoder's loss.
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


#: Up to this side the Gaussian is applied as two small matrix products (faster than a
#: convolution on small images); above it, as two depthwise convolutions.
_MATMUL_SIDE = 256


def _band(n: int, g: torch.Tensor) -> torch.Tensor:
    """The (n - k + 1) x n matrix of a 'valid' 1-D filtering with ``g`` (k taps)."""
    k = g.numel()
    rows = torch.arange(n - k + 1, device=g.device).unsqueeze(1)
    cols = torch.arange(n, device=g.device).unsqueeze(0)
    offset = cols - rows
    inside = (offset >= 0) & (offset < k)
    return torch.where(inside, g[offset.clamp(0, k - 1)], torch.zeros((), device=g.device))


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """'valid' separable Gaussian of every channel of ``x`` (N x C x H x W)."""
    c, h, w = x.shape[1:]
    if max(h, w) <= _MATMUL_SIDE:
        return _band(h, g) @ x @ _band(w, g).T
    # channels-last makes the depthwise convolutions about 10x faster on CPU (oneDNN)
    x = x.contiguous(memory_format=torch.channels_last)
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def luma(x: torch.Tensor) -> torch.Tensor:
    """N x 1 x H x W luma of an RGB batch (unchanged if already one channel)."""
    if x.shape[1] == 1:
        return x.float()
    x = x.float()
    r, g, b = _LUMA
    return (x[:, 0:1] * r).add_(x[:, 1:2], alpha=g).add_(x[:, 2:3], alpha=b)


def _window_size(h: int, w: int, window: int) -> int:
    size = min(window, h, w)
    return size - (1 - size % 2)  # odd


def _ssim_map(a: torch.Tensor, b: torch.Tensor, size: int, sigma: float, window: int,
              stride: int = 1) -> torch.Tensor:
    """N x H' x W' SSIM map of two N x 1 x H x W luma batches: every 'valid' window position, or
    every ``stride``-th one in each direction."""
    g = _window(size, sigma * size / window, a.device)
    if stride == 1:
        mu_a, mu_b, aa, bb, ab = _blur(torch.cat([a, b, a * a, b * b, a * b], dim=1), g).unbind(1)
    else:  # the 2-D window at the grid positions only, one plane at a time (no stacked copy)
        g2 = torch.outer(g, g).view(1, 1, size, size)
        mu_a, mu_b, aa, bb, ab = (F.conv2d(t, g2, stride=stride)[:, 0] for t in (a, b, a * a, b * b, a * b))
    mu_ab = mu_a * mu_b
    mu_sq = mu_a.square().add_(mu_b.square())
    num = (mu_ab * 2).add_(_C1).mul_((ab - mu_ab).mul_(2).add_(_C2))
    den = (mu_sq + _C1).mul_((aa + bb).sub_(mu_sq).add_(_C2))
    return num.div_(den)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image mean SSIM (on luma) of two N x C x H x W batches in [0, 1]."""
    a, b = luma(a), luma(b)
    size = _window_size(a.shape[-2], a.shape[-1], window)
    return _ssim_map(a, b, size, sigma, window).flatten(1).mean(1)


#: Values per strip when measuring large images.
STRIP_VALUES = 1 << 21
#: Above :data:`STRIP_VALUES` values, SSIM is the mean over every ``LARGE_STRIDE``-th window
#: position in each direction (a 1/16 sample of a photo's million positions; the full map would cost
#: as much as the protection itself). PSNR is always exact.
LARGE_STRIDE = 4


def measure(x: torch.Tensor, q: torch.Tensor, levels: int, window: int = 11,
            sigma: float = 1.5) -> tuple[list[float], list[float]]:
    """Per-image PSNR and SSIM of integer batches ``x`` (original) and ``q`` (protected),
    ``N x C x H x W`` with values in ``[0, levels]``; large images go strip by strip, with SSIM on a
    grid of window positions (:data:`LARGE_STRIDE`)."""
    n, c, h, w = x.shape
    size = _window_size(h, w, window)
    if c * h * w <= STRIP_VALUES:
        xf, qf = x.float().div_(levels), q.float().div_(levels)
        mse = (xf - qf).square_().flatten(1).mean(1)
        ps = torch.where(mse > 0, -10.0 * torch.log10(mse.clamp_min(1e-20)), PSNR_CAP).clamp_max(PSNR_CAP)
        ss = _ssim_map(luma(xf), luma(qf), size, sigma, window).flatten(1).mean(1)
        return ps.tolist(), ss.tolist()
    stride = LARGE_STRIDE
    rows = max(size, STRIP_VALUES // max(1, c * w)) // stride * stride  # strips start on the grid
    ps, ss = [], []
    for i in range(n):
        sq_err, ssim_sum, positions = 0.0, 0.0, 0
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows + size - 1)  # window positions r0 .. r0 + rows need size - 1 more rows
            xs = x[i:i + 1, :, r0:r1].float().div_(levels)
            qs = q[i:i + 1, :, r0:r1].float().div_(levels)
            own = min(rows, h - r0)  # the rows this strip counts for PSNR
            sq_err += float((xs[:, :, :own] - qs[:, :, :own]).square_().sum())  # float32 per strip
            if r1 - r0 >= size:
                m = _ssim_map(luma(xs), luma(qs), size, sigma, window, stride)
                m = m[:, : (min(rows, h - size + 1 - r0) + stride - 1) // stride]  # positions of this strip
                ssim_sum += float(m.sum(dtype=torch.float64))
                positions += m.numel()
        mse = sq_err / (c * h * w)
        ps.append(min(PSNR_CAP, -10.0 * math.log10(mse)) if mse > 0 else PSNR_CAP)
        ss.append(ssim_sum / max(1, positions))
    return ps, ss


def max_delta(x: torch.Tensor, q: torch.Tensor) -> list[int]:
    """Per-image largest ``|q - x|`` of two integer ``N x C x H x W`` batches, in their levels
    (exact), computed in strips of :data:`STRIP_VALUES` values (no full-size copy)."""
    n, c, h, w = x.shape
    if c * h * w <= STRIP_VALUES:  # small images: whole groups of them at once
        group = max(1, STRIP_VALUES // (c * h * w))
        out: list[int] = []
        for i in range(0, n, group):
            d = (q[i:i + group].to(torch.int32) - x[i:i + group].to(torch.int32)).abs_()
            out.extend(d.flatten(1).amax(1).tolist())
        return out
    rows = max(1, STRIP_VALUES // max(1, c * w))
    out = []
    for i in range(n):
        m = 0
        for r0 in range(0, h, rows):
            xs, qs = x[i, :, r0:r0 + rows].to(torch.int32), q[i, :, r0:r0 + rows].to(torch.int32)
            m = max(m, int((qs - xs).abs_().max()))
        out.append(m)
    return out
