"""PGD (L-inf, L2), FGSM-RS and its L2 analogue: budgets, effect, determinism, side effects."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from perturbations.errors import ConfigError
from verify.attacks import fgsm_rs, fgsm_rs_l2, pgd, soft_cross_entropy

EPS = {"linf": 8 / 255, "l2": 0.5}


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5),
    ).eval()
    with torch.no_grad():  # default init gives near-uniform logits; make the loss input-sensitive
        model[0].weight.mul_(3)
        model[-1].weight.mul_(10)
    return model


@pytest.fixture
def setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 3, 8, 8, generator=g)
    y = torch.randint(0, 5, (16,), generator=g)
    return _tiny_model(), x, y


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return soft_cross_entropy(model(x), y).item()


def _random_noise(x: torch.Tensor, eps: float, norm: str, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if norm == "linf":
        d = eps * (torch.randint(0, 2, x.shape, generator=g).float() * 2 - 1)
    else:
        d = torch.randn(x.shape, generator=g)
        d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps
    return (x + d).clamp(0, 1)


def _check_budget(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> None:
    assert x_adv.shape == x.shape and x_adv.dtype == torch.float32
    assert not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    d = (x_adv - x).flatten(1)
    if norm == "linf":
        assert d.abs().max() <= eps + 1e-6
    else:
        assert (d.norm(dim=1) <= eps + 1e-5).all()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_budget_and_effect(setup, norm):
    model, x, y = setup
    eps = EPS[norm]
    x_adv = pgd(model, x, y, eps, steps=5, norm=norm, generator=torch.Generator().manual_seed(0))
    _check_budget(x_adv, x, eps, norm)
    assert (x_adv - x).abs().max() > eps / 4  # it actually moved
    clean, noise, adv = _loss(model, x, y), _loss(model, _random_noise(x, eps, norm), y), _loss(model, x_adv, y)
    assert adv > clean * 1.1
    assert adv > noise * 1.1


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_without_random_start_uses_no_randomness(setup, norm):
    model, x, y = setup
    a = pgd(model, x, y, EPS[norm], steps=3, norm=norm, random_start=False)
    b = pgd(model, x, y, EPS[norm], steps=3, norm=norm, random_start=False)
    assert torch.equal(a, b)
    assert _loss(model, a, y) > _loss(model, x, y)


@pytest.mark.parametrize("attack,norm", [(fgsm_rs, "linf"), (fgsm_rs_l2, "l2")])
def test_fgsm_rs_budget_and_effect(setup, attack, norm):
    model, x, y = setup
    eps = EPS[norm]
    x_adv = attack(model, x, y, eps, generator=torch.Generator().manual_seed(0))
    _check_budget(x_adv, x, eps, norm)
    assert _loss(model, x_adv, y) > _loss(model, x, y) * 1.05
    assert _loss(model, x_adv, y) > _loss(model, _random_noise(x, eps, norm), y)


def test_fgsm_rs_step_then_clamp(setup):
    # alpha = 1.25 eps from a random start: most coordinates end on the eps boundary (or the [0,1] box).
    model, x, y = setup
    eps = EPS["linf"]
    d = fgsm_rs(model, x, y, eps, generator=torch.Generator().manual_seed(0)) - x
    inside_box = ((x > eps) & (x < 1 - eps))
    at_bound = (d.abs() - eps).abs() < 1e-6
    assert at_bound[inside_box].float().mean() > 0.5


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_single_step_has_the_step_size(setup, norm):
    # From x (no random start, no clamping: x in [0.25, 0.75]) one step moves by exactly step_size
    # in the attack's norm: sign steps for L-inf, unit-L2 gradient steps for L2.
    model, x, y = setup
    x = 0.25 + 0.5 * x
    step = {"linf": 2 / 255, "l2": 0.1}[norm]
    d = pgd(model, x, y, 10 * step, steps=1, step_size=step, norm=norm, random_start=False) - x
    if norm == "linf":
        assert torch.allclose(d.abs(), torch.full_like(d, step), atol=1e-6)
    else:
        assert torch.allclose(d.flatten(1).norm(dim=1), torch.full((len(d),), step), atol=1e-5)


class _Flat(nn.Module):
    """Input-independent logits: zero input gradient, so the attack returns its random start."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :5] * 0


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_distribution(norm):
    x = torch.full((256, 3, 8, 8), 0.5)
    y = torch.zeros(256, dtype=torch.long)
    eps = {"linf": 0.1, "l2": 1.0}[norm]
    d = pgd(_Flat(), x, y, eps, steps=1, norm=norm, generator=torch.Generator().manual_seed(0)) - x
    if norm == "linf":  # uniform in [-eps, eps]: mean 0, a quarter beyond +eps/2 and a quarter below -eps/2
        assert d.abs().max() <= eps + 1e-6
        assert abs(d.mean().item()) < 0.01 * eps
        assert 0.23 < (d > eps / 2).float().mean().item() < 0.27
        assert 0.23 < (d < -eps / 2).float().mean().item() < 0.27
    else:  # uniform direction, radius uniform in [0, eps]
        r = d.flatten(1).norm(dim=1)
        assert r.max() <= eps + 1e-5 and 0.4 * eps < r.mean() < 0.6 * eps
        assert abs(d.mean().item()) < 0.01 * eps / 192 ** 0.5
        assert 0.45 < (d > 0).float().mean().item() < 0.55


