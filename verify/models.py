"""Surrogate model registry (timm style): ``@register_model``, ``list_models``, ``create_model``.

>>> list_models("resnet*")
['resnet18', 'resnet20', 'resnet32', 'resnet44', 'resnet56']
>>> model = create_model("resnet20", num_classes=10, weights="resnet20-12fca82f.th")

Every model takes float32 images in [0, 1], ``N x C x H x W``, and returns ``N x num_classes`` logits.

Registered models (ours) share :class:`Classifier`: a ``normalize`` prefix (``nn.Identity`` by
default, so it adds no state; a :class:`Normalize` with mean/std buffers when the weights need it,
e.g. the akamaster CIFAR-10 checkpoints), ``forward_features`` (penultimate embedding, ``N x
num_features``) and a ``linear`` head. Any torchvision classification model is also available by name
(``"tv:resnet50"``, or a plain torchvision name not in the registry); it is returned unchanged (a plain
torchvision module with torchvision's state-dict keys, no normalisation prefix), built with
``weights=None``. Nothing is ever downloaded: ``weights=`` is always a local file.

The architectures shared with the protection methods (:class:`Classifier`, :class:`Normalize`, the
CIFAR ResNet-20/32/44/56, the torchvision builder) and the checkpoint loader live in
:mod:`perturbations.nets` and :mod:`perturbations.weights`; this module adds the verify-only nets
(fastcnn, vgg3, ResNet-18) and the registry.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from perturbations.errors import ConfigError, WeightsError
from perturbations.nets import (
    BasicBlock,
    FastCNN,
    AKAMASTER_MEAN,
    AKAMASTER_STD,
    CifarResNetA,
    Classifier,
    Normalize,
    conv3x3,
    torchvision_model,
    torchvision_names,
)
from perturbations.weights import TORCHVISION_DOCS, load_weights

__all__ = [
    "AKAMASTER_MEAN",
    "AKAMASTER_STD",
    "Classifier",
    "Normalize",
    "create_model",
    "list_models",
    "register_model",
]

_TV_PREFIX = "tv:"

ModelFn = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFn] = {}


def register_model(fn: ModelFn) -> ModelFn:
    """Decorator: register ``fn(num_classes, in_channels, image_size) -> nn.Module`` as ``fn.__name__``."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching the fnmatch ``pattern``, sorted (torchvision names not listed)."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


# --------------------------------------------------------------------------------------------
# ResNet-18 for small images (fastcnn and the CIFAR ResNet-20/32/44/56 live in perturbations.nets)


class CifarResNet18(Classifier):
    """ResNet-18 for small images: 3x3 stem, stride 1, no max-pool, BasicBlocks [2,2,2,2],
    widths 64/128/256/512 (1x1 conv shortcuts), global average pool, linear."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, 64)
        self.bn1 = nn.BatchNorm2d(64)
        c = 64
        for i, (w, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(c, w, stride, "B"), BasicBlock(w, w, 1, "B")))
            c = w
        self.num_features = c
        self.linear = nn.Linear(c, num_classes)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


# --------------------------------------------------------------------------------------------
# Registry entries


#: From this input size up, the quick tier's learners (``fastcnn``, ``fastcnn_wide``, ``fastcnn_xl``)
#: start with a stride-2 convolution, as ImageNet networks' stems downsample before their blocks: a
#: 64-px cell then costs what a 32-px one does instead of 4x, while the learned 3x3 filter still
#: sees every input pixel. On 800 flowers128 photos at 64 px (``bench/learner_stem.py``, 3 seeds) the
#: strided learner reached 63.9 % clean against 62.5 % at full resolution and learned CUDA-protected
#: photos at least as well (61.6 % against 60.1 %), in a quarter of the time.
STEM_STRIDE_FROM = 64


def _stem(image_size: int) -> int:
    return 2 if image_size >= STEM_STRIDE_FROM else 1


@register_model
def fastcnn(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Quick-tier surrogate (:class:`FastCNN`: one-conv blocks 16/32/64/128; a stride-2 first
    convolution from :data:`STEM_STRIDE_FROM` px up)."""
    return FastCNN(num_classes, in_channels, stem_stride=_stem(image_size))


