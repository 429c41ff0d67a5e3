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