@pytest.mark.parametrize("attack", [
    lambda m, x, y, g: pgd(m, x, y, 8 / 255, steps=2, generator=g),
    lambda m, x, y, g: pgd(m, x, y, 0.5, steps=2, norm="l2", generator=g),
    lambda m, x, y, g: fgsm_rs(m, x, y, 8 / 255, generator=g),
    lambda m, x, y, g: fgsm_rs_l2(m, x, y, 0.5, generator=g),
])
def test_determinism_and_generator_only(setup, attack):
    model, x, y = setup
    state = torch.get_rng_state()
    a = attack(model, x, y, torch.Generator().manual_seed(7))
    b = attack(model, x, y, torch.Generator().manual_seed(7))
    c = attack(model, x, y, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched


@pytest.mark.parametrize("train", [True, False])
def test_no_param_grads_and_mode_unchanged(setup, train):
    model, x, y = setup
    model.train(train)
    pgd(model, x, y, 8 / 255, steps=2, generator=torch.Generator().manual_seed(0))
    fgsm_rs(model, x, y, 8 / 255, generator=torch.Generator().manual_seed(0))
    assert all(m.training == train for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_soft_labels(setup):
    model, x, y = setup
    soft = F.one_hot(y, 5).float() * 0.8 + 0.2 / 5
    x_adv = pgd(model, x, soft, 8 / 255, steps=5, generator=torch.Generator().manual_seed(0))
    _check_budget(x_adv, x, 8 / 255, "linf")
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), soft) > F.cross_entropy(model(x), soft) * 1.1
    # one-hot soft labels give the same attack as hard labels
    a = pgd(model, x, F.one_hot(y, 5).float(), 8 / 255, steps=2, generator=torch.Generator().manual_seed(3))
    b = pgd(model, x, y, 8 / 255, steps=2, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a, b, atol=1e-6)


def test_under_no_grad_and_autocast(setup):
    model, x, y = setup
    with torch.no_grad():
        x_adv = pgd(model, x, y, 8 / 255, steps=2, generator=torch.Generator().manual_seed(0))
    _check_budget(x_adv, x, 8 / 255, "linf")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = pgd(model, x, y, 0.5, steps=2, norm="l2", generator=torch.Generator().manual_seed(0))
    _check_budget(x_adv, x, 0.5, "l2")
    assert _loss(model, x_adv, y) > _loss(model, x, y)


def test_custom_loss_fn_is_used(setup):
    # Maximising the negated loss must lower the true loss: the attack follows loss_fn's gradient.
    model, x, y = setup
    x_adv = pgd(model, x, y, 8 / 255, steps=5, random_start=False,
                loss_fn=lambda logits, t: -F.cross_entropy(logits.float(), t))
    assert _loss(model, x_adv, y) < _loss(model, x, y)


@pytest.mark.parametrize("kwargs", [
    {"eps": 0.0}, {"eps": -0.1}, {"eps": float("nan")}, {"eps": 0.1, "steps": 0},
    {"eps": 0.1, "norm": "l1"}, {"eps": 0.1, "step_size": 0.0},
])
def test_pgd_bad_arguments(setup, kwargs):
    model, x, y = setup
    with pytest.raises(ConfigError):
        pgd(model, x, y, **kwargs)


@pytest.mark.parametrize("attack", [fgsm_rs, fgsm_rs_l2])
@pytest.mark.parametrize("kwargs", [{"eps": 0.0}, {"eps": 0.1, "alpha": -1.0}])
def test_fgsm_bad_arguments(setup, attack, kwargs):
    model, x, y = setup
    with pytest.raises(ConfigError):
        attack(model, x, y, **kwargs)
