"""Training-time defenses: transforms an attacker applies to protected data to learn from it anyway.

Every defense maps ``(x, y) -> (x, y)`` with ``x`` an N x C x H x W float batch in [0, 1] (C = 1 or 3)
and ``y`` N x K soft labels. ``static`` defenses are deterministic per image and are applied once to the
whole training set; the others are random and applied per batch at every step. All randomness comes from
the ``generator`` argument (a CPU ``torch.Generator``): parameters are drawn on the CPU and moved to
``x.device``, so a seed gives the same transform on any device.

>>> from verify import defenses
>>> defenses.available()[:3]
['bdr', 'blur', 'coin']
>>> x, y = defenses.get("cutmix")(x, y, generator=torch.Generator().manual_seed(1))
"""

from __future__ import annotations

import io
import math
import re
from typing import ClassVar

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from kornia.contrib import diamond_square
from PIL import Image
from torch import Tensor

from perturbations.errors import ConfigError, InputError
from perturbations.registry import Registry

__all__ = ["Defense", "available", "get", "parse_list", "register"]

_DEFENSES: Registry[type[Defense]] = Registry("defense")


def register(cls: type[Defense]) -> type[Defense]:
    """Class decorator: add a defense to the registry under ``cls.name``."""
    return _DEFENSES.register(cls)


def available() -> list[str]:
    """Names of every registered defense, sorted (includes ``"none"``)."""
    return _DEFENSES.names()


#: ``jpegQ``: a JPEG round trip at quality Q (1-95): ``jpeg10`` is ISS's breaker, ``jpeg75`` /
#: ``jpeg90`` what a platform does to a published photo.
_JPEG_NAME = re.compile(r"jpeg(\d{1,2})")


def _jpeg_quality(name: str) -> int | None:
    """Q of a ``jpegQ`` name (Q in 1..95), else None."""
    m = _JPEG_NAME.fullmatch(name)
    return int(m.group(1)) if m and 1 <= int(m.group(1)) <= 95 else None


def get(name: str, **kwargs: object) -> Defense:
    """An instance of the defense registered as ``name``, built with ``kwargs``; ``jpegQ`` is the
    JPEG round trip at quality Q (1-95)."""
    quality = _jpeg_quality(name)
    if quality is not None and name not in _DEFENSES:
        return Jpeg(quality=quality, **kwargs)  # type: ignore[arg-type]
    cls = _DEFENSES.lookup(name)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"bad parameters for defense '{name}': {err}") from None


def parse_list(spec: str) -> list[str]:
    """``"none,grayscale, jpeg10"`` -> ``["none", "grayscale", "jpeg10"]`` (validated, duplicates dropped)."""
    names = [part.strip() for part in spec.split(",")]
    if not any(names):
        raise ConfigError(f"empty defense list {spec!r}; available: {', '.join(available())}")
    out: list[str] = []
    for name in names:
        if not name:
            raise ConfigError(f"empty entry in defense list {spec!r}")
        if name not in _DEFENSES and _jpeg_quality(name) is None:
            raise ConfigError(f"unknown defense '{name}'; available: {', '.join(available())} "
                              "(and jpegQ for a JPEG round trip at any quality Q in 1..95, e.g. jpeg75)")
        if name not in out:
            out.append(name)
    return out


