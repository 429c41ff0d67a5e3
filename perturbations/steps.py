"""Projected gradient steps on a perturbation ``delta`` (shared by the methods and verify's attacks).

``delta`` and ``grad`` have the same shape, ``N x ...`` (usually ``N x C x H x W``); the result is a
new tensor (no in-place change). By default a step *descends* (``delta - step * direction``), as the
error-minimising methods need; ``ascent=True`` climbs the loss, as an attack does. The step itself
does not clamp ``x + delta`` to [0, 1]; the caller does, since it holds ``x``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["l2_step", "linf_ascent", "parse_quality_range", "parse_size_range", "per_sample_norm", "project_l2",
           "project_linf", "random_flip_crop", "random_jpeg", "random_rescale", "range_text", "signed_step"]


def per_sample_norm(t: Tensor) -> Tensor:
    """L2 norm of each sample (at least 1e-12), shaped ``N x 1 x ... x 1`` for broadcasting."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def project_linf(delta: Tensor, eps: float) -> Tensor:
    """Clamp every element to [-eps, eps]."""
    return delta.clamp(-eps, eps)


def project_l2(delta: Tensor, eps: float) -> Tensor:
    """Scale each sample whose L2 norm exceeds ``eps`` back onto the eps-sphere."""
    return delta * (eps / per_sample_norm(delta)).clamp(max=1.0)


def signed_step(delta: Tensor, grad: Tensor, step: float, eps: float, *, ascent: bool = False) -> Tensor:
    """L-inf step (the PGD step of Madry et al., ICLR 2018): ``delta -+ step * sign(grad)``
    (``-`` by default, ``+`` with ``ascent``), then clamped to [-eps, eps]."""
    direction = grad.sign()
    return project_linf(delta + step * direction if ascent else delta - step * direction, eps)


def l2_step(delta: Tensor, grad: Tensor, step: float, eps: float, *, ascent: bool = False) -> Tensor:
    """L2 step: ``delta -+ step * grad / ||grad||`` per sample (``+`` with ``ascent``), then
    projected onto the L2 ball of radius ``eps``."""
    direction = grad / per_sample_norm(grad)
    return project_l2(delta + step * direction if ascent else delta - step * direction, eps)


def linf_ascent(loss: Callable[[Tensor], Tensor], x: Tensor, rho: float, steps: int,
                gen: torch.Generator) -> Tensor:
    """The adversarial point ``x + a``, ``|a|_inf <= rho``, ``x + a`` in [0, 1], that raises
    ``loss(x + a)`` (a scalar): a random start drawn from ``gen`` (on the CPU), then ``steps`` signed
    ascent steps of ``2.5 * rho / steps`` (Madry et al.'s PGD). Detached. ``rho <= 0``: ``x`` itself,
    with nothing drawn from ``gen``."""
    x = x.detach()
    if rho <= 0 or steps < 1:
        return x
    a = (torch.rand(x.shape, generator=gen) * 2 - 1).mul_(rho).to(x.device)
    a = (x + a).clamp(0, 1) - x
    step = 2.5 * rho / steps
    for _ in range(steps):
        a.requires_grad_(True)
        (g,) = torch.autograd.grad(loss(x + a), a)
        a = signed_step(a.detach(), g, step, rho, ascent=True)
        a = (x + a).clamp(0, 1) - x
    return (x + a).detach()


