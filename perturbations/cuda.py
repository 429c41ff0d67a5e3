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

Exact arithmetic (why outputs are byte-identical everywhere): the filter entries are drawn on a
grid of ``2**-bits`` (``bits`` = 14 for k=3, p_b=0.3 and 13 for k=9, p_b=0.06: a step of about
1e-4, far below anything a model or a person can see), and the convolution runs on the integer
pixel values. Every product and every partial sum is then an integer below ``2**24``, which float32
holds exactly, so the convolution has one exact result whatever the kernel, summation order, SIMD
width, FMA use, thread count or batch composition (16-bit images are split into two 8-bit halves,
each convolved exactly, and recombined in float64). The only rounding left is one float64 division
by the image's maximum and the final ``round(y * levels)``, both single IEEE operations. So the same
key and the same input give the same bytes on any CPU or GPU, in any batch.

Rescaling (``rescale``): the paper divides each image by its own maximum (``"peak"``), which
stretches the image to the top of its grid. For 8-bit photos that is the method; for deep medical
images it is destructive: pydicom's CT_small.dcm (signed 16-bit, stored values 128..2191, Hounsfield
units after the rescale) comes out with its maximum at stored 32767, PSNR 7 dB. ``"input"`` divides by
the convolved image's maximum and multiplies by the *input* image's maximum ``m``, so the output
keeps the input's peak value (exactly: the pixel holding the convolved maximum gets ``m``) and stays
within its range: CT_small then keeps its maximum, PSNR 45 dB with ``"reflect"`` padding (27 dB
with ``"zero"``: for signed data the shifted zero is the most negative value, a deep dark frame).
``"auto"`` (default) is ``"peak"`` for images whose values lie on the 8-bit grid (every 8-bit image:
byte-identical to before) and ``"input"`` for deeper ones (12/16-bit DICOM, 16-bit PNG).
The rule looks at the values, not at the container, so ``apply(v / levels)`` picks the same mode as
``protect_levels(v, levels)``, per image, whatever the batch. ``"input"`` stays exact: per image
``y = float32(float64(a / peak) * m)`` with ``a`` and ``peak`` the exact integer sums and
``m = float32(inmax / levels)`` (the input's maximum exactly as ``apply`` sees it), then the usual
``round(y * levels)``. That is a fixed sequence of single IEEE operations, each correctly rounded
(a float32 division, a float64 division, a float64 product, a conversion to float32), with no sum,
so no FMA contraction, reordering or thread count can change it; CPUs and CUDA GPUs both implement
these operations exactly so (PyTorch builds no fast-math kernels). ``a / peak`` is the same rational
on any integer grid the values lie on, so the result does not depend on the grid either. For an
image that reaches the top of its grid ``m = 1`` and ``"input"`` equals ``"peak"`` bit for bit
(rounding a float64 quotient to float32 gives the correctly rounded float32 quotient, as
53 >= 2 x 24 + 2).

Padding: the reference code pads with zeros (``padding="zero"``, alias ``"faithful"``), which
darkens a ``k // 2`` pixel border in a class-dependent way. That border is part of the shortcut and
makes the protection stronger, but a detector can spot it (COIN, AAAI'25). ``"reflect"`` mirrors the
image instead: no dark frame, but weaker (quick tier on 10k CIFAR-10: 33.9 % clean-test accuracy
after training on reflect-padded CUDA data vs 23.5 % with zero padding, clean 71.5 %; command and
table in docs/BENCHMARKS.md). The default is therefore ``"zero"``.

Resolution (``reference``): the paper convolves at the size it trains at. A photo protected at
768 px and downscaled 4x by the attacker's pipeline loses most of the filter: a 9-px filter becomes
a sub-pixel blur (measured: CIFAR-10 upscaled to 128 px, the attacker training at 32 px, 0.385
against 0.67 protected at 32 px). With ``reference = R`` the same keyed ``k x k`` integer filter is
applied *dilated*: taps ``s = round(min(h, w) / R)`` pixels apart. A dilated filter commutes with
downscaling by ``s``: for any resampling that is a linear, shift-invariant prefilter ``g`` followed
by taking every ``s``-th pixel, ``D_s(g * (F dilated by s) * x) = F * D_s(g * x)``, because
``(F dilated by s)`` shifts by whole multiples of ``s``, which subsampling turns into the paper's
one-pixel shifts. So an attacker who downscales to ``R`` px (by box, bilinear or bicubic with
antialiasing) sees the paper's filter applied to the image he would have seen unprotected; non-integer
factors and crops make this approximate, not exact. The cost is at the full size: a dilated filter
leaves faint offset copies (ghosts ``s`` px apart), so ``reference`` trades fidelity at the owner's
size for strength at the attacker's; docs/BENCHMARKS.md ("Photos") has both. Exactness is untouched:
the same integer taps, the same sums.

Large images are convolved in row strips (a ``dilation * (k // 2)`` row halo), so the working memory is the
float32 sums of one image plus a strip, never several float copies of a photo.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from . import register
from .base import FitData, Perturbation, quantise_levels
from .clustered import TABLE_KEYS, SurrogateClusters
from .errors import ConfigError, InputError
from .keyring import Keyring

#: Shorter side (pixels) from which the ImageNet-size defaults are used.
LARGE_IMAGE_SIDE = 128
SMALL_DEFAULTS = (3, 0.3)  # CIFAR-10 setting of the paper
LARGE_DEFAULTS = (9, 0.06)  # ImageNet setting of the paper
PADDINGS = ("reflect", "replicate", "zero")
RESCALES = ("auto", "peak", "input")
#: Integer grids ``2**b - 1`` (b = 8..16) that :func:`_image_levels` tries, most common first; every
#: grid of b <= 16 bits lies on one of them (b divides one of 8..16).
_GRIDS = (255, 65535, 4095, 1023, 16383, 511, 2047, 8191, 32767)
#: float32 holds every integer below 2**24 exactly.
_EXACT = 1 << 24
#: Images with more values than this (per image) are convolved in row strips.
STRIP_VALUES = 1 << 21


def defaults_for_side(side: int) -> tuple[int, float]:
    """The paper's ``(filter_size, blur)`` for images whose shorter side is ``side`` pixels."""
    return SMALL_DEFAULTS if side < LARGE_IMAGE_SIDE else LARGE_DEFAULTS


def blur_for_size(size: int) -> float:
    """Default ``blur`` for a filter size: 0.3 up to k=3, 0.06 from k=9, linear in between."""
    (k0, b0), (k1, b1) = SMALL_DEFAULTS, LARGE_DEFAULTS
    t = min(max((size - k0) / (k1 - k0), 0.0), 1.0)
    return round(b0 + t * (b1 - b0), 4)


def weight_bits(size: int, blur: float) -> int:
    """Bits of the filter grid: the finest (at most 16) for which 255 x (the largest possible sum
    of one filter's integer entries) stays below 2**24, so 8-bit convolutions are exact in float32."""
    for bits in range(16, 0, -1):
        one = 1 << bits
        if 255 * (one + (size * size - 1) * round(blur * one)) < _EXACT:
            return bits
    raise ConfigError(f"cuda: a {size}x{size} filter is too large for exact arithmetic")


def draw_filters(gen: torch.Generator, num_classes: int, size: int, blur: float) -> torch.Tensor:
    """``num_classes x size x size`` filters: entries in [0, blur), one random entry set to 1, all
    on the grid of ``2 ** -weight_bits(size, blur)`` (exact in float32)."""
    scale = float(1 << weight_bits(size, blur))
    raw = torch.rand(num_classes, size * size, generator=gen, dtype=torch.float32) * blur
    filters = raw.mul_(scale).round_().div_(scale)
    peak = torch.randint(0, size * size, (num_classes,), generator=gen)
    filters[torch.arange(num_classes), peak] = 1.0
    return filters.view(num_classes, size, size)


def _index_map(idx: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    if mode == "reflect":
        idx = idx.abs()
        return torch.where(idx >= n, 2 * (n - 1) - idx, idx)
    return idx.clamp(0, n - 1)  # replicate


def _padded(v: torch.Tensor, r0: int, r1: int, r: int, mode: str) -> torch.Tensor:
    """Rows ``r0 - r .. r1 + r`` of ``v`` (N x C x H x W, any dtype) with ``r`` padded columns on each
    side, as float32: the input of a 'valid' convolution giving rows ``r0 .. r1``."""
    n, c, h, w = v.shape
    if mode == "zero":
        lo, hi = max(0, r0 - r), min(h, r1 + r)
        top = lo - (r0 - r)
        # one copy does the dtype change, the layout change (to N x C x H x W) and the padding
        out = torch.zeros(n, c, r1 - r0 + 2 * r, w + 2 * r, device=v.device)
        out[:, :, top:top + hi - lo, r:r + w].copy_(v[:, :, lo:hi])
        return out
    rows = _index_map(torch.arange(r0 - r, r1 + r, device=v.device), h, mode)
    cols = _index_map(torch.arange(-r, w + r, device=v.device), w, mode)
    return v.index_select(2, rows).index_select(3, cols).float()


@contextlib.contextmanager
def _ieee_onednn() -> Iterator[None]:
    """Keep oneDNN convolutions in full float32 even if the caller allowed bf16/TF32 for speed
    (``torch.backends.mkldnn.conv.fp32_precision``); exactness needs IEEE products."""
    conv = getattr(torch.backends.mkldnn, "conv", None)
    old = getattr(conv, "fp32_precision", "none")
    if conv is None or old in ("none", "ieee"):
        yield
        return
    conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision = old


def _depthwise(x: torch.Tensor, planes: torch.Tensor, dilation: int = 1) -> torch.Tensor:
    """'valid' depthwise convolution of ``x`` (N x P x H x W) with one ``k x k`` filter per plane
    (``planes``: P x k x k), taps ``dilation`` pixels apart. The kernel is free to sum in any order:
    the sums are exact."""
    k = planes.shape[-1]
    w = planes.to(x.device, torch.float32).view(-1, 1, k, k)
    if x.device.type == "cuda":
        # cuDNN may pick transform-based algorithms or TF32: use the direct native kernel.
        with torch.backends.cudnn.flags(enabled=False):
            return F.conv2d(x, w, groups=x.shape[1], dilation=dilation)
    with _ieee_onednn():
        return F.conv2d(x, w, groups=x.shape[1], dilation=dilation)


def _conv8(v: torch.Tensor, filters: torch.Tensor, r0: int, r1: int, mode: str, dilation: int = 1) -> torch.Tensor:
    """Rows ``r0 .. r1`` of image ``i`` of the 8-bit-valued ``v`` (N x C x H x W) convolved with the
    integer ``filters[i]`` (N x k x k), taps ``dilation`` apart: exact integer sums in float32
    (see module doc)."""
    n, c = v.shape[:2]
    x = _padded(v, r0, r1, dilation * (filters.shape[-1] // 2), mode)
    if n == 1:  # one (large) image: channels-last is what oneDNN runs fast
        return _depthwise(x.contiguous(memory_format=torch.channels_last), filters.expand(c, -1, -1), dilation)
    # a batch of small images: every plane of every image is one group of a single convolution
    out = _depthwise(x.reshape(1, n * c, *x.shape[2:]), filters.repeat_interleave(c, dim=0), dilation)
    return out.view(n, c, r1 - r0, v.shape[-1])


def _sums(v: torch.Tensor, filters: torch.Tensor, r0: int, r1: int, mode: str, levels: int,
          dilation: int = 1) -> torch.Tensor:
    """Exact weighted sums for rows ``r0 .. r1``: float32 for 8-bit values, float64 for 16-bit ones
    (each 8-bit half convolved exactly, then recombined)."""
    if levels <= 255:
        return _conv8(v, filters, r0, r1, mode, dilation)
    hi = torch.div(v, 256, rounding_mode="floor")
    lo = v - hi * 256
    return (_conv8(hi, filters, r0, r1, mode, dilation).double().mul_(256)
            .add_(_conv8(lo, filters, r0, r1, mode, dilation).double()))


def _strips(h: int, w: int, c: int) -> list[tuple[int, int]]:
    rows = max(1, STRIP_VALUES // max(1, w * c))
    return [(r0, min(h, r0 + rows)) for r0 in range(0, h, rows)]


def _normalised(a: torch.Tensor, peak: torch.Tensor, top: torch.Tensor | None = None) -> torch.Tensor:
    """``a / peak`` as one IEEE division per value (float32 for 8-bit sums, float64 for 16-bit ones),
    returned in float32; ``a`` and ``peak`` are exact. With ``top`` (float64, per image: 1 for
    ``"peak"``, the input's maximum in [0, 1] for ``"input"``): ``float32(float64(a / peak) * top)``,
    computed in place when ``a`` is already float64 (callers pass sums they no longer need)."""
    if top is None:
        return a.div(peak) if a.dtype == torch.float32 else a.div(peak).float()
    return a.double().div_(peak.double()).mul_(top).float()


def _rescale_tops(v: torch.Tensor, levels: int, rescale: str) -> torch.Tensor | None:
    """Per image (``N x 1 x 1 x 1`` float64) the value the convolved maximum maps to: 1 for
    ``"peak"``, ``float32(max(v) / levels)`` for ``"input"``; ``None`` when every image is ``"peak"``.
    ``"auto"``: ``"peak"`` for images whose values lie on the 8-bit grid, ``"input"`` for the others."""
    if rescale == "peak" or (rescale == "auto" and levels == 255):
        return None
    n = v.shape[0]
    inmax = v.reshape(n, -1).amax(1)
    top = inmax.float().div(levels).double()  # float32 division: the maximum apply() sees
    if rescale == "auto":
        ints = v.reshape(n, -1).to(torch.int32) * 255  # a copy; below 2**24, exact in int32
        deep = ints.remainder_(levels).ne_(0).any(1)
        if not bool(deep.any()):
            return None
        top = torch.where(deep, top, torch.ones_like(top))
    return top.view(n, 1, 1, 1)


def _padding_for(mode: str, h: int, w: int, r: int) -> str:
    if mode == "reflect" and (h <= r or w <= r):
        return "replicate"  # reflection needs more pixels than the radius
    return mode


def _image_levels(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Integer values of float images in [0, 1]: on the first grid ``2**b - 1`` of :data:`_GRIDS`
    (8-bit first, then 16-bit, 12-bit, ...) every value lies on, as ``v / levels`` for any ``levels``
    up to 16 bits does; else (a batch mixing depths, or arbitrary floats) the 16-bit grid."""
    for levels in _GRIDS:
        v = x.mul(levels).round_()
        if torch.equal(v.div(levels), x):
            return v, levels
    return x.clamp(0, 1).mul(65535).round_(), 65535


def integer_filters(filters: torch.Tensor) -> torch.Tensor:
    """``filters`` (non-negative) scaled to integers on the finest ``2**-bits`` grid (at most 16 bits)
    for which 255 x every filter's sum stays below 2**24. Filters drawn on a coarser grid
    (:func:`draw_filters`) are only scaled, not rounded, so results do not change."""
    f = filters.float().clamp_min(0)
    for bits in range(16, -1, -1):
        ints = f.mul(1 << bits).round_()
        if bool((ints.flatten(1).sum(1) * 255 < _EXACT).all()):
            return ints
    raise ConfigError("cuda: filter sums are too large for exact arithmetic")


def check_rescale(rescale: str) -> str:
    """``rescale`` if it is one of :data:`RESCALES`, else ConfigError."""
    if rescale not in RESCALES:
        raise ConfigError(f"cuda: rescale must be one of {', '.join(RESCALES)}, got {rescale!r}")
    return rescale


def convolve_normalise(x: torch.Tensor, filters: torch.Tensor, padding: str = "zero",
                       rescale: str = "peak") -> torch.Tensor:
    """Depthwise-convolve image ``i`` with ``filters[i]`` and divide by its global maximum.

    Args:
        x: ``N x C x H x W`` float images in [0, 1] (taken on the coarsest ``2**b - 1`` grid, b <= 16,
            their values lie on, else at 16-bit precision).
        filters: ``N x k x k`` non-negative filters, ``k`` odd; exact on a ``2**-bits`` grid
            (:func:`draw_filters`), others are rounded to the finest exact grid.
        padding: ``"reflect"``, ``"replicate"`` or ``"zero"``.
        rescale: ``"peak"`` (the paper's), ``"input"`` or ``"auto"`` (see module doc).
    Returns:
        ``N x C x H x W`` float32 in [0, 1]; with ``"peak"`` each image's maximum is 1 unless it was
        all zero, with ``"input"`` it is the input image's maximum.
    """
    v, levels = _image_levels(x)
    return _protect(v, integer_filters(filters), padding, levels, quantise=False, rescale=check_rescale(rescale))


def dilation_for(h: int, w: int, reference: int | None) -> int:
    """Tap spacing of the filter for an ``h x w`` image: ``round(min(h, w) / reference)`` (at least 1),
    so that after the attacker's downscale to ``reference`` px the filter is the paper's (module doc);
    1 without a reference."""
    if reference is None:
        return 1
    return max(1, int(min(h, w) / reference + 0.5))


def _protect(v: torch.Tensor, filters: torch.Tensor, padding: str, levels: int, quantise: bool,
             dtype: torch.dtype | None = None, rescale: str = "peak", reference: int | None = None) -> torch.Tensor:
    """Image ``i`` of ``v`` convolved with the integer ``filters[i]`` (dilated for ``reference``),
    divided by its maximum and (``rescale``, module doc) multiplied by the input's maximum; quantised
    to ``levels`` in ``dtype`` when ``quantise``, else float32 in [0, 1]."""
    n, c, h, w = v.shape
    dil = dilation_for(h, w, reference)
    mode = _padding_for(padding, h, w, dil * (filters.shape[-1] // 2))

    def finish(y: torch.Tensor) -> torch.Tensor:
        return quantise_levels(y, levels, dtype or v.dtype) if quantise else y

    if c * h * w <= STRIP_VALUES:
        tops = _rescale_tops(v, levels, rescale)
        a = _sums(v, filters, 0, h, mode, levels, dil)
        return finish(_normalised(a, a.amax(dim=(1, 2, 3), keepdim=True).clamp_min_(1.0), tops))
    # Large images: one at a time, strip by strip; the exact sums are the only full-size float copy.
    out = torch.empty(v.shape, dtype=dtype if quantise else torch.float32, device=v.device)
    for i in range(n):
        a = torch.empty(1, c, h, w, dtype=torch.float32 if levels <= 255 else torch.float64, device=v.device)
        for r0, r1 in _strips(h, w, c):
            a[:, :, r0:r1] = _sums(v[i:i + 1], filters[i:i + 1], r0, r1, mode, levels, dil)
        peak = a.amax().clamp_min(1.0)  # all-zero images stay zero
        top = _rescale_tops(v[i:i + 1], levels, rescale)
        for r0, r1 in _strips(h, w, c):
            out[i:i + 1, :, r0:r1] = finish(_normalised(a[:, :, r0:r1], peak, top))
        del a
    return out


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
        clusters: label-agnostic CUDA (no published method has it): ``K`` keyed filters assigned
            per surrogate feature cluster instead of per class (keyed K-means as in Unlearnable
            Clusters, :mod:`perturbations.clustered`), so folders without labels can be protected.
        surrogate, surrogate_weights: the feature extractor for ``clusters`` and an optional local
            weights file; default: ``clip:RN50/openai`` where its weights are local, else the bundled
            ``cifar-resnet20`` (:func:`~perturbations.surrogates.default_surrogate`, filled in by
            :meth:`resolve_params`; ``surrogate_choice`` says which and why). Fewer images than
            clusters give one cluster per image (``clusters_used`` in the state and fit report).
        rescale: ``"auto"`` (default: the paper's ``"peak"`` for 8-bit images, ``"input"`` for deeper
            ones), ``"peak"`` (divide by the image's maximum: its maximum becomes the top of the grid)
            or ``"input"`` (the output keeps the input image's maximum and range); see module doc.
        reference: the attacker's resolution (shorter side, px) the filter is defined at: each image's
            filter taps are ``round(min(h, w) / reference)`` pixels apart, so that after a downscale to
            ``reference`` px the attacker sees the paper's ``k x k`` filter (module doc, "Resolution");
            ``filter_size``/``blur`` then default to the paper's setting for ``reference``.
            ``None`` (default): the filter acts at the image's own pixels, as in the paper.

    Shapes: ``apply`` takes ``N x C x H x W`` float in [0, 1] and returns the same; labels ``(N,)``.
    """

    name = "cuda"
    summary = "class-wise keyed blur filters; model-free, fast, any image size (needs labels)"
    breakers = ("coin", "rskff")
    breakers_source = ("COIN (Li et al., Detecting and Corrupting Convolution-based Unlearnable Examples, AAAI 2025) "
                       "and RSK+FF (Kim & Sandoval-Segura, Learning From Convolution-based Unlearnable Datasets, "
                       "2024), both published against CUDA; on CUDA CIFAR-10 they recover 52.4% and 52.5% against "
                       "44.2% for the old default grid's best (docs/BENCHMARKS.md)")
    paper = "Sadasivan et al., CUDA: Convolution-based Unlearnable Datasets, CVPR 2023"
    needs_labels = True
    exact = True
    work_bytes_per_value = 4.5  # the float32 sums of one image, plus a strip
    per_image_state = TABLE_KEYS
    companion_params = {"surrogate": "clusters", "surrogate_weights": "clusters"}
    labels_note = "not with --clusters K: label-agnostic CUDA, one filter per surrogate cluster, 2 images at least"
    measured = (
        {"setting": "defaults", "data": "CIFAR-10 train, 50,000 images, 32x32, 2-core CPU", "psnr_db": 19.4,
         "images_per_second": 2885.0, "source": "docs/BENCHMARKS.md: Throughput and memory"},
        {"setting": "defaults", "data": "16 photos of 24 MP (6000x4000 PNG), 2-core CPU", "psnr_db": 36.0,
         "images_per_second": 0.13, "source": "docs/BENCHMARKS.md: Throughput and memory"},
        {"setting": "--clusters 10 --surrogate cifar-resnet20", "data": "CIFAR-10 train, 50,000 images, 32x32, "
         "quiet 2-core CPU", "psnr_db": 19.4, "images_per_second": 431.0,
         "source": "docs/BENCHMARKS.md: Label-agnostic protection"},
    )

    def __init__(
        self,
        keyring: Keyring,
        num_classes: int | None = None,
        filter_size: int | None = None,
        blur: float | None = None,
        padding: str = "zero",
        mix: float = 1.0,
        universal: bool = False,
        clusters: int | None = None,
        surrogate: str | None = None,
        surrogate_weights: str | None = None,
        rescale: str = "auto",
        reference: int | None = None,
    ) -> None:
        super().__init__(keyring)
        if reference is not None and (int(reference) != reference or not 8 <= int(reference) <= 4096):
            raise ConfigError(f"cuda: reference must be a resolution in pixels from 8 to 4096, got {reference}")
        #: Resolution (px, shorter side) the filter is defined at; ``None``: at the image's own size.
        self.reference = None if reference is None else int(reference)
        self.rescale = check_rescale(rescale)
        if padding == "faithful":
            padding = "zero"
        if padding not in PADDINGS:
            raise ConfigError(f"cuda: padding must be one of {', '.join(PADDINGS)} or faithful, got '{padding}'")
        if filter_size is not None and (int(filter_size) != filter_size or filter_size < 1 or filter_size % 2 == 0):
            raise ConfigError(f"cuda: filter size must be an odd integer >= 1, got {filter_size}")
        if filter_size is not None and filter_size > 63:
            raise ConfigError(f"cuda: filter size must be at most 63, got {filter_size}")
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
        if clusters is None and (surrogate is not None or surrogate_weights is not None):
            raise ConfigError("cuda: --surrogate is only used with --clusters K (label-agnostic CUDA)")
        self.clusters = None if clusters is None else SurrogateClusters(
            keyring, clusters, surrogate, surrogate_weights, "cuda")
        #: With ``clusters``: one line, which surrogate and why; else None.
        self.surrogate_choice = None if self.clusters is None else self.clusters.surrogate_choice
        if self.clusters is not None:
            if num_classes is not None and int(num_classes) != self.clusters.k:
                raise ConfigError("cuda: with --clusters the filters follow the clusters; do not give num_classes")
            self.num_classes = self.clusters.k
        self.needs_labels = self.clusters is None  # type: ignore[misc]
        self.filters: torch.Tensor | None = None
        self.bits: int | None = None
        self._on_device: dict[torch.device, torch.Tensor] = {}

    # -- fitting ---------------------------------------------------------------------------
    def _resolve(self, side: int) -> None:
        k = defaults_for_side(side if self.reference is None else self.reference)[0]
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
        self.bits = weight_bits(self.filter_size, self.blur)
        self._on_device.clear()
        self.fitted = True

    def fit(self, data: FitData) -> "CUDA":
        super().fit(data)
        if self.clusters is not None:
            feats, where, _, _ = self.clusters.features(data)
            self.clusters.cluster(feats, where, list(data.ids))
            self.clusters.release()
        elif self.num_classes is None:
            self.num_classes = data.num_classes
        elif data.num_classes > self.num_classes:
            raise ConfigError(f"cuda: data has {data.num_classes} classes, method built for {self.num_classes}")
        sides = [min(h, w) for h, w in data.sizes]
        self._resolve(int(statistics.median(sides)) if sides else 32)
        self._draw()
        return self

    def extend(self, data: FitData) -> bool:
        return self.clusters.extend(data) if self.clusters is not None else False

    def fit_report(self) -> dict[str, Any]:
        return self.clusters.report() if self.clusters is not None else {}

    def notes(self) -> list[str]:
        return self.clusters.notes() if self.clusters is not None else []

    @classmethod
    def weights_info(cls) -> dict[str, Any]:
        from .surrogates import default_surrogate_info

        with_clusters = default_surrogate_info()
        return {"needs": f"none; with --clusters K, {with_clusters['needs']}", "spec": None, "present": None,
                "bundled": False, "with_clusters": with_clusters}

    @classmethod
    def resolve_params(cls, given: dict[str, Any]) -> dict[str, Any]:
        """As the base class's; with ``clusters``, the default surrogate made concrete."""
        params = super().resolve_params(given)
        if params.get("clusters") is not None and params.get("surrogate") is None:
            from .surrogates import default_surrogate

            params["surrogate"] = default_surrogate(params.get("surrogate_weights"))[0]
        return params

    # -- protecting ------------------------------------------------------------------------
    def _cluster_labels(self, ids: Sequence[str] | None, n: int) -> torch.Tensor:
        assert self.clusters is not None
        if self.filters is None:
            raise ConfigError("cuda: call fit() first (or load a fitted state)")
        if ids is None or len(ids) != n:
            raise ConfigError("cuda: with clusters, apply needs one id (relative path) per image")
        try:
            return self.clusters.table.clusters_of(ids, "cuda")
        except ConfigError as exc:
            raise InputError(f"{exc}; rerun the command to assign it") from None

    def _ready(self, x: torch.Tensor, labels: torch.Tensor | None,
               ids: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked labels on ``x``'s device and the integer filters there (``x`` may be integer);
        with clusters the labels are the images' clusters."""
        if self.clusters is not None:
            labels = self._cluster_labels(ids, x.shape[0])
        self._check_batch(x if x.is_floating_point() else torch.empty(x.shape, device="meta"), labels)
        assert labels is not None
        if self.filters is None:
            if self.num_classes is None:
                raise ConfigError("cuda: call fit() first or give num_classes")
            self._resolve(min(x.shape[-2:]))
            self._draw()
        assert self.filters is not None and self.bits is not None
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.filters.shape[0]):
            raise ConfigError(f"cuda: labels must be in [0, {self.filters.shape[0]}), got {labels.tolist()}")
        weights = self._on_device.get(x.device)
        if weights is None:
            weights = self._on_device.setdefault(x.device, integer_filters(self.filters).to(x.device))
        return labels.to(x.device), weights

    def _chosen(self, ids: Sequence[str] | None, n: int) -> list[bool] | None:
        """Which images ``mix`` protects (None: all)."""
        if self.mix >= 1.0:
            return None
        if ids is None or len(ids) != n:
            raise ConfigError("cuda: mix < 1 needs one id per image")
        return self.is_protected(ids)

    def _run(self, v: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, ids: Sequence[str] | None,
             levels: int, passthrough: torch.Tensor, quantise: bool, dtype: torch.dtype | None) -> torch.Tensor:
        chosen = self._chosen(ids, v.shape[0])
        if chosen is None:
            return _protect(v, weights[labels], self.padding, levels, quantise, dtype, self.rescale, self.reference)
        out = passthrough.clone()
        pick = torch.tensor(chosen, device=v.device)
        if pick.any():
            out[pick] = _protect(v[pick], weights[labels[pick]], self.padding, levels, quantise, dtype, self.rescale,
                                 self.reference)
        return out

    def apply(
        self, x: torch.Tensor, labels: torch.Tensor | None = None, ids: Sequence[str] | None = None
    ) -> torch.Tensor:
        labels, weights = self._ready(x, labels, ids)
        v, levels = _image_levels(x)
        return self._run(v, labels, weights, ids, levels, x, quantise=False, dtype=None)

    def protect_levels(
        self, v: torch.Tensor, labels: torch.Tensor | None = None, ids: Sequence[str] | None = None,
        levels: int = 255,
    ) -> torch.Tensor:
        """Exact integer path (see module doc); equals ``round(apply(v / levels) * levels)``."""
        if v.is_floating_point():
            raise ConfigError("cuda: protect_levels takes integer pixels")
        labels, weights = self._ready(v, labels, ids)
        return self._run(v, labels, weights, ids, levels, v, quantise=True, dtype=v.dtype)

    def is_protected(self, ids: Sequence[str]) -> list[bool]:
        """Which of these image ids ``mix`` selects for protection."""
        return [self.mix >= 1.0 or self.keyring.unit("cuda/mix", i) < self.mix for i in ids]

    # -- state -----------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        extra = self.clusters.params() if self.clusters is not None else {}
        return {**extra,
            "num_classes": self.num_classes,
            "filter_size": self.filter_size,
            "blur": self.blur,
            "padding": self.padding,
            "mix": self.mix,
            "universal": self.universal,
            "rescale": self.rescale,
            "rescale_rule": "8-bit images: peak; deeper ones: input (keep their maximum)"
            if self.rescale == "auto" else "given",
            "reference": self.reference,
            "size_rule": ("auto (" + ("" if self.reference is None else f"at the reference {self.reference}px: ")
                          + f"shorter side < {LARGE_IMAGE_SIDE}px: k=3, blur=0.3; else k=9, blur=0.06)"
                          + ("" if self.reference is None else "; taps round(shorter side / reference) px apart"))
            if self.auto
            else ("given" if self.reference is None else "given; taps round(shorter side / reference) px apart"),
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.filters is None:
            return {}
        extra = self.clusters.state_dict() if self.clusters is not None else {}
        return {**extra, "filters": self.filters.clone(), "blur": torch.tensor(float(self.blur or 0.0), dtype=torch.float64),
                "bits": torch.tensor(int(self.bits or 0))}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        filters, blur, bits = state.get("filters"), state.get("blur"), state.get("bits")
        if filters is None or filters.ndim != 3 or filters.shape[-1] != filters.shape[-2] or filters.shape[-1] % 2 == 0:
            raise ConfigError("cuda: saved state has no valid 'filters' tensor")
        if blur is None or bits is None:
            raise ConfigError("cuda: saved state is from an older version (no exact filter grid); "
                              "protect the folder again with --overwrite")
        filters = filters.to(torch.float32).clone()
        k, b, nbits = filters.shape[-1], float(blur), int(bits)
        ints = filters * (1 << nbits)
        if not (0.0 < b <= 1.0) or nbits != weight_bits(k, b) or not torch.equal(ints, ints.round()) \
                or bool((ints.flatten(1).sum(1) * 255 >= _EXACT).any()):
            raise ConfigError("cuda: saved state holds filters that are not on their exact grid")
        if self.clusters is not None:
            if filters.shape[0] != self.clusters.k:
                raise ConfigError(f"cuda: saved state has {filters.shape[0]} filters for {self.clusters.k} clusters")
            self.clusters.load_state_dict(state)
        self.filters, self.bits, self.blur = filters, nbits, b
        self.num_classes, self.filter_size = filters.shape[0], k
        self._on_device.clear()
        self.fitted = True
