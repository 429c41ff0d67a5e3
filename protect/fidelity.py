"""Fidelity of protected images: PSNR, SSIM and the low-frequency colour difference, batched on the compute device.

PSNR is over all channels. SSIM follows Wang et al. (IEEE TIP 2004) on the luma channel
(ITU-R BT.601 weights) for colour images, as their reference implementation did on grayscale:
an 11x11 Gaussian window with sigma 1.5 (shrunk for images smaller than the window), K1 = 0.01,
K2 = 0.03, data range 1, 'valid' filtering, mean over positions. The Gaussian is applied as two
1-D depthwise passes over the five local statistics at once, in channels-last layout, which is what
keeps it cheap on large photos.

:func:`measure` takes the integer pixels the pipeline holds and works on large images in row strips
(SSIM with a window-sized overlap), so its memory is a few strips, never float copies of a photo.
:func:`max_delta` is the largest absolute change of any value, in the image's own levels (exact).

:func:`delta_e` is what PSNR misses on photos: colour blotches that a person sees at a glance. It is
the mean CIELAB colour difference (dE76, sRGB with D65 white, kornia's constants) between the
original and the protected image after a Gaussian blur of sigma = shorter side / 256 (reflect
border), so pixel grain averages away and only the low-frequency colour change is left. A
just-noticeable difference is about 2.3; random +-8/255 pixel grain measures about 1 on a photo.
Grey images are compared as grey RGB (the lightness difference). For sigma >= 2 the image is first
averaged over f x f blocks (f = floor(sigma)) and blurred with the remaining sigma
(sqrt(sigma^2 - (f^2 - 1) / 12) / f in block units, a box of f pixels having variance (f^2 - 1) / 12),
which measures a 24-megapixel photo at the cost of a 0.1-megapixel one; on the first six Kodak photos
with a colour blotch and grain, at their own size (sigma 2) and upscaled 4x (sigma 8), it differs
from the full-size blur of ``bench/photo_crops.py`` by at most 0.13 %.
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


#: The blur of :func:`delta_e`: sigma = the shorter side / DELTA_E_SIDES.
DELTA_E_SIDES = 256


def _gaussian_1d(sigma: float, device: torch.device) -> torch.Tensor:
    radius = max(1, int(round(3 * sigma)))
    return _window(2 * radius + 1, sigma, device)


def _reflect_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian of every channel of ``x`` (N x C x H x W, float) with reflect borders,
    the output the size of the input (sigma < 0.5: unchanged, a blur of less than a pixel)."""
    if sigma < 0.5:
        return x
    g = _gaussian_1d(sigma, x.device)
    r = (g.numel() - 1) // 2
    h, w = x.shape[2:]
    # reflect padding needs the pad below the side; beyond it the border pixel is repeated
    mode_h = "reflect" if r < h else "replicate"
    mode_w = "reflect" if r < w else "replicate"
    x = F.pad(x, (r, r, 0, 0), mode=mode_w)
    x = F.pad(x, (0, 0, r, r), mode=mode_h)
    return _blur(x, g)


#: kornia's sRGB (D65) -> XYZ matrix, rows divided by its reference white: XYZ / white from linear RGB.
_XYZ_WHITE = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                           [0.019334, 0.119193, 0.950227]]) / torch.tensor([0.95047, 1.0, 1.08883])[:, None]


def _lab(x: torch.Tensor) -> torch.Tensor:
    """CIELAB of an N x C x H x W batch in [0, 1] (C = 1: grey, as RGB), N x 3 x H x W: kornia's
    ``rgb_to_lab`` (its constants and branches), with the powers taken as exp(log) (vectorised: 3x
    faster on CPU than ``pow``; equal to kornia within float32 rounding, tested)."""
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, _, h, w = x.shape
    x = x.clamp(0, 1).reshape(n, 3, h * w)
    lin = torch.where(x > 0.04045, torch.exp(torch.log((x + 0.055) / 1.055) * 2.4), x / 12.92)
    xyz = torch.matmul(_XYZ_WHITE.to(lin), lin)
    f = torch.where(xyz > 0.008856, torch.exp(torch.log(xyz.clamp_min(0.008856)) / 3), xyz * 7.787 + 4.0 / 29.0)
    fx, fy, fz = f.unbind(1)
    return torch.stack([fy * 116 - 16, (fx - fy) * 500, (fy - fz) * 200], 1).reshape(n, 3, h, w)


