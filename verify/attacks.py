"""Adversarial examples for adversarial training: PGD (L-inf, L2) and FGSM with random start.

Shapes and ranges: ``x`` is float32 ``N x C x H x W`` in [0, 1]; ``y`` holds class indices ``(N,)``
or soft labels ``N x K`` (float). Each attack returns a detached ``x_adv`` of ``x``'s shape, inside the
eps-ball around ``x`` and inside [0, 1]. The attacks never change the model's train/eval mode (the
caller chooses; in train mode BatchNorm running statistics update as usual) and never write
``.grad`` of model parameters: gradients are taken w.r.t. the input only (``torch.autograd.grad``).
They work under a caller's ``torch.autocast``; the loss is computed in float32. Randomness comes
only from ``generator`` (sampled on the generator's device, then moved to ``x``'s device); with
``generator=None`` torch's default CPU generator is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perturbations.errors import ConfigError
from perturbations.steps import l2_step, per_sample_norm, signed_step

__all__ = ["fgsm_rs", "fgsm_rs_l2", "pgd", "soft_cross_entropy"]

LossFn = Callable[[Tensor, Tensor], Tensor]
NORMS = ("linf", "l2")


def soft_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Summed cross-entropy in float32 for class indices ``(N,)`` or soft labels ``N x K``.

    Summed rather than averaged so input gradients do not shrink with the batch size (which could
    underflow under autocast); the attack steps only use the gradient's sign or direction.
    """
    logits = logits.float()
    if y.dim() == logits.dim() and y.is_floating_point():
        return F.cross_entropy(logits, y.float(), reduction="sum")
    return F.cross_entropy(logits, y.long(), reduction="sum")


def _check(eps: float, norm: str, steps: int = 1, step_size: float | None = None, name: str = "step_size") -> None:
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ConfigError(f"eps must be a positive number, got {eps!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
    if norm not in NORMS:
        raise ConfigError(f"unknown norm {norm!r}; use one of {', '.join(NORMS)}")
    if step_size is not None and (not isinstance(step_size, (int, float)) or not math.isfinite(step_size) or step_size <= 0):
        raise ConfigError(f"{name} must be a positive number, got {step_size!r}")


def _random_start(x: Tensor, eps: float, norm: str, generator: torch.Generator | None) -> Tensor:
    """Linf: uniform in [-eps, eps]^d. L2: uniform direction times a radius uniform in [0, eps]."""
    device = generator.device if generator is not None else torch.device("cpu")
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, device=device, dtype=torch.float32)
        return ((2 * u - 1) * eps).to(x.device)
    g = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32)
    r = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=device, dtype=torch.float32)
    return (g / per_sample_norm(g) * r * eps).to(x.device)


def _attack(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, step_size: float, norm: str,
    random_start: bool, generator: torch.Generator | None, loss_fn: LossFn | None,
) -> Tensor:
    """Shared loop: start, then ``steps`` x (ascent step, project to the eps-ball, clamp to [0, 1])."""
    loss_fn = loss_fn or soft_cross_entropy
    x = x.detach().float()
    y = y.detach()
    delta = _random_start(x, eps, norm, generator) if random_start else torch.zeros_like(x)
    x_adv = (x + delta).clamp(0.0, 1.0)
    with torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = loss_fn(model(x_adv), y).float()
            (grad,) = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                step = signed_step if norm == "linf" else l2_step  # ascent, then projection to the eps-ball
                delta = step(x_adv - x, grad.float(), step_size, eps, ascent=True)
                x_adv = (x + delta).clamp(0.0, 1.0)
    return x_adv.detach()


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    norm: str = "linf",
    random_start: bool = True,
    generator: torch.Generator | None = None,
    loss_fn: LossFn | None = None,
) -> Tensor:
    """Projected gradient descent (Madry et al., "Towards Deep Learning Models Resistant to
    Adversarial Attacks", ICLR 2018), maximising ``loss_fn(model(x_adv), y)``.

    Defaults: ``steps=10``, ``step_size=eps/4`` (project default; the paper-style recipe is
    ``1.5*eps/steps``), ``norm="linf"`` (sign steps) or ``"l2"`` (L2-normalised gradient steps),
    random start (uniform in the L-inf ball; for L2 a uniform direction scaled by a radius uniform
    in [0, eps]), ``loss_fn`` = :func:`soft_cross_entropy`. Returns detached ``x_adv`` (``x``'s shape).
    """
    _check(eps, norm, steps, step_size)
    return _attack(model, x, y, eps, steps, eps / 4 if step_size is None else step_size, norm,
                   random_start, generator, loss_fn)


def fgsm_rs(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    alpha: float | None = None,
    generator: torch.Generator | None = None,
    loss_fn: LossFn | None = None,
) -> Tensor:
    """FGSM with random start (Wong, Rice, Kolter, "Fast is better than free", ICLR 2020), L-inf.

    ``delta ~ U[-eps, eps]`` (with ``x + delta`` clamped to [0, 1]), one sign step of ``alpha``
    (default ``1.25*eps``), then ``delta`` clamped to [-eps, eps] and ``x + delta`` to [0, 1].
    """
    _check(eps, "linf", 1, alpha, name="alpha")
    return _attack(model, x, y, eps, 1, 1.25 * eps if alpha is None else alpha, "linf", True, generator, loss_fn)


def fgsm_rs_l2(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    alpha: float | None = None,
    generator: torch.Generator | None = None,
    loss_fn: LossFn | None = None,
) -> Tensor:
    """L2 analogue of :func:`fgsm_rs` (our extension, not in Wong et al. 2020), for the quick tier's
    fast L2 adversarial training: random start in the L2 ball (as :func:`pgd`), one L2-normalised
    gradient step of ``alpha`` (default ``1.25*eps``), projection to the eps-ball and to [0, 1].
    """
    _check(eps, "l2", 1, alpha, name="alpha")
    return _attack(model, x, y, eps, 1, 1.25 * eps if alpha is None else alpha, "l2", True, generator, loss_fn)
