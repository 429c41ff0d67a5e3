"""Attackers who start from a pretrained model: a linear probe on frozen features, or fine-tuning.

Every scratch learner of :mod:`verify.models` trains from random weights. Real attackers often start
from a pretrained network: they fit a new linear head on its frozen features (``probe:SPEC``) or
fine-tune all of its weights with a small learning rate (``finetune:SPEC``). The CUDA paper reports
42.42 % (full fine-tuning) and 48.22 % (new linear head) on CUDA CIFAR-10 from an ImageNet
ResNet-18, where training from scratch gets far less: pretrained priors are an attack of their own.

``SPEC`` is any surrogate spec of :mod:`perturbations.surrogates` (``clip:ARCH/TAG``,
``torchvision:NAME:PATH``, ``cifar-resnetNN[:PATH]``, ``random:ARCH``). The learner runs at the
backbone's input size with its own preprocessing (the surrogate resizes, antialiased, and
normalises inside; grey images are repeated to three channels); crops, flips and defenses are
applied at the data's own size before that, as for every learner. Nothing is downloaded: missing
weights fail in one line, as the surrogates do, when the options are checked. The certificate
records the backbone's canonical spec and the SHA-256 of its weights (:func:`learner_info`).

Do not use weights trained on the very images being certified (the bundled CIFAR ResNets were
trained on CIFAR-10's clean training set): that attacker has seen the clean images already.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from perturbations.errors import ConfigError
from perturbations.keyring import Keyring
from perturbations.surrogates import Surrogate, load_surrogate, parse_spec

__all__ = ["FINETUNE_LR_SCALE", "KINDS", "PretrainedLearner", "build_learner", "is_pretrained", "learner_info",
           "split_learner"]

KINDS = ("probe", "finetune")
#: Fine-tuning uses the tier's learning rate times this (a pretrained network needs small steps).
FINETUNE_LR_SCALE = 0.1
#: ``random:`` backbones are keyed; verification has no owner key, so they come from this fixed seed.
RANDOM_BACKBONE_SEED = 0


def split_learner(name: str) -> tuple[str, str] | None:
    """``("probe", SPEC)`` / ``("finetune", SPEC)`` for a pretrained learner name, else None."""
    kind, sep, spec = name.partition(":")
    if sep and kind in KINDS:
        if not spec:
            raise ConfigError(f"'{name}': name a backbone, e.g. {kind}:cifar-resnet56 or {kind}:clip:RN50/openai")
        return kind, spec
    return None


def is_pretrained(name: str | None) -> bool:
    return name is not None and split_learner(name) is not None


@functools.lru_cache(maxsize=8)
def _load(spec: str) -> Surrogate:
    """The backbone of ``spec`` (loaded once per process; a copy is made for every cell)."""
    kind, _, _ = parse_spec(spec)
    keyring = Keyring.from_seed(RANDOM_BACKBONE_SEED) if kind == "random" else None
    return load_surrogate(spec, keyring=keyring)


def learner_info(name: str) -> dict[str, Any]:
    """What the certificate records of a pretrained learner: kind, the backbone's canonical spec, the
    SHA-256 of its weights ("" for keyed random weights) and its input size. Loads the backbone
    (ConfigError / WeightsError in one line when the spec is bad or its weights are not here)."""
    parts = split_learner(name)
    if parts is None:
        return {"kind": "scratch", "model": name}
    kind, spec = parts
    s = _load(spec)
    return {"kind": kind, "backbone": s.spec, "weights_sha256": s.weights_sha256, "input_size": list(s.input_size),
            "feature_dim": s.feature_dim, "lr_scale": FINETUNE_LR_SCALE if kind == "finetune" else 1.0}


class PretrainedLearner(nn.Module):
    """A pretrained backbone and a new linear head. ``probe``: the backbone is frozen and stays in
    eval mode (its BatchNorm statistics too); ``finetune``: every weight trains, and the training
    loop scales its learning rate by :attr:`lr_scale`."""

    def __init__(self, backbone: Surrogate, num_classes: int, kind: str) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ConfigError(f"unknown learner kind '{kind}'; use {' or '.join(KINDS)}")
        import copy

        self.kind = kind
        self.spec = backbone.spec
        self.input_size = backbone.input_size
        self.backbone = copy.deepcopy(backbone.module).cpu()
        for p in self.backbone.parameters():
            p.requires_grad_(kind == "finetune")
        self.head = nn.Linear(backbone.feature_dim, num_classes)
        self.lr_scale = FINETUNE_LR_SCALE if kind == "finetune" else 1.0

    def train(self, mode: bool = True) -> PretrainedLearner:
        super().train(mode)
        if self.kind == "probe":
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x.float(), size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        return self.head(self.backbone(x).float())


def build_learner(name: str, num_classes: int, in_channels: int) -> PretrainedLearner:
    """The pretrained learner ``probe:SPEC`` / ``finetune:SPEC`` for ``num_classes`` classes."""
    parts = split_learner(name)
    if parts is None:
        raise ConfigError(f"'{name}' is not a pretrained learner (probe:SPEC or finetune:SPEC)")
    if in_channels not in (1, 3):
        raise ConfigError(f"{name}: a pretrained backbone takes 1- or 3-channel images, got {in_channels}")
    kind, spec = parts
    return PretrainedLearner(_load(spec), num_classes, kind)