@register_model
def fastcnn_wide(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """:class:`FastCNN` with one-conv blocks 32/64/128/256: 4x the multiply-adds of ``fastcnn`` (the
    same stride-2 stem from :data:`STEM_STRIDE_FROM` px up)."""
    return FastCNN(num_classes, in_channels, widths=(32, 64, 128, 256), stem_stride=_stem(image_size))


@register_model
def fastcnn_xl(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """:class:`FastCNN` with one-conv blocks 48/96/192/384: 2.25x the multiply-adds of ``fastcnn_wide``
    (a candidate adversarial-training learner, ``bench/at_learner.py``; the same stride-2 stem)."""
    return FastCNN(num_classes, in_channels, widths=(48, 96, 192, 384), stem_stride=_stem(image_size))


@register_model
def vgg3(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """The issue's calibration net: 3 blocks of two 3x3 convs, widths 32/64/128 (:class:`FastCNN`)."""
    return FastCNN(num_classes, in_channels, widths=(32, 64, 128), convs=2, pool_last=True)


@register_model
def resnet18(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """ResNet-18: the CIFAR variant for ``image_size <= 64``, else torchvision's (first conv adapted)."""
    if image_size <= 64:
        return CifarResNet18(num_classes, in_channels)
    return torchvision_model("resnet18", num_classes, in_channels)


@register_model
def resnet20(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """CIFAR ResNet-20 (n=3), option A shortcuts."""
    return CifarResNetA(3, num_classes, in_channels)


@register_model
def resnet32(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """CIFAR ResNet-32 (n=5), option A shortcuts."""
    return CifarResNetA(5, num_classes, in_channels)


@register_model
def resnet44(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """CIFAR ResNet-44 (n=7), option A shortcuts."""
    return CifarResNetA(7, num_classes, in_channels)


@register_model
def resnet56(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """CIFAR ResNet-56 (n=9), option A shortcuts."""
    return CifarResNetA(9, num_classes, in_channels)


# --------------------------------------------------------------------------------------------
# Public factory


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    weights: str | os.PathLike | None = None,
) -> nn.Module:
    """Build surrogate ``name`` for ``in_channels x image_size x image_size`` inputs in [0, 1].

    ``name`` is a registered model (:func:`list_models`), ``"tv:<name>"`` or a plain torchvision
    classification model name not in the registry (built with ``weights=None``). ``weights`` is a
    local checkpoint path (a state dict, optionally under ``'state_dict'``, ``module.`` prefixes
    stripped); akamaster checkpoints also install their input normalisation as ``model.normalize``.
    Raises :class:`ConfigError` for unknown names or bad sizes, :class:`WeightsError` for missing or
    unfitting weights. Nothing is downloaded.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(f"in_channels must be a positive integer, got {in_channels!r}")
    if not isinstance(image_size, int) or image_size < 8:
        raise ConfigError(f"image_size must be an integer >= 8 px, got {image_size!r}")

    if name in _REGISTRY:
        model = _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    else:
        tv_name = name[len(_TV_PREFIX):] if name.startswith(_TV_PREFIX) else name
        if tv_name not in torchvision_names():
            raise ConfigError(
                f"unknown model '{name}'; available: {', '.join(list_models())}, "
                "or any torchvision classification model as 'tv:<name>' (e.g. tv:resnet50)"
            )
        model = torchvision_model(tv_name, num_classes, in_channels)

    if weights is not None:
        if not isinstance(weights, (str, os.PathLike)):
            raise WeightsError(
                f"model '{name}': weights must be the path of a local file, got {weights!r}; nothing is "
                f"downloaded (torchvision's weight URLs are listed in the torchvision docs, {TORCHVISION_DOCS})"
            )
        load_weights(model, weights, name, torchvision=name.startswith(_TV_PREFIX) or name not in _REGISTRY)
    return model
