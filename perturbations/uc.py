"""Unlearnable Clusters (UC): label-agnostic protection from surrogate features.

Zhang, Ma, Yi, Sang, Xu, Jiang, Chen, "Unlearnable Clusters: Towards Label-agnostic Unlearnable
Examples", CVPR 2023. Implemented from the paper's description (the official code has no licence).

Fit (needs no labels):
1. Features of every image from a frozen surrogate (:mod:`perturbations.surrogates`; default: the
   paper's ``clip:RN50/openai`` where its weights are on the machine, else the bundled
   ``cifar-resnet20``, chosen when the parameters are resolved and said in ``surrogate_choice``),
   K-means with K clusters seeded from the key (:mod:`perturbations.clustering`); fewer images than
   K give one cluster per image (``clusters_used`` in the state and the fit report).
2. One additive perturbation ``delta_k`` per cluster, ``|delta_k|_inf <= eps``, shared by all its
   members, that drags their embeddings towards another cluster's centre: it minimises
   ``KL(softmax(mu_t) || softmax(f(clip(x + delta_k, 0, 1))))`` over the members ``x`` of cluster
   ``k``, the softmax over embedding dimensions, ``mu_t`` the mean raw feature of the target
   cluster ``t(k)``. Targets: a keyed derangement (a random K-cycle, so no cluster targets itself)
   instead of the paper's ``(k + 1) mod K``, which is the same kind of map with a key-dependent order.
3. ``mode="direct"`` (default): signed-gradient descent on ``delta_k`` itself (``steps`` steps, step
   size decaying linearly from ``eps / 4``), every step on a keyed mini-batch of ``batch`` members of
   every cluster (drawn with replacement, at most 8 per member, so a cluster of one photo does
   not spend a step on 16 copies of it), through random flips and padded crops (``augment``) so
   the perturbation survives the attacker's augmentation. ``mode="generator"`` is the paper's: one
   small residual generator per cluster from a fixed keyed noise input, ``eps * tanh`` output, Adam
   (lr 1e-4) for ``epochs`` epochs. Deliberate differences from the reference code: each generator
   is trained on its own cluster's members (the reference trains every generator on the whole
   dataset) and the surrogate stays in eval mode (the reference reads it with BatchNorm in train
   mode, so a batch's statistics leak into the perturbation).
   With ``resize="LO-HI"`` every loss first passes ``x + delta`` through the attacker's resize
   (upsampled to the photos' size as applied, shrunk to a keyed random size in [LO, HI] with
   antialiasing, back to ``S``), so ``delta`` is optimised for what survives the downscale an
   attacker's training pipeline makes (measured in docs/BENCHMARKS.md, "Photos"). With
   ``jpeg="LO-HI"`` it also passes a differentiable JPEG round trip at a keyed random quality in
   [LO, HI] (:func:`~perturbations.steps.random_jpeg`), where the file is published: at the
   photos' size with ``resize`` (before the attacker's downscale), else at ``S``; so a platform's
   re-encoding at quality 75-95 finds the perturbation already shaped to survive it. With
   ``budget="jnd"`` every loss sees ``x + w(x) * delta``, ``w`` the images' perceptual weights
   (:mod:`perturbations.masking`), as they will be applied.
4. Optimisation sees a keyed sample of the images (``samples``; default all that fit in the fit
   memory, at most 20,000) at the surrogate's input size ``S x S``; ``delta_k`` is defined there.

Apply: ``x' = clip(x + delta_k, 0, 1)`` at the image's own size: ``delta_k`` is resized bilinearly
(antialiased when shrinking; both are convex combinations, so the bound holds) to the image,
averaged over channels for grey images, and quantised to whole levels within ``floor(eps *
levels)``, so ``|x' - x| <= eps`` holds exactly in the written 8-bit or 16-bit file. The cluster of
an image comes from the fitted table (its relative path); new images join their nearest centre
(``extend``, used by ``protect images --state``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import register
from .additive import AdditivePerturbation
from .base import FitData, parse_fraction, parse_robust
from .clustered import MIN_FIT_IMAGES, TABLE_KEYS, SurrogateClusters
from .clustering import derangement
from .errors import ConfigError, InputError
from .keyring import Keyring
from .nets import keyed_init
from .steps import (linf_ascent, parse_quality_range, parse_size_range, random_flip_crop, random_jpeg, random_rescale,
                    range_text, signed_step)

log = logging.getLogger(__name__)

MODES = ("direct", "generator")
#: Largest number of images kept for the optimisation by default.
MAX_SAMPLES = 20000
#: Direct mode: a cluster draws at most this many augmented copies of each member per step (a
#: cluster of one photo draws 8, not ``batch``). Measured on the 16 Kodak photos (10 clusters of
#: 1-2 photos, 3 keys, ``python bench/uc_draws.py``): fit 116 -> 77 s, the held-out KL on fresh
#: augmentations 0.014 -> 0.014 (0.205 -> 0.207 scaled to 0.4); 4 copies: 41 s but 0.215 at 0.4.
DRAWS_PER_MEMBER = 8


def kl_to_target(features: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(softmax(target) || softmax(features))``, softmax over the embedding dimension."""
    logp = F.log_softmax(target_logits.float(), dim=1)
    logq = F.log_softmax(features.float(), dim=1)
    return (logp.exp() * (logp - logq)).sum(1)


