"""CUDA: Convolution-based Unlearnable DAtasets.

Sadasivan, Soltanolkotabi, Feizi, "CUDA: Convolution-based Unlearnable Datasets", CVPR 2023.
Implemented from the paper's description (the official code's licence forbids copying).

Each class ``c`` gets a random ``k x k`` filter drawn from the key: entries uniform in
``[0, blur)``, then one uniformly chosen position set to 1. Every image of class ``c`` is convolved
with that filter (the same filter on every channel: depthwise, stride 1, same-size output) and
divided by its own global maximum (over all channels and pixels), so values stay in [0, 1]. A model
trained on such data learns the class-wise blur instead of the image content.

Defaults (paper): ``k = 3, blur = 0.3`` for CIFAR-sized images, ``k = 9, blur = 0.06`` at ImageNet
size. Rule used here when they are not given: the median shorter side of the dataset's images
below :data:`LARGE_IMAGE_SIDE` (128 px) gets the CIFAR setting, otherwise the ImageNet setting.
The rule is applied once per dataset in :meth:`CUDA.fit`, so every image of a class shares one
filter even when the folder mixes sizes.

Padding: the reference code pads with zeros (``padding="zero"``, alias ``"faithful"``), which
darkens a ``k // 2`` pixel border in a class-dependent way. That border is part of the shortcut and
makes the protection stronger, but a detector can spot it (COIN, AAAI'25). ``"reflect"`` mirrors the
image instead: no dark frame, but weaker (quick tier on 10k CIFAR-10: 33.9 % clean-test accuracy
after training on reflect-padded CUDA data vs 23.5 % with zero padding, clean 71.5 %; command and
table in docs/BENCHMARKS.md). The default is therefore ``"zero"``.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from . import register
from .base import FitData, Perturbation
from .errors import ConfigError
from .keyring import Keyring

#: Shorter side (pixels) from which the ImageNet-size defaults are used.
LARGE_IMAGE_SIDE = 128
SMALL_DEFAULTS = (3, 0.3)  # CIFAR-10 setting of the paper
LARGE_DEFAULTS = (9, 0.06)  # ImageNet setting of the paper
PADDINGS = ("reflect", "replicate", "zero")


def defaults_for_side(side: int) -> tuple[int, float]:
    """The paper's ``(filter_size, blur)`` for images whose shorter side is ``side`` pixels."""
    return SMALL_DEFAULTS if side < LARGE_IMAGE_SIDE else LARGE_DEFAULTS


def blur_for_size(size: int) -> float:
    """Default ``blur`` for a filter size: 0.3 up to k=3, 0.06 from k=9, linear in between."""
    (k0, b0), (k1, b1) = SMALL_DEFAULTS, LARGE_DEFAULTS
    t = min(max((size - k0) / (k1 - k0), 0.0), 1.0)
    return round(b0 + t * (b1 - b0), 4)


def draw_filters(gen: torch.Generator, num_classes: int, size: int, blur: float) -> torch.Tensor:
    """``num_classes x size x size`` filters: entries in [0, blur), one random entry set to 1."""
    filters = torch.rand(num_classes, size * size, generator=gen, dtype=torch.float32) * blur
    peak = torch.randint(0, size * size, (num_classes,), generator=gen)
    filters[torch.arange(num_classes), peak] = 1.0
    return filters.view(num_classes, size, size)


def convolve_normalise(x: torch.Tensor, filters: torch.Tensor, padding: str = "zero") -> torch.Tensor:
    """Depthwise-convolve image ``i`` with ``filters[i]`` and divide by its global maximum.

    Args:
        x: ``N x C x H x W`` float images in [0, 1].
        filters: ``N x k x k`` non-negative filters, ``k`` odd.
        padding: ``"reflect"``, ``"replicate"`` or ``"zero"``.
    Returns:
        ``N x C x H x W`` in [0, 1]; each image's maximum is 1 unless it was all zero.
    """
    n, c, h, w = x.shape
    k = filters.shape[-1]
    r = k // 2
    if r:
        mode = padding
        if mode == "reflect" and (h <= r or w <= r):
            mode = "replicate"  # reflection needs more pixels than the radius
        x = F.pad(x, (r, r, r, r), mode="constant" if mode == "zero" else mode)
    weight = filters.to(x.dtype).repeat_interleave(c, dim=0).unsqueeze(1)  # (N*C) x 1 x k x k
    planes = x.reshape(1, n * c, h + 2 * r, w + 2 * r)
    if n * c == 1:
        # One plane alone would take conv2d's dense (groups=1) kernel, which rounds differently
        # from the depthwise one: give it a twin so that results never depend on the batching.
        planes, weight = planes.repeat(1, 2, 1, 1), weight.repeat(2, 1, 1, 1)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        out = F.conv2d(planes, weight, groups=planes.shape[1])
    out = out[:, : n * c].reshape(n, c, h, w)
    # All-zero images stay zero (0 / tiny = 0); otherwise the maximum becomes exactly 1.
    return out.div_(out.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)).clamp_(0.0, 1.0)


