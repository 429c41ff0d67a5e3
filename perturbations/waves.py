"""Class-wise keyed waves: a low-frequency luminance shortcut defined per shorter side, so that the
attacker's resize keeps it.

Every class ``c`` gets ``components`` plane waves with a keyed orientation, a keyed frequency in
``cycles`` (cycles per shorter side of the image) and a keyed phase; an image of class ``c`` gets
their sum, scaled to at most ``eps`` (L-inf), added equally to every channel (a change of
brightness, not of colour, so a grayscale breaker keeps it). The waves are centred on the image and
measured in units of its shorter side, so a 768x512 photo and its 48x32 thumbnail carry the same
pattern: whatever resize, centre crop or random-resized crop an attacker applies, the pattern is
still there at the size the model trains at (a crop only zooms it, which lowers its frequency; a
flip mirrors its orientation). This is the resolution-aware design of issue 19 for an additive,
model-free method, in the family of class-wise synthetic shortcuts (Yu et al., Availability Attacks
Create Shortcuts, KDD 2022: class-wise patterns from a few degrees of freedom, upsampled to the
image), made smooth and scale-free instead of patch-wise at a fixed grid. Low frequencies are also
what the low-frequency dE sees, so under ``--max-delta-e`` the amplitude is what the floor allows.

Exact integer arithmetic (the wave itself, and the whole change with ``budget="flat"``): the phase
of pixel ``(x, y)`` is an integer (the wave vector ``(a, b)`` is stored as integers, the
coordinates in half pixels), the sine is a table of integers checked at
import to hold no rounding ties, and the change is rounded in integers (ties up): the same key and
labels give the same bytes on every machine and instruction set. :meth:`apply` adds the same 8-bit
change as a float, so ``protect_levels(v) == round(apply(v / 255) * 255)`` for 8-bit images; 16-bit
images get the change computed at their own levels.

Budget. With ``budget="flat"`` every pixel gets the wave at its full size; under ``--max-delta-e 2``
that was measured to show as light and dark patches on flat areas (Kodak kodim09's sky at thumbnail
size: the dE floor bounds a mean, not where the eye looks). The default ``budget="jnd"`` multiplies
the wave by the image's own low-frequency perceptual weight
(:func:`perturbations.masking.lowfreq_weights`: at most ``jnd_scale`` just-noticeable differences,
the luminance term capped at its mid-grey value, the texture term times ``texture`` (4) and, below
mid-grey, by ``(b / 127) ** dark`` (2), computed at a 256-px working size and smoothed), quantised
to 1/:data:`WEIGHT_STEPS` and applied in integers (``round(delta * k / WEIGHT_STEPS)``, ties up).
The weights come from float convolutions, so this budget is not exact: on another instruction set a
weight within rounding error of a step may take the next step (one level of change at such pixels);
the record pins the device class as for the other float methods. The pattern a downscale keeps is
the wave times the local mean weight: still the class's waves, strongest where the image is
textured.

Shapes: ``apply`` takes ``N x C x H x W`` float in [0, 1] and labels ``(N,)``; the pattern is
computed in strips of rows, so memory is a few int64 strips per image, not ``H x W`` of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from . import register
from .base import FitData, Perturbation, parse_fraction
from .errors import ConfigError
from .masking import budget_settings, lowfreq_weights, upsample_rows

#: Entries of the integer sine table (one period) and its amplitude.
TABLE_SIZE = 4096
TABLE_AMP = 1 << 14
#: Resolution of the stored wave vector: cycles per shorter side = |(a, b)| / ORIENT.
ORIENT = 64
#: Values of one strip of rows (int64), which bounds the working memory per image.
STRIP_VALUES = 1 << 20
#: Changes kept per method (label, size, levels), as int16: 24 MB each for a 12-megapixel photo.
CACHE_ENTRIES = 4
#: Steps of the perceptual weight with ``budget="jnd"``: the change is ``round(delta * k / WEIGHT_STEPS)``.
WEIGHT_STEPS = 64


def _table() -> torch.Tensor:
    raw = [TABLE_AMP * math.sin(2 * math.pi * k / TABLE_SIZE) for k in range(TABLE_SIZE)]
    # no entry within 1e-6 of a rounding tie: a sine 1 ULP off on another libm rounds the same
    assert all(abs(abs(r - math.floor(r)) - 0.5) > 1e-6 for r in raw)
    return torch.tensor([round(r) for r in raw], dtype=torch.int64)


_SINE = _table()


def parse_cycles(value: Any) -> tuple[float, float]:
    """``"3-8"`` (or one number) as ``(low, high)`` cycles per shorter side; ConfigError otherwise."""
    text = str(value).strip()
    lo_text, dash, hi_text = text.partition("-")
    try:
        lo = float(lo_text)
        hi = float(hi_text) if dash else lo
    except ValueError:
        raise ConfigError(f"waves: cycles must be LOW-HIGH cycles per shorter side, e.g. 3-8, got '{value}'") from None
    if not (0.5 <= lo <= hi <= 64):
        raise ConfigError(f"waves: cycles must lie in 0.5-64 per shorter side with LOW <= HIGH, got '{value}'")
    return lo, hi


@register
class Waves(Perturbation):
    """Class-wise keyed low-frequency luminance waves (module doc).

    Args:
        keyring: the owner's key material; it draws every class's waves.
        eps: L-inf bound of the change (the sum of the waves reaches it at its peaks), e.g. 16/255.
        components: plane waves per class (more: a richer, harder to guess pattern, each weaker).
        cycles: range of the waves' frequencies in cycles per shorter side, ``LOW-HIGH``. The
            attacker who trains at R px sees ``cycles`` cycles across R px (fewer in a zoomed crop):
            keep ``HIGH`` below R / 2 for the smallest R that matters (the default 3-8 is below 16,
            the Nyquist limit at 32 px).
        num_classes: number of classes (taken from :meth:`fit` when ``None``).
        budget: ``"jnd"`` (default: the wave weighted by the image's low-frequency perceptual
            budget, less on flat areas; module doc) or ``"flat"`` (the wave everywhere, exact
            integer arithmetic; visible on flat areas).
        jnd_scale: with ``budget="jnd"``: just-noticeable differences allowed per pixel (default 1).
        texture: with ``budget="jnd"``: gain of the JND's texture term (default 4: flat areas get at
            most 3 levels, busy texture up to ``eps``; 1 is the pixel model's own; from 8 on the
            waves showed as bands on Kodak kodim11's water at 1:1).
        dark: with ``budget="jnd"``: below mid-grey the texture term is scaled by
            ``(b / 127) ** dark`` (default 2: a level is a larger relative change in the dark, where
            16 levels in a textured shadow showed as mottling; 0 turns it off).
    """

    name = "waves"
    summary = "class-wise keyed low-frequency brightness waves that scale with the image (needs labels)"
    paper = ("issue 19's resolution-aware shortcut; family of Yu et al., Availability Attacks Create Shortcuts, "
             "KDD 2022")
    needs_labels = True
    exact = False  # the class's answer for a chain; an instance with budget="flat" is exact (__init__)
    work_bytes_per_value = 8.0  # the output copy, a strip of int64 phases, the float luminance (budget="jnd")

    def __init__(self, keyring, eps: float | str = 16 / 255, components: int = 3, cycles: str = "3-8",
                 num_classes: int | None = None, budget: str = "jnd", jnd_scale: float | str = 1.0,
                 texture: float | str = 4.0, dark: float | str = 2.0) -> None:
        super().__init__(keyring)
        self.budget, self.jnd_scale = budget_settings(self.name, budget, jnd_scale)
        for name, value in (("texture", texture), ("dark", dark)):
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"waves: {name} must be a number, got {value!r}") from None
            if not 0.0 <= number <= 100.0:
                raise ConfigError(f"waves: {name} must be in [0, 100], got {value}")
            setattr(self, name, number)
        self.exact = self.budget == "flat"
        self.eps = parse_fraction(eps, "waves: eps")
        if not 0.0 < self.eps <= 1.0:
            raise ConfigError(f"waves: eps must be in (0, 1], got {eps}")
        if int(components) != components or not 1 <= components <= 16:
            raise ConfigError(f"waves: components must be an integer in 1-16, got {components}")
        self.components = int(components)
        self.cycles_text = str(cycles)
        self.cycles = parse_cycles(cycles)
        if num_classes is not None and int(num_classes) < 1:
            raise ConfigError(f"waves: num_classes must be >= 1, got {num_classes}")
        self.num_classes = None if num_classes is None else int(num_classes)
        #: ``num_classes x components x 3`` int64: wave vector (a, b) and phase of every wave.
        self.waves: torch.Tensor | None = None
        #: The last few changes by (label, height, width, levels); not part of the state.
        self._cache: dict[tuple[int, int, int, int], torch.Tensor] = {}
        if self.num_classes is not None:
            self._draw()

    # -- the keyed waves ---------------------------------------------------------------------
    def _draw(self) -> None:
        assert self.num_classes
        gen = self.keyring.generator("waves/classes")
        lo, hi = self.cycles
        rows = []
        for _ in range(self.num_classes):  # class c's waves do not depend on how many classes follow
            u = torch.rand(self.components, 2, generator=gen, dtype=torch.float64)
            phase = torch.randint(0, TABLE_SIZE, (self.components,), generator=gen)
            for j in range(self.components):
                theta, f = float(u[j, 0]) * math.pi, lo + float(u[j, 1]) * (hi - lo)
                rows.append([round(f * math.cos(theta) * ORIENT), round(f * math.sin(theta) * ORIENT), int(phase[j])])
        self.waves = torch.tensor(rows, dtype=torch.int64).view(self.num_classes, self.components, 3)
        self._cache.clear()
        self.fitted = True

    def fit(self, data: FitData) -> "Waves":
        super().fit(data)
        if self.num_classes is None:
            self.num_classes = data.num_classes
        elif data.num_classes > self.num_classes:
            raise ConfigError(f"waves: data has {data.num_classes} classes, method built for {self.num_classes}")
        self._draw()
        return self

    def delta(self, label: int, size: tuple[int, int], levels: int = 255) -> torch.Tensor:
        """The integer change (int64 ``H x W``, at most ``round(eps * levels)`` in magnitude) an image
        of class ``label`` and ``size`` gets; the last few are kept (int16), since a camera's photos
        share a size."""
        if self.waves is None:
            raise ConfigError("waves: call fit() first or give num_classes")
        return self._cached(label, size, levels).to(torch.int64)

    def _cached(self, label: int, size: tuple[int, int], levels: int) -> torch.Tensor:
        """The change of :meth:`delta` as kept (int16 for 8-bit levels, int32 above), made on a miss."""
        key = (int(label), int(size[0]), int(size[1]), int(levels))
        cache = self._cache
        if key not in cache:
            if len(cache) >= CACHE_ENTRIES:
                cache.pop(next(iter(cache)))
            cache[key] = self._delta(*key).to(torch.int16 if levels <= 255 else torch.int32)
        return cache[key]

    def _delta(self, label: int, h: int, w: int, levels: int) -> torch.Tensor:
        bound = int(round(self.eps * levels))
        n = self.components
        out = torch.empty(h, w, dtype=torch.int64)
        u = 2 * torch.arange(w, dtype=torch.int64) - (w - 1)  # half pixels from the centre
        v = 2 * torch.arange(h, dtype=torch.int64) - (h - 1)
        den = 2 * min(h, w) * ORIENT
        step = max(1, STRIP_VALUES // max(1, w))
        for r in range(0, h, step):
            acc = torch.zeros(min(step, h - r), w, dtype=torch.int64)
            for a, b, phase in self.waves[label].tolist():
                idx = (a * u[None, :] + b * v[r:r + step, None]).mul_(TABLE_SIZE)
                idx = torch.div(idx, den, rounding_mode="floor").add_(phase).remainder_(TABLE_SIZE)
                acc += _SINE[idx]
            # round(acc * bound / (n * TABLE_AMP)), ties up, in integers
            out[r:r + step] = torch.div(acc.mul_(2 * bound).add_(n * TABLE_AMP), 2 * n * TABLE_AMP, rounding_mode="floor")
        return out

    def _labels(self, x: torch.Tensor, labels: torch.Tensor | None) -> list[int]:
        """The batch's labels as ints, checked (shape N x C x H x W with C 1 or 3, labels in range)."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ConfigError(f"waves: expected N x C x H x W with C in (1, 3), got {tuple(x.shape)}")
        if labels is None or labels.shape != (x.shape[0],):
            raise ConfigError(f"method 'waves' needs one class label per image ({x.shape[0]})")
        if self.waves is None:
            raise ConfigError("waves: call fit() first or give num_classes")
        out = [int(c) for c in labels.tolist()]
        if any(not 0 <= c < self.waves.shape[0] for c in out):
            raise ConfigError(f"waves: labels must lie in 0-{self.waves.shape[0] - 1}")
        return out

    def apply(self, x: torch.Tensor, labels: torch.Tensor | None = None,
              ids: Sequence[str] | None = None) -> torch.Tensor:
        if not x.is_floating_point():
            raise ConfigError(f"waves: expected a float tensor in [0, 1], got {x.dtype}")
        size = (x.shape[-2], x.shape[-1])
        if self.budget == "jnd":  # the weights come from the 8-bit image, as protect_levels sees it
            v = x.detach().mul(255).round_().clamp_(0, 255).to(torch.int16)
            change = self.protect_levels(v, labels).to(x.dtype).sub_(v.to(x.dtype)).div_(255)
            return (x + change).clamp_(0, 1)
        deltas = torch.stack([self.delta(c, size) for c in self._labels(x, labels)])
        return (x + deltas[:, None].to(x.device, x.dtype).div_(255)).clamp_(0, 1)

    def protect_levels(self, v: torch.Tensor, labels: torch.Tensor | None = None,
                       ids: Sequence[str] | None = None, levels: int = 255) -> torch.Tensor:
        """Integer path (module doc): ``clamp(v + change, 0, levels)``, the change the wave (exact,
        ``budget="flat"``) or the wave times the quantised perceptual weight (``budget="jnd"``),
        added in int16 for 8-bit levels and int32 for deeper ones."""
        if v.is_floating_point():
            raise ConfigError("waves: protect_levels takes integer pixels")
        h, w = size = (v.shape[-2], v.shape[-1])
        out = torch.empty_like(v)
        step = max(1, STRIP_VALUES // max(1, w))
        # v + change fits int16 for 8-bit levels (|change| <= 255) and int32 for deeper ones
        small = torch.int16 if levels <= 255 else torch.int32
        for i, c in enumerate(self._labels(v, labels)):
            d = self._cached(c, size, levels).to(v.device)
            if self.budget == "flat":
                out[i] = (v[i].to(small) + d[None]).clamp_(0, levels).to(v.dtype)
                continue
            # the weights at the working size (small); full size one strip at a time
            m = lowfreq_weights(v[i:i + 1], levels, self.eps, self.jnd_scale, self.texture, self.dark)
            for r in range(0, h, step):
                k = upsample_rows(m, h, w, r, min(h, r + step))[0, 0].mul_(WEIGHT_STEPS).round_().to(torch.int32)
                # round(d * k / WEIGHT_STEPS), ties up, in integers (|d * k * 2| < 2^31 for 16-bit levels)
                change = torch.div(d[r:r + step].to(torch.int32).mul_(k).mul_(2).add_(WEIGHT_STEPS), 2 * WEIGHT_STEPS,
                                   rounding_mode="floor").to(small)
                out[i, :, r:r + step] = (v[i, :, r:r + step].to(small) + change[None]).clamp_(0, levels).to(v.dtype)
        return out

    def __getstate__(self) -> dict[str, Any]:  # workers get the waves, not the cached changes
        return {**self.__dict__, "_cache": {}}

    # -- state -----------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        return {"eps": self.eps, "components": self.components, "cycles": self.cycles_text,
                "num_classes": self.num_classes, "budget": self.budget, "jnd_scale": self.jnd_scale,
                "texture": self.texture, "dark": self.dark}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.waves is None else {"waves": self.waves.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        waves = state.get("waves")
        if waves is None or waves.ndim != 3 or waves.shape[1:] != (self.components, 3) or waves.dtype != torch.int64:
            raise ConfigError("waves: saved state has no valid 'waves' tensor")
        self.waves = waves.clone()
        self._cache.clear()
        self.num_classes = int(waves.shape[0])
        self.fitted = True
