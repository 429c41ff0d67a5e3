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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BUDGETS", "budget_weights", "jnd_levels", "parse_budget"]

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


def _pad(y: Tensor) -> Tensor:
    """Reflect-pad 2 px (replicate where the image is too small to reflect)."""
    return F.pad(y, (2, 2, 2, 2), mode="reflect" if min(y.shape[-2:]) > 2 else "replicate")


def jnd_levels(y: Tensor) -> Tensor:
    """The just-noticeable difference, in 8-bit levels, of luminance ``y`` (``N x 1 x H x W`` on the
    8-bit scale, float): the model of the module doc. Same shape."""
    y = y.to(torch.float32)
    p = _pad(y)
    b = F.conv2d(p, _BACKGROUND.to(y)[None, None])
    g = torch.zeros_like(y)
    for kernel in _DIRECTIONS.to(y):  # one direction at a time: one extra value per pixel, not four
        torch.maximum(g, F.conv2d(p, kernel[None, None]).abs_(), out=g)
    g /= 16
    lum = torch.where(b <= 127, 17 * (1 - (b.clamp_min(0) / 127).sqrt()) + 3, 3 / 128 * (b - 127) + 3)
    tex = 0.117 * g
    return lum + tex - 0.3 * torch.minimum(lum, tex)


def budget_weights(v: Tensor, levels: int, eps: float, scale: float = 1.0) -> Tensor:
    """``N x 1 x H x W`` weights in [0, 1]: ``min(1, scale * JND / (eps * 255))`` for images ``v``
    (``N x C x H x W``, C = 1 or 3, integer levels of ``levels`` or float on that scale)."""
    x = v.to(torch.float32) * (255.0 / levels)
    if x.shape[1] == 3:
        y = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    else:
        y = x.mean(1, keepdim=True)
    return (scale * jnd_levels(y) / (eps * 255)).clamp_(max=1.0)