@register
class CUDA(Perturbation):
    """Class-wise keyed blur (CUDA, Sadasivan et al., CVPR 2023).

    Args:
        keyring: key material; filters come from its ``"cuda/filters"`` stream.
        num_classes: number of classes (taken from :meth:`fit` when ``None``).
        filter_size: odd ``k``; ``None`` picks 3 or 9 from the image size (see module doc).
        blur: upper bound ``p_b`` of the off-peak filter entries, in (0, 1]; ``None`` follows
            ``filter_size`` (0.3 for k <= 3, 0.06 for k >= 9, linear in between).
        padding: ``"zero"``/``"faithful"`` (default, the reference: strongest), ``"reflect"`` or
            ``"replicate"`` (no dark border, weaker).
        mix: fraction in (0, 1] of images protected, chosen per image id from the key (Table 5).
        universal: one shared filter for all classes (the paper's ablation; weak on purpose).
    """

    name = "cuda"
    summary = "class-wise keyed blur filters; model-free, fast, any image size (needs labels)"
    paper = "Sadasivan et al., CUDA: Convolution-based Unlearnable Datasets, CVPR 2023"
    needs_labels = True

    def __init__(
        self,
        keyring: Keyring,
        num_classes: int | None = None,
        filter_size: int | None = None,
        blur: float | None = None,
        padding: str = "zero",
        mix: float = 1.0,
        universal: bool = False,
    ) -> None:
        super().__init__(keyring)
        if padding == "faithful":
            padding = "zero"
        if padding not in PADDINGS:
            raise ConfigError(f"cuda: padding must be one of {', '.join(PADDINGS)} or faithful, got '{padding}'")
        if filter_size is not None and (int(filter_size) != filter_size or filter_size < 1 or filter_size % 2 == 0):
            raise ConfigError(f"cuda: filter size must be an odd integer >= 1, got {filter_size}")
        if blur is not None and not 0.0 < float(blur) <= 1.0:
            raise ConfigError(f"cuda: blur must be in (0, 1], got {blur}")
        if not 0.0 < float(mix) <= 1.0:
            raise ConfigError(f"cuda: mix must be in (0, 1], got {mix}")
        if num_classes is not None and int(num_classes) < 1:
            raise ConfigError(f"cuda: num_classes must be >= 1, got {num_classes}")
        self.num_classes = None if num_classes is None else int(num_classes)
        self.filter_size = None if filter_size is None else int(filter_size)
        self.blur = None if blur is None else float(blur)
        self.auto = filter_size is None or blur is None
        self.padding = padding
        self.mix = float(mix)
        self.universal = bool(universal)
        self.filters: torch.Tensor | None = None
        self._on_device: dict[torch.device, torch.Tensor] = {}

    # -- fitting ---------------------------------------------------------------------------
    def _resolve(self, side: int) -> None:
        k = defaults_for_side(side)[0]
        if self.filter_size is None:
            self.filter_size = k
        if self.blur is None:
            self.blur = blur_for_size(self.filter_size)

    def _draw(self) -> None:
        assert self.num_classes and self.filter_size and self.blur
        gen = self.keyring.generator("cuda/filters")
        count = 1 if self.universal else self.num_classes
        filters = draw_filters(gen, count, self.filter_size, self.blur)
        self.filters = filters.expand(self.num_classes, -1, -1).contiguous() if self.universal else filters
        self._on_device.clear()
        self.fitted = True

    def fit(self, data: FitData) -> "CUDA":
        super().fit(data)
        if self.num_classes is None:
            self.num_classes = data.num_classes
        elif data.num_classes > self.num_classes:
            raise ConfigError(f"cuda: data has {data.num_classes} classes, method built for {self.num_classes}")
        sides = [min(h, w) for h, w in data.sizes]
        self._resolve(int(statistics.median(sides)) if sides else 32)
        self._draw()
        return self

    # -- protecting ------------------------------------------------------------------------
    def apply(
        self, x: torch.Tensor, labels: torch.Tensor | None = None, ids: Sequence[str] | None = None
    ) -> torch.Tensor:
        self._check_batch(x, labels)
        assert labels is not None
        if self.filters is None:
            if self.num_classes is None:
                raise ConfigError("cuda: call fit() first or give num_classes")
            self._resolve(min(x.shape[-2:]))
            self._draw()
        assert self.filters is not None
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.filters.shape[0]):
            raise ConfigError(f"cuda: labels must be in [0, {self.filters.shape[0]}), got {labels.tolist()}")
        filters = self._on_device.get(x.device)
        if filters is None:
            filters = self._on_device.setdefault(x.device, self.filters.to(x.device))
        labels = labels.to(x.device)
        if self.mix >= 1.0:
            return convolve_normalise(x, filters[labels], self.padding)
        if ids is None or len(ids) != x.shape[0]:
            raise ConfigError("cuda: mix < 1 needs one id per image")
        chosen = torch.tensor([self.keyring.unit("cuda/mix", i) < self.mix for i in ids], device=x.device)
        out = x.clone()
        if chosen.any():
            out[chosen] = convolve_normalise(x[chosen], filters[labels[chosen]], self.padding)
        return out

    def is_protected(self, ids: Sequence[str]) -> list[bool]:
        """Which of these image ids ``mix`` selects for protection."""
        return [self.mix >= 1.0 or self.keyring.unit("cuda/mix", i) < self.mix for i in ids]

    # -- state -----------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "filter_size": self.filter_size,
            "blur": self.blur,
            "padding": self.padding,
            "mix": self.mix,
            "universal": self.universal,
            "size_rule": f"auto (shorter side < {LARGE_IMAGE_SIDE}px: k=3, blur=0.3; else k=9, blur=0.06)"
            if self.auto
            else "given",
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.filters is None else {"filters": self.filters.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        filters = state.get("filters")
        if filters is None or filters.ndim != 3 or filters.shape[-1] != filters.shape[-2]:
            raise ConfigError("cuda: saved state has no valid 'filters' tensor")
        self.filters = filters.to(torch.float32).clone()
        self.num_classes, self.filter_size = filters.shape[0], filters.shape[-1]
        self._on_device.clear()
        self.fitted = True