def _parse_int_range(value: str | int | Sequence[int] | None, what: str, low: int, high: int,
                     kind: str, example: str) -> tuple[int, int] | None:
    """``"A-B"``, ``"A"``, ``A`` or ``(A, B)`` as ``(a, b)`` with ``low <= a <= b <= high``;
    ``None``/``""``/``"off"``: None. ValueError with a one-line message otherwise."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "off", "none")):
        return None
    try:
        if isinstance(value, str):
            parts = [int(p) for p in value.replace(",", "-").split("-")]
        elif isinstance(value, (int, float)):
            parts = [int(value)] if int(value) == value else []
        else:
            parts = [int(p) for p in value]
    except (TypeError, ValueError):
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not low <= parts[0] <= parts[1] <= high:
        raise ValueError(f"{what} must be {kind} such as {example} ({low} to {high}), got {value!r}")
    return parts[0], parts[1]


def range_text(value: tuple[int, int] | None) -> str | None:
    """``(32, 64)`` -> ``"32-64"`` (what the parsers read back); None stays None."""
    return None if value is None else f"{value[0]}-{value[1]}"


def parse_size_range(value: str | int | Sequence[int] | None, what: str) -> tuple[int, int] | None:
    """``"32-64"``, ``"32"``, ``48`` or ``(32, 64)`` as ``(lo, hi)`` pixels (8 <= lo <= hi <= 4096);
    ``None``/``""``/``"off"``: None. ValueError with a one-line message otherwise."""
    return _parse_int_range(value, what, 8, 4096, "a size range in pixels", "32-64")


def parse_quality_range(value: str | int | Sequence[int] | None, what: str) -> tuple[int, int] | None:
    """``"75-95"``, ``"85"`` or ``(75, 95)`` as ``(lo, hi)`` JPEG qualities (1 <= lo <= hi <= 100);
    ``None``/``""``/``"off"``: None. ValueError with a one-line message otherwise."""
    return _parse_int_range(value, what, 1, 100, "a JPEG quality range", "75-95")


def random_jpeg(x: Tensor, gen: torch.Generator, lo: int, hi: int) -> Tensor:
    """A JPEG round trip at a random quality in ``[lo, hi]`` per image (drawn from ``gen``), as a
    platform re-encodes a published photo: kornia's differentiable codec (Reich et al., WACV 2024;
    libjpeg's quality tables, 4:2:0 chroma subsampling, 8x8 blocks; its rounding is a smooth
    approximation, so gradients pass). Grey (``C = 1``) images are coded as luma only. ``N x C x H x W``
    in [0, 1], the same shape back."""
    from kornia.enhance import jpeg_codec_differentiable

    n, c = x.shape[:2]
    q = torch.randint(lo, hi + 1, (n,), generator=gen).to(device=x.device, dtype=torch.float32)
    rgb = x.clamp(0, 1) if c == 3 else x.clamp(0, 1).expand(-1, 3, -1, -1) if c == 1 else None
    if rgb is None:
        raise ValueError(f"random_jpeg: needs 1 or 3 channels, got {c}")
    out = jpeg_codec_differentiable(rgb.float(), q).to(x.dtype)
    return out if c == 3 else out.mean(1, keepdim=True)


def random_rescale(x: Tensor, gen: torch.Generator, full: int, lo: int, hi: int, groups: int = 4,
                   publish: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """What an attacker's resize does to a perturbation made at ``x``'s size ``S`` and applied to
    photos of about ``full`` px: ``x`` is upsampled bilinearly to ``full`` (as the protection is
    applied), passed through ``publish`` there when given (e.g. :func:`random_jpeg`: what a platform
    does to the full-size file), shrunk with antialiasing to a random size in ``[lo, hi]`` (drawn from
    ``gen``, one per group of the batch) as the attacker's pipeline does, and brought back to ``S``
    for the surrogate. Differentiable; the same shape as ``x``."""
    n, _, h, w = x.shape
    full = max(full, h, w)
    sides = torch.randint(lo, hi + 1, (max(1, min(groups, n)),), generator=gen).tolist()
    parts = []
    for i, chunk in enumerate(x.chunk(len(sides))):
        y = chunk if full <= max(h, w) else F.interpolate(chunk, size=(full * h // max(h, w), full * w // max(h, w)),
                                                         mode="bilinear", align_corners=False)
        if publish is not None:
            y = publish(y)
        r = min(sides[i], full)
        size = (max(1, r * h // max(h, w)), max(1, r * w // max(h, w)))
        y = F.interpolate(y, size=size, mode="bilinear", align_corners=False, antialias=True)
        parts.append(F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False, antialias=size[0] > h))
    return torch.cat(parts)


def random_flip_crop(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random horizontal flips and padded random crops (pad min(H, W)/8, reflect), drawn from ``gen``:
    the attacker's standard augmentation, differentiable, for perturbations optimised to survive it."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    p = max(1, min(h, w) // 8)
    padded = F.pad(x, (p, p, p, p), mode="reflect")
    oy = torch.randint(0, 2 * p + 1, (n,), generator=gen).tolist()
    ox = torch.randint(0, 2 * p + 1, (n,), generator=gen).tolist()
    return torch.stack([padded[i, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w] for i in range(n)])
