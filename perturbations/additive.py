"""Bounded additive perturbations applied on the image's own integer grid (shared by Unlearnable
Clusters and SALM).

A method of this kind keeps, for every image, the index of a perturbation (a cluster's, or the
image's own) defined at a working size, ``|delta|_inf <= eps``. Applying it resizes that
perturbation to the image (:attr:`AdditivePerturbation.resize_mode`; both modes only average or copy
values, so the bound holds), averages it over channels for grey images (or repeats a grey one for
colour images), and quantises it to whole levels within ``floor(eps * levels)``: the output is
``clamp(v + round(delta * levels), 0, levels)`` in exact integer arithmetic, so the bound holds in
the written 8-bit, 16-bit or DICOM file and pixels where ``delta`` is zero keep their exact value.

With ``budget="jnd"`` each pixel's change is further multiplied by the image's own perceptual
weight (:func:`perturbations.masking.budget_weights`: at most ``jnd_scale`` just-noticeable
differences, computed from the unprotected pixels) and rounded towards the same grid, so flat,
mid-bright regions change less than dark or textured ones; the bound, the exactness and the
untouched pixels hold as before.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import Perturbation
from .errors import ConfigError
from .masking import budget_settings, budget_weights

#: Values of resized perturbations kept per process (a cache across batches of one size).
CACHE_VALUES = 1 << 26


class AdditivePerturbation(Perturbation):
    """Base class: subclasses set ``eps`` and implement :meth:`_indices` and :meth:`_source`."""

    breakers = ("jpeg10", "grayscale", "ueraser")
    breakers_source = ("JPEG-10 and grayscale (Image Shortcut Squeezing, Liu et al., ICML 2023) and UEraser "
                       "(Qin et al., 2023), published against additive unlearnable noise")

    #: ``"bilinear"`` (antialiased when shrinking) or ``"nearest"`` (keeps a sparse support sparse).
    resize_mode: ClassVar[str] = "bilinear"
    #: Keep resized perturbations between batches (worth it when many images share one).
    cache_resized: ClassVar[bool] = False
    eps: float
    #: ``"flat"`` (the bound ``eps`` everywhere) or ``"jnd"`` (see the module doc).
    budget: str = "flat"
    #: With ``budget="jnd"``: at most this many just-noticeable differences per pixel.
    jnd_scale: float = 1.0

    def _init_budget(self, budget: str | None, jnd_scale: float | str) -> None:
        """Validate and set ``budget`` and ``jnd_scale`` (ConfigError with a one-line message)."""
        self.budget, self.jnd_scale = budget_settings(self.name, budget, jnd_scale)

    def _weights(self, x: torch.Tensor) -> torch.Tensor | None:
        """Perceptual weights (``N x 1 x H x W``) of float images ``x`` in [0, 1] with
        ``budget="jnd"``, else None."""
        if self.budget != "jnd":
            return None
        return budget_weights(x.detach() * 255, 255, self.eps, self.jnd_scale)

    def _weigh(self, delta: torch.Tensor, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """``delta`` as it will be applied to float images ``x``: weighted by their perceptual
        budget with ``budget="jnd"`` (``weights``: :meth:`_weights` of ``x``, when already
        computed), else ``delta`` itself. What the optimising methods see during their fit."""
        if self.budget != "jnd":
            return delta
        w = self._weights(x) if weights is None else weights
        return delta * w.to(delta.device)

    def _masked(self, d: torch.Tensor, v: torch.Tensor, levels: int) -> torch.Tensor:
        """``d`` (integer levels, ``C x H x W``) weighted by the perceptual budget of image ``v``
        (the unprotected pixels, ``C x H x W``) when ``budget="jnd"``, else ``d`` itself."""
        if self.budget != "jnd":
            return d
        m = budget_weights(v[None], levels, self.eps, self.jnd_scale)[0]
        return (d.to(torch.float32) * m).round_().to(d.dtype)

    @abstractmethod
    def _indices(self, ids: Sequence[str] | None, n: int) -> list[int]:
        """The perturbation index of each image (raises InputError for an unknown image)."""

    @abstractmethod
    def _source(self, index: int) -> torch.Tensor:
        """Perturbation ``index`` as ``1 x C x S x S`` float (C = 1 or 3) within ``eps``."""

    def _delta_levels(self, index: int, c: int, h: int, w: int, levels: int, device: torch.device) -> torch.Tensor:
        """Perturbation ``index`` resized to ``c x h x w`` on the integer grid of ``levels``."""
        cache: OrderedDict[tuple, torch.Tensor] | None = getattr(self, "_resized", None) if self.cache_resized else None
        key = (index, c, h, w, levels, str(device))
        if cache is not None and key in cache:
            cache.move_to_end(key)
            return cache[key]
        d = self._source(index).double()
        if d.shape[1] != c:
            d = d.mean(1, keepdim=True) if c == 1 else d.expand(-1, c, -1, -1)
        if tuple(d.shape[-2:]) != (h, w):
            if self.resize_mode == "nearest":
                d = F.interpolate(d, size=(h, w), mode="nearest")
            else:
                shrink = h < d.shape[-2] or w < d.shape[-1]
                d = F.interpolate(d, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)
        bound = math.floor(self.eps * levels + 1e-9)
        q = d[0].mul(levels).round_().clamp_(-bound, bound)
        q = q.to(torch.int16 if levels <= 255 else torch.int32).to(device)
        if self.cache_resized:
            if cache is None:
                cache = OrderedDict()
                self._resized = cache
            cache[key] = q
            while sum(v.numel() for v in cache.values()) > CACHE_VALUES and len(cache) > 1:
                cache.popitem(last=False)
        return q

    def clear_cache(self) -> None:
        """Forget resized perturbations (after the perturbations changed)."""
        self._resized = OrderedDict()

    def protect_levels(
        self, v: torch.Tensor, labels: torch.Tensor | None = None, ids: Sequence[str] | None = None,
        levels: int = 255,
    ) -> torch.Tensor:
        """Integer path: ``clamp(v + round(delta * levels), 0, levels)`` (see module doc); equals
        ``round(apply(v / levels) * levels)`` for 8-bit images."""
        if v.is_floating_point():
            raise ConfigError(f"{self.name}: protect_levels takes integer pixels")
        n, c, h, w = v.shape
        out = torch.empty_like(v)
        wide = torch.int16 if levels <= 255 else torch.int32
        for i, k in enumerate(self._indices(ids, n)):
            d = self._masked(self._delta_levels(k, c, h, w, levels, v.device), v[i], levels)
            out[i] = (v[i].to(wide) + d).clamp_(0, levels).to(v.dtype)
        return out

    def apply(
        self, x: torch.Tensor, labels: torch.Tensor | None = None, ids: Sequence[str] | None = None
    ) -> torch.Tensor:
        """Float path: ``clip(x + round(delta * 255) / 255, 0, 1)``. Labels are never needed here:
        each image's perturbation is found by its id."""
        self._check_batch(x, labels if labels is not None else torch.zeros(x.shape[0], dtype=torch.long))
        n, c, h, w = x.shape
        out = torch.empty_like(x)
        for i, k in enumerate(self._indices(ids, n)):
            d = self._masked(self._delta_levels(k, c, h, w, 255, x.device), x[i].mul(255).round(), 255)
            out[i] = (x[i] + d.to(x.dtype) / 255).clamp_(0, 1)
        return out
