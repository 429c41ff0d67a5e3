"""Projected gradient steps: direction, projection, shapes, no in-place change."""

from __future__ import annotations

import torch

from perturbations.steps import l2_step, linf_ascent, per_sample_norm, project_l2, signed_step


def test_signed_step_descends_ascends_and_clamps():
    delta = torch.tensor([[0.0, 0.03, -0.03, 0.01]])
    grad = torch.tensor([[1.0, -2.0, 3.0, 0.0]])
    before = delta.clone()
    down = signed_step(delta, grad, 0.02, 0.04)
    assert torch.allclose(down, torch.tensor([[-0.02, 0.04, -0.04, 0.01]]))
    up = signed_step(delta, grad, 0.02, 0.04, ascent=True)
    assert torch.allclose(up, torch.tensor([[0.02, 0.01, -0.01, 0.01]]))
    assert torch.equal(delta, before)


def test_l2_step_moves_along_the_gradient_and_projects():
    gen = torch.Generator().manual_seed(0)
    delta = torch.zeros(3, 2, 4, 4)
    grad = torch.randn(3, 2, 4, 4, generator=gen)
    step = l2_step(delta, grad, 0.5, 1.0, ascent=True)
    assert torch.allclose(per_sample_norm(step).flatten(), torch.full((3,), 0.5), atol=1e-6)
    assert torch.allclose(step, 0.5 * grad / per_sample_norm(grad), atol=1e-6)
    far = l2_step(delta, grad, 5.0, 1.0)
    assert torch.allclose(per_sample_norm(far).flatten(), torch.ones(3), atol=1e-6)
    assert torch.equal(project_l2(step, 1.0), step)  # inside the ball: unchanged


def test_linf_ascent_raises_the_loss_within_the_ball_and_the_range():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 6, 6, generator=g)
    w = torch.randn(36, generator=g)

    def loss(z):
        return (z.flatten(1) @ w).pow(2).sum()

    adv = linf_ascent(loss, x, 0.05, 5, torch.Generator().manual_seed(1))
    assert float((adv - x).abs().max()) <= 0.05 + 1e-6 and 0 <= float(adv.min()) and float(adv.max()) <= 1
    assert float(loss(adv)) > float(loss(x)) and not adv.requires_grad
    untouched = torch.Generator().manual_seed(2)
    assert linf_ascent(loss, x, 0.0, 5, untouched) is not None
    assert torch.equal(linf_ascent(loss, x, 0.0, 5, untouched), x)
    assert torch.equal(torch.rand(3, generator=untouched), torch.rand(3, generator=torch.Generator().manual_seed(2)))


def test_random_jpeg_is_a_differentiable_stand_in_for_the_real_codec():
    """kornia's codec at quality Q lands close to Pillow's JPEG at Q (measured on the Kodak crop:
    mean |kornia - Pillow| is 0.32x the codec's own change at Q = 75, 0.50x at 95), passes
    gradients, draws its qualities from the generator, and codes grey as luma."""
    from pathlib import Path

    import numpy as np
    import pytest
    from PIL import Image

    from perturbations.steps import parse_quality_range, random_jpeg
    from tests.methods import pil_jpeg

    assert parse_quality_range("75-95", "q") == (75, 95) and parse_quality_range(85, "q") == (85, 85)
    assert parse_quality_range("off", "q") is None
    for bad in ("0-50", "95-75", "101", "high"):
        with pytest.raises(ValueError, match="JPEG quality range"):
            parse_quality_range(bad, "q")
    kodak = Path(__file__).resolve().parents[2] / "samples" / "kodak" / "kodim05.png"
    img = np.asarray(Image.open(kodak).convert("RGB"))[:256, :256]
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
    for q in (75, 95):
        real = pil_jpeg(x, q)
        ours = random_jpeg(x, torch.Generator().manual_seed(0), q, q)
        own = float((real - x).abs().mean())
        assert float((ours - real).abs().mean()) < 0.6 * own, q
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    batch = x.expand(4, -1, -1, -1).clone().requires_grad_(True)
    y = random_jpeg(batch, g(), 70, 95)
    assert torch.equal(y.detach(), random_jpeg(batch, g(), 70, 95).detach())
    (grad,) = torch.autograd.grad(y.sum(), batch)
    assert torch.isfinite(grad).all() and float(grad.abs().mean()) > 0.1
    grey = x.mean(1, keepdim=True)
    assert random_jpeg(grey, g(), 75, 75).shape == grey.shape
