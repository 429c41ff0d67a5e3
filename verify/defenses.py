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


def get(name: str, **kwargs: object) -> Defense:
    """An instance of the defense registered as ``name``, built with ``kwargs``."""
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
        if name not in _DEFENSES:
            raise ConfigError(f"unknown defense '{name}'; available: {', '.join(available())}")
        if name not in out:
            out.append(name)
    return out


class Defense:
    """Base class. Subclasses set ``name``, ``source``, ``static`` and implement ``_apply``."""

    name: ClassVar[str] = ""
    source: ClassVar[str] = ""
    static: ClassVar[bool] = True

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
    """ISS grayscale: luminance replicated to C channels (input stays C-channel)."""

    name, static = "grayscale", True
    source = "Liu et al., Image Shortcut Squeezing: Countering Perturbative Availability Poisons with Compression, ICML 2023"

    def _apply(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        return _luma(x).expand_as(x).contiguous(), y


@register
class Jpeg(Defense):
    """ISS JPEG: real Pillow encode/decode round trip at ``quality`` (default 10); C = 1 as mode L."""

    name, static = "jpeg10", True
    source = "Liu et al., Image Shortcut Squeezing: Countering Perturbative Availability Poisons with Compression, ICML 2023"

    def __init__(self, quality: int = 10) -> None:
        if not 1 <= int(quality) <= 95:
            raise ConfigError(f"JPEG quality must be in 1..95, got {quality}")
        self.quality = int(quality)

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
    """Gaussian blur, 3 x 3 kernel, sigma 1.0 (reflect borders; kornia)."""

    name, static = "blur", True
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
    """Bit-depth reduction to ``bits`` (default 2) per channel: round(x * (2^bits - 1)) / (2^bits - 1)."""

    name, static = "bdr", True
    source = "Xu et al., Feature Squeezing, NDSS 2018; used against availability poisons by Liu et al., ICML 2023 (ISS)"

    def __init__(self, bits: int = 2) -> None:
        if not 1 <= int(bits) <= 7:
            raise ConfigError(f"bdr bits must be in 1..7, got {bits}")
        self.bits = int(bits)

    def _apply(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        levels = 2**self.bits - 1
        return torch.round(x * levels) / levels, y


@register
class Cutout(Defense):
    """Cutout: one square of side ``length`` (default min(H, W) // 2) zeroed per image, centre uniform, clipped."""

    name, static = "cutout", False
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
    """UEraser-Lite per image: plasma brightness (roughness U(0.1, 0.7), intensity U(0, 1)), plasma contrast
    (roughness U(0.1, 0.7)), channel shuffle (p = 0.5), then TrivialAugment: one of ``OPS`` uniformly with a
    uniform magnitude: brightness/contrast/sharpness factor U(0.1, 1.9), posterize to {4..8} bits, solarize
    threshold U(0, 1), rotate U(-30, 30) deg, shear U(-0.3, 0.3), translate U(-0.5, 0.5) of the side (zero fill).
    Plasma maps come from kornia's diamond-square fed by the generator."""

    name, static = "ueraser", False
    source = "Qin et al., Learning the Unlearnable: Adversarial Augmentations Suppress Unlearnable Example Attacks, arXiv 2023 (UEraser-Lite, as in APBench)"
    OPS: ClassVar[tuple[str, ...]] = (
        "identity", "brightness", "contrast", "sharpness", "posterize", "solarize", "equalize", "autocontrast",
        "rotate", "shear_x", "shear_y", "translate_x", "translate_y",
    )

    def _plasma(self, x: Tensor, g: torch.Generator) -> Tensor:
        n, c, h, w = x.shape
        roughness = 0.1 + 0.6 * torch.rand(n, generator=g)

        def draw(shape: tuple[int, ...], device: object = None, dtype: torch.dtype | None = None) -> Tensor:
            return torch.rand(shape, generator=g).to(device=x.device, dtype=x.dtype)  # CPU draws, run on x.device

        p = diamond_square((n, c, h, w), roughness, random_fn=draw, device=x.device, dtype=x.dtype)
        return p[..., :h, :w]

    def _apply(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        n, c, h, w = x.shape
        intensity = _rand(g, n, 1, 1, 1, like=x)
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
    """Kept DCT block: rows u < ceil(keep * H), columns v < ceil(keep * W)."""
    return math.ceil(keep * h), math.ceil(keep * w)


@register
class RSKFF(Defense):
    """Random sharpening kernel, then frequency filtering. Per image: a 3 x 3 kernel with centre ~ N(2.5, 0.1)
    and each of the 8 neighbours (1 - centre) / 8 (sums to 1), applied depthwise with reflect padding; then an
    orthonormal 2D DCT-II, keeping only the low-frequency block u < ceil(0.3 H), v < ceil(0.3 W), inverse DCT."""

    name, static = "rskff", False
    source = ("Kim & Sandoval-Segura, Learning From Convolution-based Unlearnable Datasets, arXiv 2411.01742, 2024 "
              "(RSK+FF: random sharpening kernels + frequency filtering; code github.com/aseriesof-tubes/RSK)")

    def __init__(self, centre_mean: float = 2.5, centre_std: float = 0.1, keep: float = 0.3) -> None:
        if not 0 < keep <= 1 or centre_std < 0:
            raise ConfigError(f"rskff needs 0 < keep <= 1 and centre_std >= 0, got {keep}, {centre_std}")
        self.centre_mean, self.centre_std, self.keep = float(centre_mean), float(centre_std), float(keep)

    def _apply(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        n, c, h, w = x.shape
        centre = self.centre_mean + self.centre_std * torch.randn(n, generator=g)
        kernel = ((1 - centre) / 8).view(n, 1, 1).repeat(1, 3, 3)
        kernel[:, 1, 1] = centre
        weight = kernel.repeat_interleave(c, 0).view(n * c, 1, 3, 3).to(device=x.device, dtype=x.dtype)
        sharp = F.conv2d(F.pad(x.reshape(1, n * c, h, w), (1, 1, 1, 1), mode="reflect"), weight, groups=n * c)
        dh, dw = dct_matrix(h, x.device, x.dtype), dct_matrix(w, x.device, x.dtype)
        coef = dh @ sharp.view(n, c, h, w) @ dw.T
        kh, kw = lowpass_band(h, w, self.keep)
        mask = torch.zeros(h, w, device=x.device, dtype=x.dtype)
        mask[:kh, :kw] = 1
        return dh.T @ (coef * mask) @ dw, y