class Defense:
    """Base class. Subclasses set ``name``, ``source``, ``static`` and implement ``_apply``."""

    name: ClassVar[str] = ""
    source: ClassVar[str] = ""
    static: ClassVar[bool] = True
    #: Apply to the whole images before the training loop's random crop and flip (the reference's
    #: order, RSK+FF), instead of to the cropped batch. Random defenses only.
    before_crop: ClassVar[bool] = False
    #: What still differs from the published reference, one plain sentence each (empty: it matches);
    #: the certificate lists them.
    differences: ClassVar[tuple[str, ...]] = ()

    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """x: N x C x H x W in [0,1] (C = 1 or 3); y: N x K soft labels. Returns transformed (x, y)."""
        if x.dim() != 4 or x.shape[1] not in (1, 3) or not x.is_floating_point():
            raise InputError(f"defense '{self.name}' expects a float N x C x H x W batch with C in (1, 3), got {tuple(x.shape)}")
        if y.dim() != 2 or y.shape[0] != x.shape[0]:
            raise InputError(f"defense '{self.name}' expects N x K labels for N = {x.shape[0]}, got {tuple(y.shape)}")
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        xo, yo = self._apply(x, y, generator)
        return xo.to(x.dtype).clamp_(0, 1), yo

    def _apply(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


def _rand(g: torch.Generator, *shape: int, like: Tensor) -> Tensor:
    """Uniform [0,1) draws on the CPU from ``g``, moved to ``like``'s device and dtype."""
    return torch.rand(shape, generator=g).to(device=like.device, dtype=like.dtype)


def _luma(x: Tensor) -> Tensor:
    """N x 1 x H x W luminance (ITU-R 601 weights via kornia); identity for one channel."""
    return kornia.color.rgb_to_grayscale(x) if x.shape[1] == 3 else x


def _box_mask(n: int, h: int, w: int, bh: Tensor, bw: Tensor, g: torch.Generator) -> Tensor:
    """N x 1 x H x W bool mask of one box per image, centre uniform on the image, clipped at borders."""
    cy = torch.randint(0, h, (n,), generator=g)
    cx = torch.randint(0, w, (n,), generator=g)
    y1, x1 = (cy - bh // 2).clamp(0, h), (cx - bw // 2).clamp(0, w)
    y2, x2 = (cy - bh // 2 + bh).clamp(0, h), (cx - bw // 2 + bw).clamp(0, w)
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    inside = (rows >= y1.view(n, 1, 1)) & (rows < y2.view(n, 1, 1)) & (cols >= x1.view(n, 1, 1)) & (cols < x2.view(n, 1, 1))
    return inside.unsqueeze(1)


@register
class NoDefense(Defense):
    """Identity: plain training on the protected data."""

    name, source, static = "none", "no defense (standard training)", True

    def _apply(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        return x.clone(), y


@register
class Grayscale(Defense):
    """ISS grayscale: luminance replicated to C channels (input stays C-channel); identity for C = 1."""

    name, static = "grayscale", True
    differences = ("the reference converts the 8-bit PIL image (torchvision Grayscale), so its luminance is rounded "
                   "to 8 bits; here it stays float",)
    source = "Liu et al., Image Shortcut Squeezing: Countering Perturbative Availability Poisons with Compression, ICML 2023"

    def _apply(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        return _luma(x).expand_as(x).contiguous(), y


@register
class Jpeg(Defense):
    """JPEG: a real Pillow encode/decode round trip at ``quality`` (Pillow's default 4:2:0 chroma
    subsampling for colour); C = 1 as mode L. Registered as ``jpeg10`` (ISS's breaker, quality 10);
    ``jpegQ`` names any other quality (``jpeg75``, ``jpeg90``: what platforms do to published photos)."""

    name, static = "jpeg10", True
    source = "Liu et al., Image Shortcut Squeezing: Countering Perturbative Availability Poisons with Compression, ICML 2023"

    def __init__(self, quality: int = 10) -> None:
        if not 1 <= int(quality) <= 95:
            raise ConfigError(f"JPEG quality must be in 1..95, got {quality}")
        self.quality = int(quality)
        if self.quality != 10:  # its own name (cell keys and the certificate tell the qualities apart)
            self.name = f"jpeg{self.quality}"
            self.source = ("JPEG re-encoding at a publishing quality, as platforms do to uploaded photos; "
                           "quality 10 is ISS's breaker (Liu et al., ICML 2023)")

    def _apply(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        arr = (x.detach() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out = np.empty_like(arr)
        for i, img in enumerate(arr):
            pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)  # mode L or RGB
            buf = io.BytesIO()
            pil.save(buf, format="JPEG", quality=self.quality)
            buf.seek(0)
            out[i] = np.asarray(Image.open(buf)).reshape(img.shape)
        return torch.from_numpy(out).permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype) / 255, y


@register
class Blur(Defense):
    """Gaussian blur, 3 x 3 kernel, sigma 1.0 (reflect borders; kornia), applied once before the crop."""

    name, static = "blur", True
    differences = (
        "ISS's code blurs with sigma 0.1 (torchvision GaussianBlur(3, sigma=0.1), nearly the identity); the default "
        "here is sigma 1.0",
        "the reference blurs the 8-bit PIL image, so its result is rounded to 8 bits; here it stays float",
    )
    source = "Gaussian smoothing baseline, as evaluated in Liu et al., ICML 2023 (ISS) and APBench (Qin et al., 2023)"

    def __init__(self, sigma: float = 1.0, kernel_size: int = 3) -> None:
        if sigma <= 0 or kernel_size < 3 or kernel_size % 2 == 0:
            raise ConfigError(f"blur needs sigma > 0 and an odd kernel_size >= 3, got {sigma}, {kernel_size}")
        self.sigma, self.kernel_size = float(sigma), int(kernel_size)

    def _apply(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        k, s = self.kernel_size, self.sigma
        return kornia.filters.gaussian_blur2d(x, (k, k), (s, s), border_type="reflect"), y


@register
class BitDepthReduction(Defense):
    """Bit-depth reduction to ``bits`` (default 2) per channel, as ISS posterises (torchvision
    ``RandomPosterize(bits, p=1)`` on the PIL image): the input is rounded to 8 bits, ``v = round(255 x)``,
    and only the top ``bits`` bits are kept, ``(v >> (8 - bits)) << (8 - bits)``, exactly PIL's
    ``ImageOps.posterize`` (truncation: 2 bits give the levels 0, 64, 128 and 192 of 255, the top one is not 255)."""

    name, static = "bdr", True
    source = "Xu et al., Feature Squeezing, NDSS 2018; used against availability poisons by Liu et al., ICML 2023 (ISS)"

    def __init__(self, bits: int = 2) -> None:
        if not 1 <= int(bits) <= 7:
            raise ConfigError(f"bdr bits must be in 1..7, got {bits}")
        self.bits = int(bits)

    def _apply(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        step = 2.0 ** (8 - self.bits)
        return torch.floor((x * 255).round() / step) * step / 255, y


@register
class Cutout(Defense):
    """Cutout: one square of side ``length`` (default min(H, W) // 2) zeroed per image, centre uniform, clipped."""

    name, static = "cutout", False
    differences = ("DeVries & Taylor's code cuts after normalising, so their box holds the dataset's mean colour; here "
                   "it is black (0), as in ISS's use of Cutout",)
    source = "DeVries & Taylor, Improved Regularization of Convolutional Neural Networks with Cutout, arXiv 2017"

    def __init__(self, length: int | None = None) -> None:
        self.length = length

    def _apply(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        n, _, h, w = x.shape
        side = torch.full((n,), self.length or min(h, w) // 2)
        mask = _box_mask(n, h, w, side, side, g).to(x.device)
        return x.masked_fill(mask, 0.0), y


@register
class CutMix(Defense):
    """CutMix with a shuffled batch; lambda ~ Beta(1, 1) drawn per image (one box per image), labels mixed by the
    pasted area actually kept after clipping."""

    name, static = "cutmix", False
    differences = ("the reference draws one lambda and one box per batch and mixes a batch only with probability "
                   "cutmix_prob (0.5 in its CIFAR runs); here every batch is mixed, with a lambda and a box per image",)
    source = "Yun et al., CutMix: Regularization Strategy to Train Strong Classifiers with Localizable Features, ICCV 2019"

    def _apply(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        n, _, h, w = x.shape
        perm = torch.randperm(n, generator=g)
        lam = torch.rand(n, generator=g)  # Beta(1, 1) = U(0, 1)
        cut = torch.sqrt(1 - lam)
        mask = _box_mask(n, h, w, (cut * h).long(), (cut * w).long(), g)
        keep = 1 - mask.flatten(1).float().mean(1)  # fraction of the own image that stays
        mask, keep, perm = mask.to(x.device), keep.to(device=y.device, dtype=y.dtype), perm.to(x.device)
        xo = torch.where(mask, x[perm], x)
        yo = keep[:, None] * y + (1 - keep[:, None]) * y[perm.to(y.device)]
        return xo, yo


@register
class Mixup(Defense):
    """Mixup with a shuffled batch; lambda ~ Beta(1, 1) drawn per image; x and y mixed alike."""

    name, static = "mixup", False
    differences = ("the reference draws one lambda per batch; here one per image",)
    source = "Zhang et al., mixup: Beyond Empirical Risk Minimization, ICLR 2018"

    def _apply(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        perm = torch.randperm(n, generator=g)
        lam = torch.rand(n, generator=g)  # Beta(1, 1) = U(0, 1)
        lx = lam.to(device=x.device, dtype=x.dtype).view(n, 1, 1, 1)
        ly = lam.to(device=y.device, dtype=y.dtype).view(n, 1)
        return lx * x + (1 - lx) * x[perm.to(x.device)], ly * y + (1 - ly) * y[perm.to(y.device)]


def _affine_warp(x: Tensor, angle: Tensor, shear: Tensor, trans: Tensor) -> Tensor:
    """Rotate (degrees), shear (factors, N x 2) and translate (fractions of W, H; N x 2) about the centre."""
    n, _, h, w = x.shape
    rad = torch.deg2rad(angle)
    cos, sin = torch.cos(rad), torch.sin(rad)
    rot = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    one = torch.ones_like(angle)
    shr = torch.stack([torch.stack([one, shear[:, 0]], 1), torch.stack([shear[:, 1], one], 1)], 1)
    a = rot @ shr
    centre = torch.tensor([(w - 1) / 2, (h - 1) / 2], dtype=x.dtype, device=x.device).expand(n, 2)
    t = trans * torch.tensor([w, h], dtype=x.dtype, device=x.device) + centre - (a @ centre.unsqueeze(-1)).squeeze(-1)
    m = torch.cat([a, t.unsqueeze(-1)], 2)
    return kornia.geometry.transform.warp_affine(x, m, (h, w), padding_mode="zeros", align_corners=True)


def _autocontrast(x: Tensor) -> Tensor:
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-8), x)


@register
class UEraserLite(Defense):
    """UEraser-Lite per image, with the ranges of UEraser's own trainer (not kornia's defaults, roughness
    U(0.1, 0.7) and intensity U(0, 1)): plasma brightness ``x + (2 p - 1) i`` with
    roughness U(0.3, 0.7) and intensity i ~ U(0.5, 1.0) (``ROUGHNESS``, ``INTENSITY``), plasma contrast
    ``(x - 0.5) 4 p + 0.5`` with roughness U(0.3, 0.7), channel shuffle (p = 0.5), then TrivialAugment:
    one of ``OPS`` uniformly with a uniform magnitude: brightness/color/contrast/sharpness factor
    U(0.1, 1.9) (color: saturation, blended with the luminance as PIL's ImageEnhance.Color), posterize to
    {4..8} bits, solarize threshold U(0, 1), rotate U(-30, 30) deg, shear U(-0.3, 0.3), translate
    U(-0.5, 0.5) of the side (zero fill). Every draw is per image; plasma maps p come from kornia's
    diamond-square fed by the generator. Shape in = shape out, values in [0, 1]."""

    name, static = "ueraser", False
    differences = (
        "UEraser's top-level ueraser.py applies each plasma map with probability 0.5; here both are always applied",
        "kornia's TrivialAugment, which UEraser calls, picks one op for the whole batch; here one per image",
        "kornia's default TrivialAugment list has Color commented out and no identity; here both are among the ops "
        "(as in the TrivialAugment paper's list)",
        "the ops follow PIL's definitions with the TrivialAugment paper's ranges, not kornia's (kornia's brightness, "
        "for one, adds factor - 1 instead of multiplying by the factor)",
    )
    source = ("Qin et al., Learning the Unlearnable: Adversarial Augmentations Suppress Unlearnable Example Attacks, "
              "arXiv 2023 (UEraser-Lite; code github.com/lafeat/ueraser)")
    OPS: ClassVar[tuple[str, ...]] = (
        "identity", "brightness", "color", "contrast", "sharpness", "posterize", "solarize", "equalize", "autocontrast",
        "rotate", "shear_x", "shear_y", "translate_x", "translate_y",
    )
    ROUGHNESS: ClassVar[tuple[float, float]] = (0.3, 0.7)
    INTENSITY: ClassVar[tuple[float, float]] = (0.5, 1.0)

    def _plasma(self, x: Tensor, g: torch.Generator) -> Tensor:
        n, c, h, w = x.shape
        lo, hi = self.ROUGHNESS
        roughness = lo + (hi - lo) * torch.rand(n, generator=g)

        def draw(shape: tuple[int, ...], device: object = None, dtype: torch.dtype | None = None) -> Tensor:
            return torch.rand(shape, generator=g).to(device=x.device, dtype=x.dtype)  # CPU draws, run on x.device

        p = diamond_square((n, c, h, w), roughness, random_fn=draw, device=x.device, dtype=x.dtype)
        return p[..., :h, :w]

    def _apply(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        n, c, h, w = x.shape
        lo, hi = self.INTENSITY
        intensity = lo + (hi - lo) * _rand(g, n, 1, 1, 1, like=x)
        x = (x + (2 * self._plasma(x, g) - 1) * intensity).clamp(0, 1)
        x = ((x - 0.5) * 4 * self._plasma(x, g) + 0.5).clamp(0, 1)
        order = torch.argsort(torch.rand(n, c, generator=g), 1)
        order = torch.where(torch.rand(n, 1, generator=g) < 0.5, order, torch.arange(c).expand(n, c))
        x = torch.gather(x, 1, order.to(x.device).view(n, c, 1, 1).expand(n, c, h, w))
        return self._trivial_augment(x, g), y

    def _trivial_augment(self, x: Tensor, g: torch.Generator, op: Tensor | None = None, mag: Tensor | None = None) -> Tensor:
        """One op per image (indices into ``OPS``) with magnitude in [0, 1]; drawn from ``g`` unless given."""
        n = x.shape[0]
        op = torch.randint(0, len(self.OPS), (n,), generator=g) if op is None else op.cpu()
        mag = torch.rand(n, generator=g) if mag is None else mag.cpu().float()
        out = x.clone()
        geo = torch.zeros(n, 5)  # angle, shear_x, shear_y, translate_x, translate_y
        for k, kind in enumerate(self.OPS):
            sel = (op == k).nonzero().flatten()
            if sel.numel() == 0 or kind == "identity":
                continue
            m, dev_sel = mag[sel], sel.to(x.device)
            if kind in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y"):
                col = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y").index(kind)
                geo[sel, col] = (2 * m - 1) * (30.0, 0.3, 0.3, 0.5, 0.5)[col]
                continue
            xs, f = x[dev_sel], (0.1 + 1.8 * m).to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
            if kind == "brightness":
                xs = xs * f
            elif kind == "color":
                gray = _luma(xs)
                xs = gray + (xs - gray) * f
            elif kind == "contrast":
                mean = _luma(xs).mean((1, 2, 3), keepdim=True)
                xs = (xs - mean) * f + mean
            elif kind == "sharpness":
                xs = kornia.enhance.sharpness(xs, f.flatten())
            elif kind == "posterize":
                step = (2.0 ** (4 - torch.floor(m * 5).clamp(max=4))).to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
                xs = torch.floor((xs * 255).round() / step) * step / 255
            elif kind == "solarize":
                xs = torch.where(xs >= m.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1), 1 - xs, xs)
            elif kind == "equalize":
                xs = kornia.enhance.equalize(xs)
            elif kind == "autocontrast":
                xs = _autocontrast(xs)
            out[dev_sel] = xs.clamp(0, 1)
        warp = (geo != 0).any(1).nonzero().flatten()
        if warp.numel():
            p, dev_w = geo[warp].to(device=x.device, dtype=x.dtype), warp.to(x.device)
            out[dev_w] = _affine_warp(x[dev_w], p[:, 0], p[:, 1:3], p[:, 3:5]).clamp(0, 1)
        return out


@register
class Coin(Defense):
    """COIN: each pixel re-sampled by bilinear interpolation at a random offset drawn uniformly from
    [-alpha, alpha] pixels per axis (default alpha = 2, the reference's severity 4), independently per pixel
    and image and shared by the channels. Coordinates wrap around to the opposite edge, as in the reference
    (``scipy.ndimage.map_coordinates(..., order=1, mode="wrap")``): here they are taken modulo H and W
    (scipy's ``"grid-wrap"``; its ``"wrap"`` lets the first and last pixel overlap, which moves samples
    that cross the edge by at most one pixel). The reference then truncates to uint8; here the result
    stays float."""

    name, static = "coin", False
    differences = ("the reference truncates the displaced image to 8 bits; here it stays float",)
    source = ("Li, Wang, Yu, Hu, Zhou, Zhang & Zhang, Detecting and Corrupting Convolution-based Unlearnable "
              "Examples, AAAI 2025 (arXiv 2311.18403; code github.com/wxldragon/COIN)")

    def __init__(self, alpha: float = 2.0) -> None:
        if alpha < 0:
            raise ConfigError(f"coin alpha must be >= 0 pixels, got {alpha}")
        self.alpha = float(alpha)

    def _apply(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        n, c, h, w = x.shape
        disp = (2 * _rand(g, n, h, w, 2, like=x) - 1) * self.alpha  # pixels, (dx, dy)
        return wrap_bilinear(x, disp[..., 0], disp[..., 1]), y


def wrap_bilinear(x: Tensor, dx: Tensor, dy: Tensor) -> Tensor:
    """Bilinear samples of ``x`` (N x C x H x W) at ``(row + dy, col + dx)`` for every pixel, with
    coordinates taken modulo H and W (wrap-around); ``dx``, ``dy``: N x H x W offsets in pixels."""
    n, c, h, w = x.shape
    sy = torch.arange(h, device=x.device, dtype=x.dtype).view(1, h, 1) + dy
    sx = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, w) + dx
    y0, x0 = torch.floor(sy), torch.floor(sx)
    fy, fx = (sy - y0).unsqueeze(1), (sx - x0).unsqueeze(1)  # N x 1 x H x W weights
    y0i, x0i = y0.long().remainder(h), x0.long().remainder(w)
    y1i, x1i = (y0i + 1).remainder(h), (x0i + 1).remainder(w)
    flat = x.reshape(n, c, h * w)

    def at(yi: Tensor, xi: Tensor) -> Tensor:
        return flat.gather(2, (yi * w + xi).view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)

    top = at(y0i, x0i) * (1 - fx) + at(y0i, x1i) * fx
    bottom = at(y1i, x0i) * (1 - fx) + at(y1i, x1i) * fx
    return top * (1 - fy) + bottom * fy


_DCT_CACHE: dict[tuple[int, str, torch.dtype], Tensor] = {}


def dct_matrix(size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Orthonormal DCT-II matrix D (size x size): coefficients = D @ signal, signal = D.T @ coefficients."""
    key = (size, str(device), dtype)
    if key not in _DCT_CACHE:
        k = torch.arange(size, dtype=torch.float64).view(-1, 1)
        i = torch.arange(size, dtype=torch.float64).view(1, -1)
        d = torch.cos(math.pi * (2 * i + 1) * k / (2 * size)) * math.sqrt(2 / size)
        d[0] /= math.sqrt(2)
        _DCT_CACHE[key] = d.to(device=device, dtype=dtype)
    return _DCT_CACHE[key]


def lowpass_band(h: int, w: int, keep: float) -> tuple[int, int]:
    """Kept DCT block of an H x W image: rows u < int(keep * H), columns v < int(keep * W), truncated as
    the RSK+FF reference does (``int(H * percentage / 100)``: 9 of 30 or of 32 at keep 0.3, not round());
    a 1e-9 guard keeps float error from dropping a whole frequency (0.29 x 100 is 28.999...; the
    reference's int(100 x 29 / 100) is 29, as here); at least 1."""
    return max(1, int(keep * h + 1e-9)), max(1, int(keep * w + 1e-9))


@register
class RSKFF(Defense):
    """Random sharpening kernel, then frequency filtering, before the crop and flip (the reference's order:
    ``before_crop``, so the training loop hands it the whole uncropped images).

    Per image: a plus-shaped 3 x 3 kernel, corners 0, centre c ~ N(centre_mean, centre_std) = N(2.5, 0.1)
    and each of its 4 neighbours drawn independently ~ N(-(c - 1) / 4, centre_std) (the reference's
    spread: 0.1 for the centre and for each neighbour; the kernel sums to 1 on average), applied to every
    channel as a valid convolution (no padding: (H-2) x (W-2) pixels) and clamped to [0, 1]; then an
    orthonormal 2-D DCT-II of that (H-2) x (W-2) image keeping only the low-frequency block of
    ``lowpass_band(H-2, W-2, keep)`` coefficients (int(0.3 x 30) = 9 x 9 at 32 px), inverse DCT, clamped
    to [0, 1]. To keep the H x W shape the training loop needs, the 1-pixel border of the result is then
    replicated (see ``differences``)."""

    name, static = "rskff", False
    before_crop = True
    differences = (
        "the valid convolution leaves (H-2) x (W-2) pixels, which the reference pads by 4 and crops to 32 x 32; here "
        "their 1-pixel border is replicated back to H x W before the training loop's crop, so the outer ring of "
        "pixels differs",
        "for CIFAR-100 the reference also rotates by up to 15 degrees after the flip; here nothing is rotated",
    )
    source = ("Kim & Sandoval-Segura, Learning From Convolution-based Unlearnable Datasets, arXiv 2411.01742, 2024 "
              "(RSK+FF: random sharpening kernels + frequency filtering; code github.com/aseriesof-tubes/RSK)")

    def __init__(self, centre_mean: float = 2.5, centre_std: float = 0.1, keep: float = 0.3) -> None:
        if not 0 < keep <= 1 or centre_std < 0:
            raise ConfigError(f"rskff needs 0 < keep <= 1 and centre_std >= 0, got {keep}, {centre_std}")
        self.centre_mean, self.centre_std, self.keep = float(centre_mean), float(centre_std), float(keep)

    def _kernels(self, n: int, g: torch.Generator) -> Tensor:
        """N x 3 x 3 plus-shaped kernels on the CPU: centre c, arms up, down, left, right ~ N(-(c - 1) / 4, std)."""
        centre = self.centre_mean + self.centre_std * torch.randn(n, generator=g)
        arms = -(centre - 1).view(n, 1) / 4 + self.centre_std * torch.randn(n, 4, generator=g)
        kernel = torch.zeros(n, 3, 3)
        kernel[:, 1, 1] = centre
        kernel[:, 0, 1], kernel[:, 2, 1], kernel[:, 1, 0], kernel[:, 1, 2] = arms.unbind(1)
        return kernel

    def _apply(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        n, c, h, w = x.shape
        if h < 3 or w < 3:
            raise InputError(f"rskff needs images of at least 3 x 3 pixels, got {h} x {w}")
        weight = self._kernels(n, g).repeat_interleave(c, 0).view(n * c, 1, 3, 3).to(device=x.device, dtype=x.dtype)
        sharp = F.conv2d(x.reshape(1, n * c, h, w), weight, groups=n * c).clamp(0, 1)  # valid, then clamped
        vh, vw = h - 2, w - 2
        dh, dw = dct_matrix(vh, x.device, x.dtype), dct_matrix(vw, x.device, x.dtype)
        coef = dh @ sharp.view(n, c, vh, vw) @ dw.T
        kh, kw = lowpass_band(vh, vw, self.keep)
        mask = torch.zeros(vh, vw, device=x.device, dtype=x.dtype)
        mask[:kh, :kw] = 1
        low = (dh.T @ (coef * mask) @ dw).clamp(0, 1)
        return F.pad(low, (1, 1, 1, 1), mode="replicate"), y  # back to h x w (see ``differences``)
