"""Perceptual budgets: how much change each pixel hides, from a just-noticeable-difference model.

An additive perturbation of uniform size ``eps`` is most visible where the image is flat and
mid-bright (sky, skin, a wall) and least where it is dark, bright or textured. The pixel-domain
just-noticeable difference (JND) of Chou and Li ("A perceptually tuned subband image coder based
on the measure of just-noticeable-distortion profile", IEEE TCSVT 1995) with the nonlinear
additivity model of Yang et al. ("Just noticeable distortion model and its applications in video
coding", Signal Processing: Image Communication 2005) gives, per pixel and in 8-bit levels of
luminance, the change an observer does not notice; no learned weights. Implemented from the
papers' description:

- background luminance ``b``: the mean of the 5x5 neighbourhood, weighted 1 on the border ring,
  2 on the inner ring, 0 at the centre (sum 32);
- luminance adaptation: ``T_l = 17 (1 - sqrt(b / 127)) + 3`` for ``b <= 127``, else
  ``3 / 128 (b - 127) + 3`` (3 levels in mid-grey, up to 20 in the dark);
- texture masking: ``T_t = 0.117 G``, ``G`` the largest of four directional 5x5 weighted
  differences (horizontal, vertical, two diagonals) divided by 16; Yang et al.'s edge weighting,
  which lowers ``T_t`` on sharp edges, is left out (a parameter could add it);
- combination: ``JND = T_l + T_t - 0.3 min(T_l, T_t)``.

:func:`budget_weights` turns the JND into a weight in ``[0, 1]`` per pixel: ``min(1, scale * JND /
(eps * 255))``, so a perturbation of bound ``eps`` multiplied by it stays within ``scale`` JNDs where
that is less than ``eps`` (the same weight in every channel: the luminance decides). Colour images
use the luminance ``Y = 0.299 R + 0.587 G + 0.114 B``; 16-bit and other depths are brought to the
8-bit scale first. Borders: reflected.

:func:`lowfreq_weights` is the budget of a *smooth* change (a wave spanning the image, not a pixel's
grain). The eye sees a smooth change over a flat area at any brightness: the pixel model's luminance
adaptation, which lets 8-20 levels through in the dark, lets a slow wave show as light patches in a
dark sky (seen on Kodak kodim03 at 1:1). So the luminance term is capped at its mid-grey value (3
levels) and the texture term decides. A caller may raise its gain (a smooth change hides in busy
texture better than a pixel's change); below mid-grey the texture term is scaled by
``(b / 127) ** dark`` (:data:`LOWFREQ_DARK`, 2), since a level is a larger relative change in the dark: without it,
a gain of 8 or more put 16 levels into the wood grain in kodim03's shadows, where it showed as
mottling at 1:1. ``waves`` uses a gain of 4: from 8 on, its waves showed as bands on the fine
ripples of Kodak kodim11's water at 1:1 (fine texture the eye averages into a uniform surface hides
a smooth change less than the pixel model's texture term says; docs/BENCHMARKS.md). The JND is
computed on the luminance downscaled (antialiased) to a working size (shorter side ``side``, 256
px), where texture means detail at about 1/100 of the image rather than a sensor's grain, then
smoothed (Gaussian, ``sigma`` working pixels) so the weight varies slowly and adds no edges or grain
of its own. The map stays at the working size (a few hundred kB for any photo);
:func:`upsample_rows` gives it at full size one strip of rows at a time (bilinear,
``align_corners=False``, as ``F.interpolate``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError

__all__ = ["BUDGETS", "budget_settings", "budget_weights", "jnd_levels", "lowfreq_weights", "parse_budget",
           "upsample_rows"]

#: ``flat``: the same bound ``eps`` everywhere (the papers'); ``jnd``: at most ``scale`` JNDs.
BUDGETS = ("flat", "jnd")

_BACKGROUND = torch.tensor([[1, 1, 1, 1, 1],
                            [1, 2, 2, 2, 1],
                            [1, 2, 0, 2, 1],
                            [1, 2, 2, 2, 1],
                            [1, 1, 1, 1, 1]], dtype=torch.float64) / 32
_DIRECTIONS = torch.tensor([
    [[0, 0, 0, 0, 0], [1, 3, 8, 3, 1], [0, 0, 0, 0, 0], [-1, -3, -8, -3, -1], [0, 0, 0, 0, 0]],
    [[0, 0, 1, 0, 0], [0, 8, 3, 0, 0], [1, 3, 0, -3, -1], [0, 0, -3, -8, 0], [0, 0, -1, 0, 0]],
    [[0, 0, 1, 0, 0], [0, 0, 3, 8, 0], [-1, -3, 0, 3, 1], [0, -8, -3, 0, 0], [0, 0, -1, 0, 0]],
    [[0, 1, 0, -1, 0], [0, 3, 0, -3, 0], [0, 8, 0, -8, 0], [0, 3, 0, -3, 0], [0, 1, 0, -1, 0]],
], dtype=torch.float64)


def parse_budget(value: str | None, what: str) -> str:
    """``"flat"`` (also None/empty) or ``"jnd"``; ValueError with a one-line message otherwise."""
    v = "flat" if value is None or str(value).strip() == "" else str(value).strip().lower()
    if v not in BUDGETS:
        raise ValueError(f"{what} must be one of {', '.join(BUDGETS)}, got {value!r}")
    return v


def budget_settings(method: str, budget: str | None, jnd_scale: float | str) -> tuple[str, float]:
    """A method's validated ``budget`` (:func:`parse_budget`) and ``jnd_scale`` (in (0, 100]);
    ConfigError with a one-line message naming ``method`` otherwise."""
    try:
        return parse_budget(budget, f"{method}: budget"), _scale(method, jnd_scale)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _scale(method: str, jnd_scale: float | str) -> float:
    try:
        scale = float(jnd_scale)
    except ValueError:
        raise ConfigError(f"{method}: jnd_scale must be a number, got {jnd_scale!r}") from None
    if not 0.0 < scale <= 100.0:
        raise ConfigError(f"{method}: jnd_scale must be in (0, 100], got {jnd_scale}")
    return scale


def _pad(y: Tensor) -> Tensor:
    """Reflect-pad 2 px (replicate where the image is too small to reflect)."""
    return F.pad(y, (2, 2, 2, 2), mode="reflect" if min(y.shape[-2:]) > 2 else "replicate")


def jnd_levels(y: Tensor, lum_max: float | None = None, texture: float = 1.0, dark: float = 0.0) -> Tensor:
    """The just-noticeable difference, in 8-bit levels, of luminance ``y`` (``N x 1 x H x W`` on the
    8-bit scale, float): the model of the module doc, its luminance term capped at ``lum_max``
    levels when given and its texture term multiplied by ``texture`` and, below mid-grey, by
    ``(b / 127) ** dark``. Same shape."""
    y = y.to(torch.float32)
    p = _pad(y)
    b = F.conv2d(p, _BACKGROUND.to(y)[None, None])
    g = torch.zeros_like(y)
    for kernel in _DIRECTIONS.to(y):  # one direction at a time: one extra value per pixel, not four
        torch.maximum(g, F.conv2d(p, kernel[None, None]).abs_(), out=g)
    g /= 16
    lum = torch.where(b <= 127, 17 * (1 - (b.clamp_min(0) / 127).sqrt()) + 3, 3 / 128 * (b - 127) + 3)
    if lum_max is not None:
        lum = lum.clamp_(max=lum_max)
    tex = (0.117 * texture) * g
    if dark:
        tex *= (b.clamp(0, 127) / 127) ** dark
    return lum + tex - 0.3 * torch.minimum(lum, tex)


def _luma8(v: Tensor, levels: int) -> Tensor:
    """Luminance of ``v`` (``N x C x H x W``, C = 1 or 3) on the 8-bit scale, float32."""
    x = v.to(torch.float32) * (255.0 / levels)
    if x.shape[1] == 3:
        return 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    return x.mean(1, keepdim=True)


def budget_weights(v: Tensor, levels: int, eps: float, scale: float = 1.0) -> Tensor:
    """``N x 1 x H x W`` weights in [0, 1]: ``min(1, scale * JND / (eps * 255))`` for images ``v``
    (``N x C x H x W``, C = 1 or 3, integer levels of ``levels`` or float on that scale)."""
    return (scale * jnd_levels(_luma8(v, levels)) / (eps * 255)).clamp_(max=1.0)


#: The luminance term of :func:`lowfreq_weights`: the model's value in mid-grey.
LOWFREQ_LUM = 3.0
#: Below mid-grey, :func:`lowfreq_weights` scales the texture term by ``(b / 127) ** LOWFREQ_DARK``.
LOWFREQ_DARK = 2.0


def _gauss(m: Tensor, sigma: float) -> Tensor:
    r = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-t * t / (2 * sigma * sigma))
    g = (g / g.sum()).to(m)
    m = F.pad(m, (r, r, r, r), mode="replicate")
    return F.conv2d(F.conv2d(m, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))


def lowfreq_weights(v: Tensor, levels: int, eps: float, scale: float = 1.0, texture: float = 1.0,
                    dark: float = LOWFREQ_DARK, side: int = 256, sigma: float = 2.0) -> Tensor:
    """Weights in [0, 1] of a smooth change of bound ``eps`` on images ``v`` (``N x C x H x W``):
    ``min(1, scale * JND / (eps * 255))`` with the JND of the module doc's low-frequency budget
    (texture term times ``texture``, darkened by ``dark``), at the working size (shorter side
    ``min(side, own)``): ``N x 1 x h x w``; full size by :func:`upsample_rows`."""
    n, _, h, w = v.shape
    y = torch.empty(n, 1, h, w, dtype=torch.float32, device=v.device)
    step = max(1, (1 << 20) // max(1, w))  # the luminance in strips: no float copy of the whole image
    for r in range(0, h, step):
        y[:, :, r:r + step] = _luma8(v[:, :, r:r + step], levels)
    s = min(1.0, side / min(h, w))
    if s < 1.0:
        y = F.interpolate(y, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
                          antialias=True, align_corners=False)
    j = _gauss(jnd_levels(y, lum_max=LOWFREQ_LUM, texture=texture, dark=dark), sigma)
    return (scale * j / (eps * 255)).clamp_(0.0, 1.0)


def upsample_rows(m: Tensor, h: int, w: int, r0: int, r1: int) -> Tensor:
    """Rows ``r0:r1`` of ``m`` (``N x 1 x hs x ws``) resized bilinearly to ``h x w`` (the values of
    ``F.interpolate(m, (h, w), mode="bilinear", align_corners=False)``, up to rounding), computed
    from the rows they need: ``N x 1 x (r1 - r0) x w``."""
    hs, ws = m.shape[-2:]
    if ws != w:
        m = F.interpolate(m, size=(hs, w), mode="bilinear", align_corners=False)
    src = ((torch.arange(r0, r1, dtype=torch.float64) + 0.5) * (hs / h) - 0.5).clamp_(min=0.0)
    i0 = src.floor().long().clamp_(max=hs - 1)
    i1 = (i0 + 1).clamp_(max=hs - 1)
    f = (src - i0).to(m.dtype).view(1, 1, -1, 1)
    return m[:, :, i0] * (1 - f) + m[:, :, i1] * f
