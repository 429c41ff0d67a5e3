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
"""

from __future__ import annotations

import fnmatch
import logging
import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from perturbations.errors import ConfigError, WeightsError

__all__ = [
    "AKAMASTER_MEAN",
    "AKAMASTER_STD",
    "Classifier",
    "Normalize",
    "create_model",
    "list_models",
    "register_model",
]

log = logging.getLogger(__name__)

#: Input normalisation the akamaster CIFAR-10 ResNets were trained with (ImageNet statistics).
AKAMASTER_MEAN = (0.485, 0.456, 0.406)
AKAMASTER_STD = (0.229, 0.224, 0.225)

_TV_PREFIX = "tv:"
_TV_DOCS = "https://pytorch.org/vision/stable/models.html"
_WEIGHT_SUFFIXES = {".pt", ".pth", ".th", ".bin", ".ckpt", ".tar", ".pkl", ".safetensors"}

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
# Building blocks


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean and std are buffers, so they travel in the state dict."""

    def __init__(self, mean: tuple[float, ...] | torch.Tensor, std: tuple[float, ...] | torch.Tensor) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        if mean_t.shape != std_t.shape or bool((std_t <= 0).any()):
            raise ConfigError(f"Normalize needs mean and std of equal length and std > 0, got {mean}, {std}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class Classifier(nn.Module):
    """Base of the registered models: ``normalize`` -> ``forward_features`` body -> ``linear``.

    Subclasses build ``self.linear`` and implement :meth:`_features` (normalised input to the
    ``N x num_features`` embedding).
    """

    num_features: int
    linear: nn.Linear

    def __init__(self) -> None:
        super().__init__()
        self.normalize: nn.Module = nn.Identity()

    def set_normalization(self, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> None:
        """Install a :class:`Normalize` prefix, or remove it with ``mean = std = None``."""
        if mean is None and std is None:
            self.normalize = nn.Identity()
        elif mean is None or std is None:
            raise ConfigError("set_normalization needs both mean and std (or neither)")
        else:
            self.normalize = Normalize(mean, std)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding, ``N x num_features``."""
        return self._features(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x))


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


# --------------------------------------------------------------------------------------------
# fastcnn: the quick-tier surrogate


class FastCNN(Classifier):
    """Small VGG-style CNN: blocks of ``convs`` x (3x3 conv, no bias, + BN + ReLU), 2x2 max-pool
    between blocks (and after the last when ``pool_last``), global average pool, linear.

    Defaults (the quick tier's ``fastcnn``): four one-conv blocks 16/32/64/128, about 4 M
    multiply-adds per 32x32 image. On the 10k CIFAR-10 subset with the quick recipe (2 CPU cores)
    it reaches 67 % clean test accuracy in about 70 s of training; ``fastcnn_wide`` (32/64/128/256)
    reaches 71.5 % in about 165 s, and :func:`vgg3` (the issue's calibration net, ``widths=(32, 64,
    128), convs=2, pool_last=True``) about 75 % at 2.5x the cost of ``fastcnn_wide``. Inputs >= 8 px,
    any channel count."""

    def __init__(self, num_classes: int, in_channels: int = 3, widths: tuple[int, ...] = (16, 32, 64, 128),
                 convs: int = 1, pool_last: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            for j in range(convs):
                layers += [_conv3x3(c if j == 0 else w, w), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if pool_last or i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers)
        self.num_features = c
        self.linear = nn.Linear(c, num_classes)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)


# --------------------------------------------------------------------------------------------
# CIFAR ResNets of He et al. (2016), option A shortcuts; names match akamaster/pytorch_resnet_cifar10


class _ShortcutA(nn.Module):
    """Parameter-free shortcut: stride-2 subsampling ``x[:, :, ::2, ::2]`` and zero-padded channels."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad = (c_out - c_in) // 2, c_out - c_in - (c_out - c_in) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.pad))


class _BasicBlockA(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = (
            _ShortcutA(c_in, c_out, stride) if stride != 1 or c_in != c_out else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNetA(Classifier):
    """CIFAR ResNet-(6n+2) (He et al., "Deep Residual Learning", CVPR 2016, section 4.2): 3x3 conv 16,
    three stages of ``n`` BasicBlocks with 16/32/64 channels, option A shortcuts, global average
    pool, linear. Module names ``conv1, bn1, layer1..3.{i}.{conv1,bn1,conv2,bn2}, linear``."""

    def __init__(self, n: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        c = 16
        for i, (w, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            blocks = []
            for j in range(n):
                blocks.append(_BasicBlockA(c, w, stride if j == 0 else 1))
                c = w
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.num_features = c
        self.linear = nn.Linear(c, num_classes)
        for m in self.modules():  # akamaster's init: Kaiming normal for convs and the head
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


class _BasicBlockB(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet18(Classifier):
    """ResNet-18 for small images: 3x3 stem, stride 1, no max-pool, BasicBlocks [2,2,2,2],
    widths 64/128/256/512 (1x1 conv shortcuts), global average pool, linear."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, 64)
        self.bn1 = nn.BatchNorm2d(64)
        c = 64
        for i, (w, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
            setattr(self, f"layer{i}", nn.Sequential(_BasicBlockB(c, w, stride), _BasicBlockB(w, w)))
            c = w
        self.num_features = c
        self.linear = nn.Linear(c, num_classes)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


# --------------------------------------------------------------------------------------------
# Registry entries


@register_model
def fastcnn(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Quick-tier surrogate (:class:`FastCNN`: one-conv blocks 16/32/64/128)."""
    return FastCNN(num_classes, in_channels)


@register_model
def fastcnn_wide(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """:class:`FastCNN` with one-conv blocks 32/64/128/256: 4x the multiply-adds of ``fastcnn``."""
    return FastCNN(num_classes, in_channels, widths=(32, 64, 128, 256))


@register_model
def vgg3(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """The issue's calibration net: 3 blocks of two 3x3 convs, widths 32/64/128 (:class:`FastCNN`)."""
    return FastCNN(num_classes, in_channels, widths=(32, 64, 128), convs=2, pool_last=True)


@register_model
def resnet18(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """ResNet-18: the CIFAR variant for ``image_size <= 64``, else torchvision's (first conv adapted)."""
    if image_size <= 64:
        return CifarResNet18(num_classes, in_channels)
    return _torchvision_model("resnet18", num_classes, in_channels)


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
# torchvision models

# Builders whose defaults return auxiliary outputs in train mode; a surrogate must return logits.
_TV_EXTRA_KWARGS: dict[str, dict[str, object]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _torchvision_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """torchvision classification model ``name`` with random init and its first conv adapted."""
    import torchvision

    if name not in _torchvision_names():
        raise ConfigError(
            f"unknown torchvision classification model '{name}'; see torchvision.models.list_models()"
        )
    model = torchvision.models.get_model(
        name, weights=None, num_classes=num_classes, **_TV_EXTRA_KWARGS.get(name, {})
    )
    if in_channels != 3:
        _adapt_first_conv(model, name, in_channels)
    return model


def _adapt_first_conv(model: nn.Module, name: str, in_channels: int) -> None:
    for path, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            break
    else:
        raise ConfigError(f"torchvision model '{name}' has no Conv2d to adapt to {in_channels} channels")
    if conv.groups != 1:
        raise ConfigError(f"torchvision model '{name}': cannot adapt a grouped first conv to {in_channels} channels")
    new = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
    )
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path), child, new)


# --------------------------------------------------------------------------------------------
# Weights


def _looks_like_weights_name(weights: str) -> bool:
    """``"DEFAULT"``, ``"IMAGENET1K_V2"``, ``"ResNet50_Weights.IMAGENET1K_V1"``, ``"pretrained"``: a name, not a path."""
    return (
        re.fullmatch(r"[A-Za-z0-9_.\-]+", weights) is not None
        and Path(weights).suffix.lower() not in _WEIGHT_SUFFIXES
    )


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Read a local checkpoint: ``(state dict with 'module.'/'_orig_mod.' stripped, is_akamaster)``."""
    try:
        # weights_only=True unpickles tensors and plain containers only, never arbitrary objects.
        # We do not fall back to weights_only=False: the akamaster legacy (non-zip) files load with
        # weights_only=True (checked with torch 2.x), and full unpickling of a user-supplied file can
        # run arbitrary code. A checkpoint holding pickled objects gets an actionable error instead.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise WeightsError(
            f"cannot read weights file {path}: {e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            "Only plain state dicts are loaded (torch.load(weights_only=True)); re-save it with "
            "torch.save(model.state_dict(), path)"
        ) from e
    # akamaster/pytorch_resnet_cifar10 trainer format: {'best_prec1', 'state_dict'} with 'module.' keys.
    is_akamaster = isinstance(obj, Mapping) and "best_prec1" in obj and "state_dict" in obj
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
    sd: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        sd[k] = v
    return sd, is_akamaster


def _first(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _load_weights(model: nn.Module, name: str, weights: str | os.PathLike) -> None:
    path = Path(weights)
    if not path.is_file():
        if isinstance(weights, str) and _looks_like_weights_name(weights):
            if name.startswith(_TV_PREFIX) or name not in _REGISTRY:
                raise WeightsError(
                    f"model '{name}': pretrained torchvision weights '{weights}' are not downloaded "
                    "(protect works offline). Download the .pth file by hand (torchvision's weight URLs are "
                    f"listed in the torchvision docs, {_TV_DOCS}) and pass its local path as the weights"
                )
            raise WeightsError(
                f"model '{name}': weights '{weights}' is not a file; pass the path of a local checkpoint "
                "(resnet20/32/44/56 load the akamaster CIFAR-10 files, e.g. resnet20-12fca82f.th)"
            )
        raise WeightsError(f"weights file not found: {path} (pass the path of an existing local checkpoint)")

    sd, is_akamaster = _read_checkpoint(path)
    if isinstance(model, Classifier):
        if "normalize.mean" in sd and "normalize.std" in sd:  # saved from a model with a prefix
            model.set_normalization(tuple(sd["normalize.mean"].flatten().tolist()),
                                    tuple(sd["normalize.std"].flatten().tolist()))
        elif is_akamaster:
            model.set_normalization(AKAMASTER_MEAN, AKAMASTER_STD)
            sd.update({k: v for k, v in model.state_dict().items() if k.startswith("normalize.")})

    expected = model.state_dict()
    # Checkpoints from torch < 0.4 (akamaster's) have no BatchNorm num_batches_tracked: keep ours.
    for k, v in expected.items():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = v
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items() if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_first(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatch (file vs model): {_first(mismatched, 3)}")
        raise WeightsError(
            f"weights file {path} does not fit model '{name}' "
            f"(check the model name, num_classes and in_channels): {'; '.join(parts)}"
        )
    model.load_state_dict(sd, strict=True)
    log.info("loaded weights %s into %s%s", path, name, " (akamaster normalisation)" if is_akamaster else "")


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
        if tv_name not in _torchvision_names():
            raise ConfigError(
                f"unknown model '{name}'; available: {', '.join(list_models())}, "
                "or any torchvision classification model as 'tv:<name>' (e.g. tv:resnet50)"
            )
        model = _torchvision_model(tv_name, num_classes, in_channels)

    if weights is not None:
        if not isinstance(weights, (str, os.PathLike)):
            raise WeightsError(
                f"model '{name}': weights must be the path of a local file, got {weights!r}; nothing is "
                f"downloaded (torchvision's weight URLs are listed in the torchvision docs, {_TV_DOCS})"
            )
        _load_weights(model, name, weights)
    return model