def delta_e(x: torch.Tensor, q: torch.Tensor, levels: int, sides: int = DELTA_E_SIDES) -> list[float]:
    """Per-image mean low-frequency CIELAB dE76 of integer batches ``x`` (original) and ``q``
    (protected), N x C x H x W in [0, levels], C 1 or 3 (extra channels such as alpha are
    ignored); see the module doc. Memory: a few row strips of the full image plus the block-averaged one."""
    n, c, h, w = x.shape
    c = 1 if c < 3 else 3
    sigma = min(h, w) / sides
    f = max(1, int(sigma))  # block side: the blur's sigma, rounded down
    out: list[float] = []
    group = max(1, STRIP_VALUES // max(1, c * h * w)) if f == 1 else 1
    for i in range(0, n, group):
        if f == 1:
            xs = x[i:i + group, :c].float().div_(levels)
            qs = q[i:i + group, :c].float().div_(levels)
            rest = sigma
        else:  # block-average in strips of whole blocks, then blur what is left
            rows = max(f, STRIP_VALUES // max(1, c * w) // f * f)
            hb, wb = h // f, w // f
            xs = torch.empty(1, c, hb, wb, device=x.device)
            qs = torch.empty_like(xs)
            for r0 in range(0, hb * f, rows):
                r1 = min(hb * f, r0 + rows)
                for src, dst in ((x, xs), (q, qs)):
                    part = src[i:i + 1, :c, r0:r1, : wb * f].float().div_(levels)
                    dst[:, :, r0 // f: r1 // f] = F.avg_pool2d(part, f)
            rest = math.sqrt(max(0.0, sigma**2 - (f * f - 1) / 12)) / f
        la, lb = _lab(_reflect_blur(xs, rest)), _lab(_reflect_blur(qs, rest))
        out.extend((la - lb).square_().sum(1).sqrt_().flatten(1).mean(1).tolist())
    return out


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


#: Scales of the change :func:`limit_delta_e` may choose: k / LIMIT_STEPS, k = 0..LIMIT_STEPS.
LIMIT_STEPS = 64


def limit_delta_e(x: torch.Tensor, q: torch.Tensor, levels: int,
                  limit: float) -> tuple[torch.Tensor, list[float], list[float]]:
    """The fidelity floor of ``--max-delta-e``: each protected image of ``q`` whose low-frequency dE
    (:func:`delta_e`) against its original in ``x`` exceeds ``limit`` becomes
    ``round(x + s * (q - x))`` with the largest scale ``s = k / LIMIT_STEPS`` that keeps it within the
    limit (``s = 0``: the original). Every method's invariants survive: no value moves further or
    in another direction than the method moved it, unchanged values stay unchanged, and the
    result is in [0, levels]. Returns the images (a new tensor only when any was scaled), each
    image's scale and each returned image's dE (so a caller need not measure it again). dE is
    nearly linear in ``s`` for the changes protection makes, so the linear estimate of ``s`` is
    checked and moved by a step or two; dE is float arithmetic, so on another machine a scale on
    the edge of the limit may differ by one step."""
    des = delta_e(x, q, levels)
    scales = [1.0] * len(des)
    over = [i for i, d in enumerate(des) if d > limit]
    if not over:
        return q, scales, des
    out = q.clone()
    for i in over:
        xi, di = x[i:i + 1], (q[i:i + 1].to(torch.int32) - x[i:i + 1].to(torch.int32)).float()
        measured: dict[int, float] = {0: 0.0}  # k -> dE of the image scaled by k / LIMIT_STEPS

        def scaled(k: int) -> torch.Tensor:
            return (xi.float() + di * (k / LIMIT_STEPS)).round_().clamp_(0, levels).to(q.dtype)

        def fits(k: int) -> bool:
            if k not in measured:
                measured[k] = delta_e(xi, scaled(k), levels)[0]
            return measured[k] <= limit

        k = max(0, min(LIMIT_STEPS - 1, int(LIMIT_STEPS * limit / des[i])))
        while k > 0 and not fits(k):
            k -= 1
        while k + 1 < LIMIT_STEPS and fits(k + 1):
            k += 1
        out[i:i + 1] = scaled(k)
        scales[i], des[i] = k / LIMIT_STEPS, measured[k]
    return out, scales, des