class _Generator(nn.Module):
    """A small residual generator: fixed noise (C0 x S/4 x S/4) -> 3 x S x S in (-1, 1)."""

    def __init__(self, size: tuple[int, int], width: int = 32, z_channels: int = 16) -> None:
        super().__init__()
        self.size = size
        self.head = nn.Sequential(nn.Conv2d(z_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.tail = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.head(z)
        h = F.relu(h + self.body(h))
        h = F.interpolate(h, size=self.size, mode="bilinear", align_corners=False)
        return torch.tanh(self.tail(h))


@register
class UnlearnableClusters(AdditivePerturbation):
    """Unlearnable Clusters (Zhang et al., CVPR 2023): one bounded perturbation per surrogate cluster.

    Args:
        keyring: key material (streams ``uc/kmeans``, ``uc/sample``, ``uc/targets``, ``uc/init``,
            ``uc/steps``).
        clusters: K (default 10, the paper's).
        eps: L-inf bound in [0, 1] (default 16/255, the paper's); ``"16/255"`` strings accepted.
        surrogate: surrogate spec; default (``None``): ``clip:RN50/openai``, the paper's CLIP
            surrogate, where its weights are local, else the bundled ``cifar-resnet20``
            (:func:`~perturbations.surrogates.default_surrogate`; :meth:`resolve_params` fills it in).
        surrogate_weights: local weights file for the surrogate (nothing is downloaded offline).
        mode: ``"direct"`` (default) or ``"generator"`` (the paper's; see module doc).
        steps: direct mode: signed-gradient steps (default 100).
        batch: images per cluster per step (direct; at most 8 per member of a small cluster) or
            generator batch size / K (default 16).
        samples: images kept for the optimisation (default: all that fit the fit memory, <= 20,000).
        augment: optimise through random flips and crops (default True).
        epochs, lr: generator mode: epochs over each cluster's members (default 50) and Adam's rate
            (default 1e-4, the paper's).
        resize: ``"LO-HI"`` (e.g. ``"32-64"``; default off): optimise through the attacker's resize
            (:func:`~perturbations.steps.random_rescale`): the perturbation, upsampled to the photos'
            median shorter side as it is applied, is shrunk to a keyed random size in [LO, HI] px
            before the surrogate sees it, so what survives a downscale to the attacker's resolution is
            what is optimised (an expectation over resizes, on top of ``augment``'s flips and crops).
            Without it the fine, pixel-level pattern that wins at the surrogate's size is averaged
            away by an attacker who trains smaller than the photos.
        budget: ``"flat"`` (default: ``eps`` everywhere, the paper's) or ``"jnd"``: each pixel's
            change at most ``jnd_scale`` just-noticeable differences of the image it is applied to
            (:mod:`perturbations.masking`: less in flat mid-bright regions such as sky and skin, up
            to ``eps`` in dark and textured ones); the optimisation sees the weighted perturbation.
        jnd_scale: with ``budget="jnd"``: JNDs allowed per pixel (default 1).
        jpeg: ``"LO-HI"`` JPEG qualities (e.g. ``"75-95"``; default off): optimise through a
            differentiable JPEG round trip at a keyed random quality in [LO, HI] per image
            (:func:`~perturbations.steps.random_jpeg`), applied where the file is published (at the
            photos' size with ``resize``, else at the surrogate's), so the part of the perturbation a
            platform's re-encoding keeps is what is optimised. The written file itself is unchanged
            (the tool's own output quality is ``--quality``).
        robust: radius ``rho_a`` of robust perturbations (default 0: off): every step pulls towards
            the target from the worst point within ``rho_a`` of ``x + delta`` (``robust_steps`` PGD
            steps pushing the features away from the target, default 3), after robust
            error-minimising noise (Fu et al., ICLR 2022); about ``1 + robust_steps`` times the cost.

    Shapes: ``apply`` takes ``N x C x H x W`` float in [0, 1] with ``ids`` (relative paths) and
    returns the same; the perturbations are ``K x 3 x S x S`` at the surrogate's input size.
    """

    name = "uc"
    summary = "Unlearnable Clusters: one perturbation per surrogate feature cluster; needs no labels"
    paper = "Zhang et al., Unlearnable Clusters: Towards Label-agnostic Unlearnable Examples, CVPR 2023"
    needs_labels = False
    exact = False
    work_bytes_per_value = 10.0
    per_image_state = TABLE_KEYS
    cache_resized = True  # every member of a cluster shares its perturbation
    min_images = MIN_FIT_IMAGES
    measured = (
        {"setting": "--surrogate cifar-resnet20 (the default without CLIP weights)",
         "data": "CIFAR-10 train, 50,000 images, 32x32, quiet 2-core CPU", "psnr_db": 26.4, "images_per_second": 355.0,
         "source": "docs/BENCHMARKS.md: Label-agnostic protection"},
        {"setting": "--surrogate cifar-resnet56", "data": "CIFAR-10 subset, 10,000 images, 32x32, loaded 2-core CPU",
         "psnr_db": 26.5, "images_per_second": 23.0,
         "source": "docs/BENCHMARKS.md: Label-agnostic protection"},
        {"setting": "--surrogate clip:RN50/openai, CPU: the image features alone (upper bound)",
         "data": "224 px inputs, loaded 2-core CPU", "psnr_db": None, "images_per_second": 1.43,
         "source": "docs/BENCHMARKS.md: Label-agnostic protection"},
    )
    measured_note = ("the fit's optimisation (100 steps over every cluster by default) costs about the same for a "
                     "dozen photos as for thousands, so a small folder takes longer per image (not measured)")

    def __init__(
        self,
        keyring: Keyring,
        clusters: int = 10,
        eps: float | str = 16 / 255,
        surrogate: str | None = None,
        surrogate_weights: str | None = None,
        mode: str = "direct",
        steps: int = 100,
        batch: int = 16,
        samples: int | None = None,
        augment: bool = True,
        epochs: int = 50,
        lr: float = 1e-4,
        robust: float | str = 0.0,
        robust_steps: int = 3,
        resize: str | None = None,
        jpeg: str | None = None,
        budget: str = "flat",
        jnd_scale: float = 1.0,
    ) -> None:
        super().__init__(keyring)
        self._init_budget(budget, jnd_scale)
        try:
            self.resize = parse_size_range(resize, "uc: resize")
            self.jpeg = parse_quality_range(jpeg, "uc: jpeg")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        #: Side (px) the perturbation is upsampled to inside the optimisation (with ``resize``), from fit.
        self.resize_from: int | None = None
        self.eps = parse_fraction(eps, "uc: eps")
        if not 0.0 < self.eps <= 1.0:
            raise ConfigError(f"uc: eps must be in (0, 1], got {eps}")
        if mode not in MODES:
            raise ConfigError(f"uc: mode must be one of {', '.join(MODES)}, got '{mode}'")
        for name, value in (("steps", steps), ("batch", batch), ("epochs", epochs)):
            if int(value) != value or value < 1:
                raise ConfigError(f"uc: {name} must be an integer >= 1, got {value}")
        if samples is not None and (int(samples) != samples or samples < 1):
            raise ConfigError(f"uc: samples must be an integer >= 1, got {samples}")
        if not 0.0 < float(lr) < 1.0:
            raise ConfigError(f"uc: lr must be in (0, 1), got {lr}")
        self.clusters = SurrogateClusters(keyring, clusters, surrogate, surrogate_weights, "uc")
        #: One line: which surrogate and why (e.g. ``surrogate: cifar-resnet20 (bundled; ...)``).
        self.surrogate_choice = self.clusters.surrogate_choice
        self.mode, self.steps, self.batch = mode, int(steps), int(batch)
        self.samples = None if samples is None else int(samples)
        self.augment, self.epochs, self.lr = bool(augment), int(epochs), float(lr)
        self.robust, self.robust_steps = parse_robust(robust, robust_steps, "uc")
        self.deltas: torch.Tensor | None = None  # K x 3 x S x S, float32 in [-eps, eps]
        self.targets: torch.Tensor | None = None  # K
        self.final_loss: float | None = None

    # -- fitting ---------------------------------------------------------------------------
    def fit(self, data: FitData) -> "UnlearnableClusters":
        super().fit(data)
        s = self.clusters.surrogate(data.device)
        h, w = s.input_size
        keep = self.samples or max(1, min(MAX_SAMPLES, data.memory // (3 * h * w)))
        if self.resize is not None:
            sides = sorted(min(a, b) for a, b in data.sizes) or [max(h, w)]
            # the photos' typical size, capped: beyond 4x the attacker's largest size the up-then-down
            # operator no longer changes (and the batch would not fit the fit memory)
            self.resize_from = max(h, w, min(sides[len(sides) // 2], 4 * max(self.resize[1], h, w)))
        feats, where, images, kept_at = self.clusters.features(data, keep=keep)
        assign = self.clusters.cluster(feats, where, list(data.ids))
        of = dict(zip(where, assign.tolist()))
        assert images is not None
        member = torch.tensor([of[p] for p in kept_at], dtype=torch.long)
        k = self.clusters.k_eff
        self.targets = derangement(k, self.keyring.generator("uc/targets"))
        assert self.clusters.means is not None
        target_logits = self.clusters.means[self.targets].to(s.device)
        if self.mode == "direct":
            self.deltas = self._direct(s, images, member, target_logits, data)
        else:
            self.deltas = self._generators(s, images, member, target_logits, data)
        self.clear_cache()
        self.clusters.release()
        self.fitted = True
        return self

    def _batch(self, members: list[torch.Tensor], gen: torch.Generator, size: int) -> torch.Tensor:
        """Positions of ``size`` keyed members of every non-empty cluster, drawn with replacement,
        at most :data:`DRAWS_PER_MEMBER` per member (a small cluster draws fewer)."""
        picks = []
        for m in members:
            if m.numel():
                n = min(size, DRAWS_PER_MEMBER * m.numel())
                picks.append(m[torch.randint(m.numel(), (n,), generator=gen)])
        return torch.cat(picks)

    def _loss(self, s: Any, x: torch.Tensor, target: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        publish = None
        if self.jpeg is not None:
            lo, hi = self.jpeg
            publish = lambda z: random_jpeg(z, gen, lo, hi)  # noqa: E731
        if self.resize is not None and self.resize_from is not None:
            x = random_rescale(x, gen, self.resize_from, *self.resize, publish=publish)
        elif publish is not None:
            x = publish(x)
        if self.augment:
            x = random_flip_crop(x, gen)
        return kl_to_target(s.features(x), target).sum()

    def _worst(self, s: Any, point: torch.Tensor, target: torch.Tensor, rgen: torch.Generator) -> torch.Tensor:
        """``point`` (carrying its gradient) moved to the worst place within ``robust`` for the
        perturbation (the farthest from its target); ``point`` itself when ``robust`` is 0."""
        if self.robust <= 0:
            return point
        adv = linf_ascent(lambda z: self._loss(s, z, target, rgen), point, self.robust, self.robust_steps, rgen)
        return point + (adv - point.detach())

    def _direct(self, s: Any, images: torch.Tensor, member: torch.Tensor, target_logits: torch.Tensor,
                data: FitData) -> torch.Tensor:
        k, eps, dev = self.clusters.k_eff, self.eps, s.device
        gen = self.keyring.generator("uc/steps")
        init = self.keyring.generator("uc/init")
        rgen = self.keyring.generator("uc/robust")
        delta = (torch.rand(k, 3, *images.shape[-2:], generator=init) * 2 - 1).mul_(eps).to(dev)
        members = [(member == c).nonzero().flatten() for c in range(k)]
        loss_sum = 0.0
        for step in range(self.steps):
            pos = self._batch(members, gen, self.batch)
            x = images[pos].to(dev).float().div_(255)
            c = member[pos].to(dev)
            delta.requires_grad_(True)
            point = self._worst(s, (x + self._weigh(delta[c], x)).clamp(0, 1), target_logits[c], rgen)
            loss = self._loss(s, point, target_logits[c], gen)
            (grad,) = torch.autograd.grad(loss, delta)
            alpha = eps * 0.25 * (1.0 - step / self.steps) + eps / 100
            delta = signed_step(delta.detach(), grad, alpha, eps)
            loss_sum = float(loss.detach()) / pos.numel()
            data.report("optimise", step + 1, self.steps)
        self.final_loss = loss_sum
        log.info("uc: direct optimisation, %d steps, final mean KL %.4f", self.steps, loss_sum)
        return delta.detach().cpu()

    def _generators(self, s: Any, images: torch.Tensor, member: torch.Tensor, target_logits: torch.Tensor,
                    data: FitData) -> torch.Tensor:
        k, eps, dev = self.clusters.k_eff, self.eps, s.device
        size = tuple(images.shape[-2:])
        gen = self.keyring.generator("uc/steps")
        init = self.keyring.generator("uc/init")
        rgen = self.keyring.generator("uc/robust")
        out = torch.zeros(k, 3, *size)
        members = [(member == c).nonzero().flatten() for c in range(k)]
        total = k * self.epochs
        for c in range(k):
            g = _Generator(size)  # type: ignore[arg-type]
            keyed_init(g, init)
            g.to(dev)
            z = torch.randn(1, 16, max(1, size[0] // 4), max(1, size[1] // 4), generator=init).to(dev)
            opt = torch.optim.Adam(g.parameters(), lr=self.lr)
            m = members[c]
            loss = torch.tensor(0.0)
            for epoch in range(self.epochs):
                if m.numel():
                    order = m[torch.randperm(m.numel(), generator=gen)]
                    for i in range(0, order.numel(), self.batch * k):
                        pos = order[i:i + self.batch * k]
                        x = images[pos].to(dev).float().div_(255)
                        delta = eps * g(z)
                        target = target_logits[c].expand(pos.numel(), -1)
                        point = (x + self._weigh(delta, x)).clamp(0, 1)
                        loss = self._loss(s, self._worst(s, point, target, rgen), target, gen)
                        opt.zero_grad()
                        (loss / pos.numel()).backward()
                        opt.step()
                data.report("optimise", c * self.epochs + epoch + 1, total)
            g.eval()  # the generator's own BatchNorm: running statistics for the final read-out
            with torch.no_grad():
                out[c] = (eps * g(z)).clamp(-eps, eps)[0].cpu()
            self.final_loss = float(loss.detach()) / max(1, self.batch * k)
        return out

    def extend(self, data: FitData) -> bool:
        return self.clusters.extend(data)

    def fit_report(self) -> dict[str, Any]:
        out = self.clusters.report()
        if self.final_loss is not None:
            out["final_mean_kl"] = round(self.final_loss, 6)
        if self.resize is not None and self.resize_from is not None:
            out["optimised_through"] = (f"upsampling to {self.resize_from} px, then the attacker's resize to "
                                        f"{range_text(self.resize)} px")
        if self.jpeg is not None:
            out["optimised_through_jpeg"] = f"quality {range_text(self.jpeg)}"
        return out

    def notes(self) -> list[str]:
        return self.clusters.notes()

    @classmethod
    def weights_info(cls) -> dict[str, Any]:
        from .surrogates import default_surrogate_info

        return default_surrogate_info()

    @classmethod
    def resolve_params(cls, given: dict[str, Any]) -> dict[str, Any]:
        """As the base class's, with the default surrogate made concrete (see ``surrogate``)."""
        params = super().resolve_params(given)
        if params.get("surrogate") is None:
            from .surrogates import default_surrogate

            params["surrogate"] = default_surrogate(params.get("surrogate_weights"))[0]
        return params

    # -- protecting (the shared additive path, perturbations.additive) -----------------------
    def _indices(self, ids: Sequence[str] | None, n: int) -> list[int]:
        if self.deltas is None:
            raise ConfigError("uc: call fit() first (or load a fitted state)")
        if ids is None or len(ids) != n:
            raise ConfigError("uc: apply needs one id (relative path) per image")
        try:
            return self.clusters.table.clusters_of(ids, "uc").tolist()
        except ConfigError as exc:
            raise InputError(f"{exc}; rerun the command to assign it") from None

    def _source(self, index: int) -> torch.Tensor:
        assert self.deltas is not None
        return self.deltas[index:index + 1]

    def cluster_of(self, ids: Sequence[str]) -> list[int]:
        """The fitted cluster of each image id."""
        return self.clusters.table.clusters_of(ids, "uc").tolist()

    # -- state -----------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        return {**self.clusters.params(), "eps": self.eps, "mode": self.mode, "steps": self.steps,
                "batch": self.batch, "samples": self.samples, "augment": self.augment,
                "epochs": self.epochs, "lr": self.lr, "robust": self.robust, "robust_steps": self.robust_steps,
                "resize": range_text(self.resize), "jpeg": range_text(self.jpeg),
                "budget": self.budget, "jnd_scale": self.jnd_scale}

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.deltas is None or self.targets is None:
            return {}
        return {**self.clusters.state_dict(), "deltas": self.deltas.clone(), "targets": self.targets.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.clusters.load_state_dict(state)
        deltas, targets = state.get("deltas"), state.get("targets")
        k = self.clusters.k_eff
        if deltas is None or deltas.ndim != 4 or deltas.shape[:2] != (k, 3):
            raise ConfigError("uc: saved state has no valid 'deltas' (K x 3 x S x S)")
        if float(deltas.abs().max()) > self.eps + 1e-6:
            raise ConfigError("uc: saved perturbations exceed the method's eps")
        if targets is None or targets.shape != (k,):
            raise ConfigError("uc: saved state has no valid cluster targets")
        self.deltas, self.targets = deltas.float().clone(), targets.long().clone()
        self.clear_cache()
        self.fitted = True
