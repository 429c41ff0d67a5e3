"""SALM: sparsity-aware local masking, error-minimising noise on the most significant pixels.

Sun, Chen, Li, Zhou, Fu, "Medical Unlearnable Examples: Securing Medical Data from Unauthorized
Training via Sparsity-Aware Local Masking", 2024. No code was published; this is a reconstruction
from the paper's description, every choice it leaves open a parameter.

Error-minimising noise (Huang et al., "Unlearnable Examples", ICLR 2021) restricted to a sparse
mask. A surrogate classifier ``f`` (a small CIFAR-style ResNet-8 by default, keyed initialisation,
trained here) and one perturbation ``delta_i`` per image, ``|delta_i|_inf <= eps``, solve the
bi-level min-min problem ``min_f min_delta CE(f(clip(x + delta)), y)``; rounds alternate until the
surrogate's training error on the perturbed data falls below ``stop_error`` or ``rounds`` are spent:

1. train ``f`` for ``train_steps`` SGD steps (lr 0.1, momentum 0.9, weight decay 5e-4, the EM
   paper's) on keyed mini-batches of ``(x + delta, y)``;
2. the mask: per image, the ``ceil(mask_ratio * H * W)`` pixel positions with the largest loss
   gradient magnitude ``sum_c |d CE / d x|`` (the same positions in every channel), recomputed every
   round; ``delta`` is zeroed outside it;
3. for every batch, ``steps`` signed-gradient steps of size ``step_size`` that *minimise* the loss
   with respect to ``delta``, moving only the masked pixels (the model in eval mode).

``mask_ratio = 1`` is plain sample-wise error-minimising noise. With ``jpeg="LO-HI"`` the surrogate
trains on, and the noise steps see, ``x + delta`` after a differentiable JPEG round trip at a keyed
random quality in [LO, HI] (:func:`~perturbations.steps.random_jpeg`): the shortcut is then made of
what a platform's re-encoding keeps. With ``budget="jnd"`` the noise is applied weighted by each
image's perceptual budget (:mod:`perturbations.masking`), and the surrogate and the noise steps see
it so weighted.

Sizes: the noise is computed at one working size (the median image size, scaled down so its longer
side is at most ``max_side``; MedMNIST and CIFAR stay at their size) with the dataset's channels
(grey stays grey). An image at the working size gets its noise as computed (exact sparsity);
another size gets it resized with nearest neighbour (the bound holds; the changed share stays
close to ``mask_ratio``). Applied on the image's own integer grid (8-bit, 16-bit or a DICOM's stored
depth): ``round(delta * levels)`` within ``floor(eps * levels)``, so the bound holds exactly in the
written file and untouched pixels keep their exact value.

State: the surrogate's weights, each image's noise (keyed by the hash of its relative path), the
working size. New images (``extend``, ``protect images --state``) get noise optimised against the
stored surrogate, which is not retrained.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import register
from .additive import AdditivePerturbation
from .base import FitData, parse_fraction, parse_robust
from .clustering import ClusterTable
from .errors import ConfigError, InputError
from .keyring import Keyring
from .nets import TinyConvNet, cifar_resnet, keyed_init
from .steps import linf_ascent, parse_quality_range, random_flip_crop, random_jpeg, range_text, signed_step

log = logging.getLogger(__name__)

ARCHS = ("cifar-resnet8", "cifar-resnet20", "cifar-resnet32", "cifar-resnet44", "cifar-resnet56", "tiny")
TABLE_KEYS = ("table_hashes", "table_clusters", "noise")
INITS = ("uniform", "classwise", "tile", "zero")
OBJECTIVES = ("min", "targeted")
MASK_SCOPES = ("image", "class")


def build_classifier(arch: str, num_classes: int, channels: int) -> nn.Module:
    """The SALM surrogate ``arch`` (see :data:`ARCHS`) for ``channels``-channel inputs."""
    if arch == "tiny":
        return TinyConvNet(num_classes, channels)
    if arch.startswith("cifar-resnet") and arch[len("cifar-resnet"):].isdigit():
        return cifar_resnet(int(arch[len("cifar-resnet"):]), num_classes, channels)
    raise ConfigError(f"salm: surrogate must be one of {', '.join(ARCHS)}, got '{arch}'")


def saliency(grad: torch.Tensor) -> torch.Tensor:
    """``N x 1 x H x W`` per-position saliency ``sum_c |grad|``."""
    return grad.abs().sum(1, keepdim=True)


def top_positions(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """``N x 1 x H x W`` 0/1 mask of the ``ceil(ratio * H * W)`` positions of largest ``score``
    (``N x 1 x H x W``) per image (ties: the lower flat index, via a stable sort)."""
    n, _, h, w = score.shape
    k = min(h * w, max(1, math.ceil(ratio * h * w - 1e-9)))
    order = torch.sort(score.flatten(1), dim=1, descending=True, stable=True).indices[:, :k]
    mask = torch.zeros(n, h * w, device=score.device)
    mask.scatter_(1, order, 1.0)
    return mask.view(n, 1, h, w)


def saliency_mask(grad: torch.Tensor, ratio: float) -> torch.Tensor:
    """The mask of the ``ceil(ratio * H * W)`` positions of largest ``sum_c |grad|`` per image."""
    return top_positions(saliency(grad), ratio)


@register
class SALM(AdditivePerturbation):
    """Sparse error-minimising noise (SALM, Sun et al. 2024; a reconstruction, see module doc).

    Args:
        keyring: key material (streams ``salm/init``, ``salm/noise``, ``salm/batches``).
        num_classes: classes (from the data when ``None``).
        eps: L-inf bound (default 8/255; ``"8/255"`` strings accepted), relative to the full range.
        mask_ratio: share ``rho`` of pixel positions perturbed per image (default 0.1; 1 = dense).
        steps, step_size: signed-gradient steps per batch and round (default 20, 0.8/255).
        train_steps: surrogate SGD steps per round (default 10, the EM paper's).
        rounds: at most this many rounds (default 10); ``stop_error``: stop when the surrogate's
            training error on the perturbed data is below it (default 0: always every round; the EM
            paper's 0.01 stopped BreastMNIST after 4 rounds with no protection left, score 0.01
            against 0.22 for all 10 rounds, docs/BENCHMARKS.md).
        surrogate: ``cifar-resnet8`` (default: a CIFAR-style ResNet with one block per stage, about a
            third of ResNet-20's cost), ``cifar-resnet20/32/44/56`` or ``tiny``; keyed init, trained here.
        batch: images per batch (default 128); ``max_side``: longest side of the working size (128).
        inner_stop: a batch stops its signed-gradient steps early once every image's loss is below
            this (default 0.01; 0 = always all ``steps``, as the EM paper does). The noise of such a
            batch already does its job; this is what keeps the fit within minutes on a CPU.
        augment: train the surrogate and take the noise steps through random flips and padded
            crops (the attacker's augmentation), so the noise survives them (default True: on
            BreastMNIST it lifts the score from 0.22 to 0.28 at the same PSNR; False is the paper's).
        robust: robust error-minimising noise (Fu et al., ICLR 2022) of radius ``rho_a`` (default 0:
            off; e.g. ``"4/255"``): the surrogate is adversarially trained with radius ``rho_a`` and
            every noise step lowers the loss at the worst point within ``rho_a`` of ``x + delta``
            (``robust_steps`` PGD steps, default 5), so adversarial training of that radius cannot
            simply undo it. Costs about ``1 + robust_steps`` times the fit. 0 gives exactly the
            non-robust noise.
        init: where the noise starts: ``classwise`` (default: one keyed +-eps sign pattern per class,
            masked per image, a class-consistent shortcut for the steps to refine; 0.34 against
            0.28 on BreastMNIST), ``uniform`` (the EM paper's) or ``tile``: one keyed +-eps
            ``tile x tile`` sign pattern per class, repeated over the working size. A pattern tied
            to positions carries its class only while the images stay aligned; photos and X-rays
            of mixed aspect ratios, resized and cropped by the attacker, lose that alignment, and a
            repeated tile keeps its class in every local window (a stationary shortcut).
        tile: side of the ``tile`` start in working pixels (default 4). ``zero``: no start (the
            noise grows from the image itself).
        objective: ``min`` (default: error-minimising, the min-min problem above) or ``targeted``:
            class-targeted adversarial poisoning (Fowl et al., "Adversarial Examples Make Strong
            Poisons", NeurIPS 2021). The surrogate is trained on the clean images only
            (``rounds x train_steps`` SGD steps, the same optimiser and views), then frozen, and
            ``steps`` signed steps per image move it towards the next class ``(y + 1) mod K``
            (the loss minimised is the cross-entropy to that target). A model trained on the result
            learns the surrogate's features of one class under another's label, so it does not
            just fail to learn: on clean images it tends to answer the wrong class. The same mask,
            budget, augmentation, JPEG and ``robust`` options apply (``robust``: the surrogate is
            adversarially trained, and each step moves the worst point within ``rho_a``).
        mask_scope: whose saliency picks the masked positions: ``image`` (default, the paper's: each
            image's own top ``mask_ratio`` positions) or ``class`` (the top positions of the class's
            summed saliency, each image's map normalised to sum 1, recomputed every round: every
            image of a class is perturbed at the same positions, a more consistent shortcut; the
            count per image is the same).
        budget: ``"flat"`` (default: ``eps`` everywhere) or ``"jnd"``: each pixel's change at most
            ``jnd_scale`` just-noticeable differences of its image (:mod:`perturbations.masking`).
        jnd_scale: with ``budget="jnd"``: JNDs allowed per pixel (default 1).
        upscale: how the noise made at the working size is enlarged to a larger image: ``nearest``
            (default: a sparse support stays sparse, each working pixel a block) or ``bilinear``
            (dense noise only, ``mask_ratio = 1``: a smooth field without block edges; both keep
            the bound, and both survive an attacker's downscale to the working size).
        jpeg: ``"LO-HI"`` JPEG qualities (e.g. ``"75-95"``; default off): the surrogate's training
            and the noise steps go through a differentiable JPEG round trip at a keyed random quality
            in [LO, HI] per image (before the flips and crops), as a platform re-encodes a published
            file; the sparse noise is then optimised for what survives it.

    Shapes: ``apply`` takes ``N x C x H x W`` float in [0, 1] with labels and ids (relative paths).
    """

    name = "salm"
    summary = "sparse error-minimising noise on the most loss-relevant pixels (medical images; needs labels)"
    paper = ("Sun et al., Medical Unlearnable Examples: Securing Medical Data from Unauthorized Training "
             "via Sparsity-Aware Local Masking, 2024")
    needs_labels = True
    exact = False
    work_bytes_per_value = 10.0
    per_image_state = TABLE_KEYS
    resize_mode = "nearest"  # a sparse support stays sparse
    min_images = 2  # two classes at least
    measured = (
        {"setting": "defaults", "data": "PneumoniaMNIST train, 3,882 grey images, quiet 2-core CPU", "psnr_db": 40.9,
         "images_per_second": 7.9,
         "source": "docs/BENCHMARKS.md: SALM on medical images / Attacker seeds, and PneumoniaMNIST"},
        {"setting": "defaults, fit on 1 loaded thread (fit only)", "data": "CIFAR-10 subset, 2,000 images, 32x32",
         "psnr_db": 42.3, "images_per_second": 2.9,
         "source": "docs/BENCHMARKS.md: SALM on medical images / The CIFAR-10 comparison"},
    )

    @classmethod
    def weights_info(cls) -> dict[str, Any]:
        return {"needs": "none (trains its own surrogate from a keyed start during the fit)", "spec": None,
                "present": None, "bundled": False}

    def __init__(
        self,
        keyring: Keyring,
        num_classes: int | None = None,
        eps: float | str = 8 / 255,
        mask_ratio: float = 0.1,
        steps: int = 20,
        step_size: float | str = 0.8 / 255,
        train_steps: int = 10,
        rounds: int = 10,
        stop_error: float = 0.0,
        surrogate: str = "cifar-resnet8",
        batch: int = 128,
        max_side: int = 128,
        lr: float = 0.1,
        inner_stop: float = 0.01,
        augment: bool = True,
        robust: float | str = 0.0,
        robust_steps: int = 5,
        init: str = "classwise",
        mask_scope: str = "image",
        jpeg: str | None = None,
        budget: str = "flat",
        jnd_scale: float = 1.0,
        upscale: str = "nearest",
        tile: int = 4,
        objective: str = "min",
    ) -> None:
        super().__init__(keyring)
        self._init_budget(budget, jnd_scale)
        try:
            self.jpeg = parse_quality_range(jpeg, "salm: jpeg")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.eps = parse_fraction(eps, "salm: eps")
        self.step_size = parse_fraction(step_size, "salm: step_size")
        if not 0.0 < self.eps <= 1.0:
            raise ConfigError(f"salm: eps must be in (0, 1], got {eps}")
        if not 0.0 < self.step_size <= 1.0:
            raise ConfigError(f"salm: step_size must be in (0, 1], got {step_size}")
        if not 0.0 < float(mask_ratio) <= 1.0:
            raise ConfigError(f"salm: mask_ratio must be in (0, 1], got {mask_ratio}")
        for name, value, low in (("steps", steps, 1), ("train_steps", train_steps, 0), ("rounds", rounds, 1),
                                 ("batch", batch, 1), ("max_side", max_side, 4)):
            if int(value) != value or value < low:
                raise ConfigError(f"salm: {name} must be an integer >= {low}, got {value}")
        if not 0.0 <= float(stop_error) < 1.0:
            raise ConfigError(f"salm: stop_error must be in [0, 1), got {stop_error}")
        if num_classes is not None and int(num_classes) < 2:
            raise ConfigError(f"salm: needs at least 2 classes, got {num_classes}")
        build_classifier(surrogate, 2, 1)  # checks the name
        self.num_classes = None if num_classes is None else int(num_classes)
        self.mask_ratio, self.steps, self.train_steps = float(mask_ratio), int(steps), int(train_steps)
        self.rounds, self.stop_error, self.surrogate = int(rounds), float(stop_error), surrogate
        self.batch, self.max_side, self.lr = int(batch), int(max_side), float(lr)
        if not 0.0 <= float(inner_stop) < 10.0:
            raise ConfigError(f"salm: inner_stop must be in [0, 10), got {inner_stop}")
        self.inner_stop = float(inner_stop)
        self.augment = bool(augment)
        self.robust, self.robust_steps = parse_robust(robust, robust_steps, "salm")
        if init not in INITS:
            raise ConfigError(f"salm: init must be one of {', '.join(INITS)}, got '{init}'")
        self.init = init
        if int(tile) != tile or not 1 <= tile <= 64:
            raise ConfigError(f"salm: tile must be an integer in 1..64, got {tile}")
        self.tile = int(tile)
        if objective not in OBJECTIVES:
            raise ConfigError(f"salm: objective must be one of {', '.join(OBJECTIVES)}, got '{objective}'")
        self.objective = objective
        if mask_scope not in MASK_SCOPES:
            raise ConfigError(f"salm: mask_scope must be one of {', '.join(MASK_SCOPES)}, got '{mask_scope}'")
        self.mask_scope = mask_scope
        if upscale not in ("nearest", "bilinear"):
            raise ConfigError(f"salm: upscale must be nearest or bilinear, got '{upscale}'")
        if upscale == "bilinear" and self.mask_ratio < 1.0:
            raise ConfigError("salm: upscale=bilinear spreads a sparse support over its neighbours; "
                              "it needs dense noise (mask_ratio 1)")
        self.resize_mode = upscale
        self._steps_spent = 0
        self.size: tuple[int, int] | None = None
        self.channels: int | None = None
        self.model: nn.Module | None = None
        self.noise: torch.Tensor | None = None  # N x C x S x S float32
        self.table = ClusterTable()  # image id -> row of ``noise``
        self.history: list[dict[str, float]] = []

    # -- fitting ---------------------------------------------------------------------------
    def _working_size(self, data: FitData) -> tuple[int, int]:
        if not data.sizes:
            return (32, 32)
        h = int(statistics.median(s[0] for s in data.sizes))
        w = int(statistics.median(s[1] for s in data.sizes))
        scale = min(1.0, self.max_side / max(h, w))
        return (max(4, round(h * scale)), max(4, round(w * scale)))

    def _collect(self, data: FitData, only: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        assert data.batches is not None and self.size is not None and self.channels is not None
        per_image = self.channels * self.size[0] * self.size[1] * 4
        count = len(data.ids) if only is None else len(only)
        if count * per_image * 3 > data.memory:  # images, noise, and a gradient-sized working copy
            raise ConfigError(f"salm: {count} images at {self.size[0]}x{self.size[1]} need about "
                              f"{count * per_image * 3 >> 20} MiB to fit; raise --memory or lower max_side")
        xs, where = [], []
        for images, idx in data.batches(self.size, channels=self.channels, batch_size=256, only=only):
            xs.append(images)
            where.extend(idx)
        if not xs:
            raise ConfigError("salm: none of the images could be read for fitting")
        return torch.cat(xs), where

    def _view(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """What the attacker trains on: the published file's JPEG round trip (``jpeg``), then the
        random flips and crops (``augment``); ``x`` itself with neither."""
        if self.jpeg is not None:
            x = random_jpeg(x, gen, *self.jpeg)
        return random_flip_crop(x, gen) if self.augment else x

    def _grad_x(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                gen: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
        """Gradient of the summed loss with respect to the input (through :meth:`_view` when ``gen``
        is given), and the largest per-image loss."""
        x = x.detach().requires_grad_(True)
        losses = F.cross_entropy(model(self._view(x, gen) if gen is not None else x), y, reduction="none")
        (g,) = torch.autograd.grad(losses.sum(), x)
        return g, float(losses.detach().max())

    def _adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """``x`` moved within ``robust`` to raise the loss (``x`` itself when ``robust`` is 0)."""
        return linf_ascent(lambda z: F.cross_entropy(model(z), y, reduction="sum"), x, self.robust,
                           self.robust_steps, gen)

    def _class_saliency(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor,
                        dev: torch.device) -> torch.Tensor:
        """``classes x 1 x H x W``: each class's summed saliency, every image's map normalised to sum 1."""
        assert self.num_classes is not None
        total = torch.zeros(self.num_classes, 1, *x.shape[2:])
        for i in range(0, x.shape[0], self.batch):
            xb, yb = x[i:i + self.batch].to(dev), y[i:i + self.batch]
            s = saliency(self._grad_x(model, (xb + delta[i:i + self.batch].to(dev)).clamp(0, 1), yb.to(dev))[0]).cpu()
            s = s / s.flatten(1).sum(1).clamp_min(1e-30).view(-1, 1, 1, 1)
            total.index_add_(0, yb, s)
        return total

    def _noise_round(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor,
                     gen: torch.Generator, dev: torch.device, rgen: torch.Generator) -> torch.Tensor:
        """Recompute the masks, then ``steps`` loss-minimising steps on every batch (model frozen)."""
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        per_class = self._class_saliency(model, x, y, delta, dev) if self.mask_scope == "class" else None
        order = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], self.batch):
            b = order[i:i + self.batch]
            xb, yb = x[b].to(dev), y[b].to(dev)
            d = delta[b].to(dev)
            if per_class is None:
                mask = saliency_mask(self._grad_x(model, (xb + d).clamp(0, 1), yb)[0], self.mask_ratio)
            else:
                mask = top_positions(per_class[y[b]].to(dev), self.mask_ratio)
            d = d * mask
            weights = self._weights(xb)  # the batch's images do not change during its steps
            for _ in range(self.steps):
                # robust noise: the loss is lowered at the worst point within `robust` of x + delta
                point = self._adversarial(model, (xb + self._weigh(d, xb, weights)).clamp(0, 1), yb, rgen)
                g, worst = self._grad_x(model, point, yb, gen if self.augment or self.jpeg else None)
                if worst < self.inner_stop:  # every image of the batch is already learnt with confidence
                    break
                d = signed_step(d, g, self.step_size, self.eps) * mask
                d = (xb + d).clamp(0, 1) - xb  # keep x + delta in range (as the EM paper does)
                self._steps_spent += 1
            delta[b] = d.cpu()
        for p in model.parameters():
            p.requires_grad_(True)
        return delta

    def _start(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The noise the optimisation starts from, within eps and keeping ``x + delta`` in range:
        uniform per pixel (``init="uniform"``), or one keyed +-eps sign pattern per class
        (``"classwise"``, drawn from the ``salm/classwise`` stream: a class-consistent start that
        the error-minimising steps then refine)."""
        if self.init == "classwise":
            assert self.num_classes is not None
            patterns = torch.randint(0, 2, (self.num_classes, *x.shape[1:]),
                                     generator=self.keyring.generator("salm/classwise")).float().mul_(2).sub_(1)
            delta = patterns[y].mul_(self.eps)
        elif self.init == "tile":
            assert self.num_classes is not None
            c, h, w = x.shape[1:]
            t = self.tile
            tiles = torch.randint(0, 2, (self.num_classes, c, t, t),
                                  generator=self.keyring.generator("salm/tile")).float().mul_(2).sub_(1)
            patterns = tiles.repeat(1, 1, -(-h // t), -(-w // t))[..., :h, :w]
            delta = patterns[y].mul_(self.eps)
        elif self.init == "zero":
            return torch.zeros_like(x)
        else:
            delta = (torch.rand(x.shape, generator=gen) * 2 - 1).mul_(self.eps)
        return (x + delta).clamp(0, 1) - x

    @torch.no_grad()
    def _error(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor,
               dev: torch.device) -> float:
        model.eval()
        wrong = 0
        for i in range(0, x.shape[0], 512):
            logits = model((x[i:i + 512] + self._weigh(delta[i:i + 512], x[i:i + 512])).clamp(0, 1).to(dev))
            wrong += int((logits.argmax(1).cpu() != y[i:i + 512]).sum())
        return wrong / max(1, x.shape[0])

    def fit(self, data: FitData) -> "SALM":
        super().fit(data)
        if self.num_classes is None:
            self.num_classes = data.num_classes
        if self.num_classes is None or self.num_classes < 2:
            raise ConfigError("salm: needs at least 2 classes")
        assert data.labels is not None
        self.size = self._working_size(data)
        self.channels = data.channels
        dev = torch.device(data.device)
        x, where = self._collect(data)
        y = torch.tensor([data.labels[i] for i in where], dtype=torch.long)
        if int(y.max()) >= self.num_classes:
            raise ConfigError(f"salm: labels must be below num_classes={self.num_classes}")
        model = keyed_init(build_classifier(self.surrogate, self.num_classes, self.channels),
                           self.keyring.generator("salm/init")).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        delta = self._start(x, y, self.keyring.generator("salm/noise"))
        gen = self.keyring.generator("salm/batches")
        rgen = self.keyring.generator("salm/robust")
        self.history = []
        if self.objective == "targeted":
            self._fit_targeted(model, opt, x, y, delta, gen, dev, rgen, data)
            self.table = ClusterTable.build([data.ids[i] for i in where], range(len(where)))
            self.fitted = True
            return self
        for r in range(self.rounds):
            self._train_surrogate(model, opt, x, y, delta, gen, dev, rgen)
            delta = self._noise_round(model, x, y, delta, gen, dev, rgen)
            err = self._error(model, x, y, delta, dev)
            self.history.append({"round": r + 1, "train_error": err, "noise_steps": self._steps_spent})
            log.info("salm: round %d, surrogate training error on protected data %.4f", r + 1, err)
            data.report("rounds", r + 1, self.rounds)
            if err < self.stop_error:
                break
        self.model = model.cpu().eval()
        self.noise = delta
        self.table = ClusterTable.build([data.ids[i] for i in where], range(len(where)))
        self.fitted = True
        return self

    def _target(self, y: torch.Tensor) -> torch.Tensor:
        """The labels the noise steps aim at: ``y`` (error-minimising) or the next class."""
        assert self.num_classes is not None
        return (y + 1) % self.num_classes if self.objective == "targeted" else y

    def _train_surrogate(self, model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                         delta: torch.Tensor | None, gen: torch.Generator, dev: torch.device,
                         rgen: torch.Generator) -> None:
        """``train_steps`` SGD steps of the surrogate on keyed mini-batches of ``x + delta`` (``x``
        itself when ``delta`` is None), through the attacker's views (:meth:`_view`) and
        adversarially when ``robust``."""
        model.train()
        for _ in range(self.train_steps):
            b = torch.randint(x.shape[0], (min(self.batch, x.shape[0]),), generator=gen)
            xb = x[b] if delta is None else (x[b] + self._weigh(delta[b], x[b])).clamp(0, 1)
            xb = self._view(xb.to(dev), gen)
            xb = self._adversarial(model, xb, y[b].to(dev), rgen)  # adversarial training when robust
            loss = F.cross_entropy(model(xb), y[b].to(dev))
            opt.zero_grad()
            loss.backward()
            opt.step()

    def _fit_targeted(self, model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                      delta: torch.Tensor, gen: torch.Generator, dev: torch.device, rgen: torch.Generator,
                      data: FitData) -> None:
        """``objective="targeted"``: train the surrogate on the clean images, then one round of
        steps towards the next class with the surrogate frozen."""
        for r in range(self.rounds):
            self._train_surrogate(model, opt, x, y, None, gen, dev, rgen)
            data.report("rounds", r + 1, self.rounds + 1)
        clean_error = self._error(model, x, y, torch.zeros_like(delta), dev)
        delta = self._noise_round(model, x, self._target(y), delta, gen, dev, rgen)
        err = self._error(model, x, y, delta, dev)
        self.history.append({"round": 1, "clean_error": clean_error, "train_error": err,
                             "noise_steps": self._steps_spent})
        log.info("salm: targeted, surrogate error on clean images %.4f, on protected images %.4f", clean_error, err)
        data.report("rounds", self.rounds + 1, self.rounds + 1)
        self.model = model.cpu().eval()
        self.noise = delta

    def extend(self, data: FitData) -> bool:
        """New images get noise against the stored surrogate (two mask-and-steps rounds)."""
        if self.model is None or self.noise is None:
            raise ConfigError("salm: no fitted state to extend")
        missing = self.table.missing(list(data.ids))
        if not missing:
            return False
        if data.labels is None:
            raise ConfigError("salm: new images need labels")
        x, where = self._collect(data, only=missing)
        y = torch.tensor([data.labels[i] for i in where], dtype=torch.long)
        dev = torch.device(data.device)
        model = self.model.to(dev)
        gen = self.keyring.generator("salm/extend")
        rgen = self.keyring.generator("salm/extend-robust")
        delta = self._start(x, y, gen)
        for _ in range(1 if self.objective == "targeted" else 2):
            delta = self._noise_round(model, x, self._target(y), delta, gen, dev, rgen)
        self.model = model.cpu().eval()
        start = self.noise.shape[0]
        self.noise = torch.cat([self.noise, delta])
        self.table = self.table.merged(ClusterTable.build([data.ids[i] for i in where],
                                                          range(start, start + len(where))))
        return True

    # -- protecting (the shared additive path, perturbations.additive) -----------------------
    def _indices(self, ids: Sequence[str] | None, n: int) -> list[int]:
        if self.noise is None:
            raise ConfigError("salm: call fit() first (or load a fitted state)")
        if ids is None or len(ids) != n:
            raise ConfigError("salm: apply needs one id (relative path) per image")
        try:
            return self.table.clusters_of(ids, "salm").tolist()
        except ConfigError as exc:
            raise InputError(str(exc).replace("clustered", "given noise") + "; rerun the command to protect it") from None

    def _source(self, index: int) -> torch.Tensor:
        assert self.noise is not None
        return self.noise[index:index + 1]

    def noise_of(self, ids: Sequence[str]) -> torch.Tensor:
        """The fitted noise (working size, float) of each image id."""
        assert self.noise is not None
        return self.noise[self.table.clusters_of(ids, "salm")]

    # -- state -----------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "eps": self.eps, "mask_ratio": self.mask_ratio, "steps": self.steps,
                "step_size": self.step_size, "train_steps": self.train_steps, "rounds": self.rounds,
                "stop_error": self.stop_error, "surrogate": self.surrogate, "batch": self.batch,
                "max_side": self.max_side, "lr": self.lr,
                "inner_stop": self.inner_stop, "augment": self.augment,
                "robust": self.robust, "robust_steps": self.robust_steps, "init": self.init, "mask_scope": self.mask_scope,
                "tile": self.tile, "objective": self.objective,
                "jpeg": range_text(self.jpeg),
                "budget": self.budget, "jnd_scale": self.jnd_scale, "upscale": self.resize_mode,
                "working_size": list(self.size) if self.size else None}

    def fit_report(self) -> dict[str, Any]:
        out = {"rounds": self.history, "stopped_early": self.objective == "min" and bool(self.history)
               and self.history[-1]["train_error"] < self.stop_error}
        if self.jpeg is not None:
            out["optimised_through_jpeg"] = f"quality {range_text(self.jpeg)}"
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.model is None or self.noise is None or self.size is None:
            return {}
        state = {f"surrogate.{k}": v.detach().clone() for k, v in self.model.state_dict().items()}
        state.update({"noise": self.noise.clone(), "table_hashes": self.table.hashes.clone(),
                      "table_clusters": self.table.clusters.clone(),
                      "size": torch.tensor(list(self.size)), "channels": torch.tensor(int(self.channels or 1))})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        size, channels = state.get("size"), state.get("channels")
        if size is None or channels is None or size.numel() != 2:
            raise ConfigError("salm: saved state has no working size")
        self.size, self.channels = (int(size[0]), int(size[1])), int(channels)
        weights = {k[len("surrogate."):]: v for k, v in state.items() if k.startswith("surrogate.")}
        head = weights.get("linear.weight")
        if head is None:
            raise ConfigError("salm: saved state has no surrogate weights")
        if self.num_classes is None:
            self.num_classes = int(head.shape[0])
        model = build_classifier(self.surrogate, self.num_classes, self.channels)
        try:
            model.load_state_dict(weights)
        except RuntimeError:
            raise ConfigError(f"salm: saved surrogate weights do not fit '{self.surrogate}' with "
                              f"{self.num_classes} classes") from None
        self.model = model.eval()
        noise = state.get("noise")
        self.noise = None if noise is None else noise.float().clone()
        self.table = ClusterTable(state.get("table_hashes"), state.get("table_clusters"))
        if self.noise is None:
            self.noise = torch.zeros(0, self.channels, *self.size)
        if float(self.noise.abs().max()) > self.eps + 1e-6 if self.noise.numel() else False:
            raise ConfigError("salm: saved noise exceeds the method's eps")
        self.fitted = True
