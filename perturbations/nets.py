"""Network architectures shared by the protection methods (surrogates) and the verifier.

Every network here takes float32 images in [0, 1], ``N x C x H x W``. The CIFAR ResNets follow
He et al. (2016) with option A shortcuts and akamaster/pytorch_resnet_cifar10's module names, so
its published checkpoints load unchanged (see :mod:`perturbations.weights`). torchvision models are
built with ``weights=None`` (nothing is downloaded). :func:`keyed_init` initialises any of them from
an explicit ``torch.Generator`` without touching torch's global RNG.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

__all__ = [
    "AKAMASTER_MEAN",
    "AKAMASTER_STD",
    "BasicBlock",
    "CIFAR_RESNET_BLOCKS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CifarResNetA",
    "Classifier",
    "FastCNN",
    "Normalize",
    "TinyConvNet",
    "adapt_first_conv",
    "cifar_resnet",
    "conv3x3",
    "keyed_init",
    "torchvision_model",
    "torchvision_names",
]

#: ImageNet channel statistics (torchvision's pretrained models).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Input normalisation the akamaster CIFAR-10 ResNets were trained with (ImageNet statistics).
AKAMASTER_MEAN = IMAGENET_MEAN
AKAMASTER_STD = IMAGENET_STD
#: CIFAR ResNet depth -> blocks per stage ``n`` (depth = 6n + 2).
CIFAR_RESNET_BLOCKS = {8: 1, 20: 3, 32: 5, 44: 7, 56: 9}


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
    """Base of our classifiers: ``normalize`` -> ``forward_features`` body -> ``linear``.

    ``normalize`` is ``nn.Identity`` by default (no state) or a :class:`Normalize` installed by
    :meth:`set_normalization` (e.g. for akamaster checkpoints). Subclasses build ``self.linear`` and
    implement :meth:`_features` (normalised input to the ``N x num_features`` embedding).
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


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias."""
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


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


class BasicBlock(nn.Module):
    """He et al.'s basic residual block (two 3x3 convs with BN); when the shape changes the shortcut
    is option A (``"A"``: strided identity, zero-padded channels; the CIFAR ResNets) or option B
    (``"B"``: 1x1 conv + BN; ResNet-18)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = _ShortcutA(c_in, c_out, stride) if shortcut == "A" else nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNetA(Classifier):
    """CIFAR ResNet-(6n+2) (He et al., "Deep Residual Learning", CVPR 2016, section 4.2): 3x3 conv 16,
    three stages of ``n`` BasicBlocks with 16/32/64 channels, option A shortcuts, global average
    pool (64-d features), linear. Module names ``conv1, bn1, layer1..3.{i}.{conv1,bn1,conv2,bn2},
    linear``. Designed for 32x32 inputs (any size >= 4 px runs)."""

    def __init__(self, n: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        c = 16
        for i, (w, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(c, w, stride if j == 0 else 1))
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


def cifar_resnet(depth: int, num_classes: int = 10, in_channels: int = 3) -> CifarResNetA:
    """CIFAR ResNet-``depth`` (8, 20, 32, 44 or 56; 8 has one block per stage, no pretrained weights) with option A shortcuts (:class:`CifarResNetA`)."""
    if depth not in CIFAR_RESNET_BLOCKS:
        raise ConfigError(f"no CIFAR ResNet of depth {depth!r}; use one of {', '.join(map(str, CIFAR_RESNET_BLOCKS))}")
    return CifarResNetA(CIFAR_RESNET_BLOCKS[depth], num_classes, in_channels)


class FastCNN(Classifier):
    """Small VGG-style CNN (ours): blocks of ``convs`` x (3x3 conv, no bias, + BN + ReLU), 2x2
    max-pool between blocks (and after the last when ``pool_last``), global average pool, linear.

    Defaults (verify's quick-tier ``fastcnn``): four one-conv blocks 16/32/64/128, about 4 M
    multiply-adds per 32x32 image. On the 10k CIFAR-10 subset with the quick recipe (2 CPU cores)
    it reaches 67 % clean test accuracy in about 70 s of training; ``fastcnn_wide`` (32/64/128/256)
    reaches 71.5 % in about 165 s, and verify's ``vgg3`` (``widths=(32, 64, 128), convs=2,
    pool_last=True``) about 75 % at 2.5x the cost of ``fastcnn_wide``. ``stem_stride``: the stride of
    the first convolution (verify's learners use 2 from 64 px up). Inputs >= 8 px, any channel
    count."""

    def __init__(self, num_classes: int, in_channels: int = 3, widths: tuple[int, ...] = (16, 32, 64, 128),
                 convs: int = 1, pool_last: bool = False, stem_stride: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            for j in range(convs):
                stride = stem_stride if i == j == 0 else 1
                layers += [conv3x3(c if j == 0 else w, w, stride), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if pool_last or i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers)
        self.num_features = c
        self.linear = nn.Linear(c, num_classes)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)


class TinyConvNet(FastCNN):
    """A small fast convnet for keyed random surrogates (``random:tiny``) and SALM's ``tiny``
    surrogate (ours): three one-conv blocks with 32/64/128 channels, 2x2 max-pool after the first
    two, global average pool (128-d features), linear. About 11 M multiply-adds per 32x32 image."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__(num_classes, in_channels, widths)


# --------------------------------------------------------------------------------------------
# Keyed initialisation


@torch.no_grad()
def keyed_init(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-initialise every parameter and buffer of ``module`` from ``generator`` only (in place).

    Conv and Linear weights: Kaiming normal (fan-in, ReLU gain, as akamaster's init); biases:
    uniform in +-1/sqrt(fan_in) (torch's default); BatchNorm: weight 1, bias 0, running mean 0,
    running variance 1 (identity in eval mode). Draws are made on the generator's device in module
    order and copied, so a CPU generator gives the same weights on every machine and device. Works on
    a module materialised with ``to_empty`` (see :func:`perturbations.surrogates.load_surrogate`).
    Raises ConfigError for parameters of other layer types.
    """
    gen_device = generator.device
    for name, m in module.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = torch.empty(m.weight.shape, device=gen_device)
            nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu", generator=generator)
            m.weight.copy_(w)
            if m.bias is not None:
                bound = 1.0 / math.sqrt(max(1, m.weight[0].numel()))
                b = torch.empty(m.bias.shape, device=gen_device).uniform_(-bound, bound, generator=generator)
                m.bias.copy_(b)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.affine:
                m.weight.fill_(1.0)
                m.bias.fill_(0.0)
            if m.track_running_stats:
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                m.num_batches_tracked.zero_()
        elif any(True for _ in m.parameters(recurse=False)):
            raise ConfigError(f"keyed_init does not know how to initialise {name or 'the module'} ({type(m).__name__})")
    return module


# --------------------------------------------------------------------------------------------
# torchvision models

# Builders whose defaults return auxiliary outputs in train mode; a surrogate must return logits.
_TV_EXTRA_KWARGS: dict[str, dict[str, object]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


def torchvision_names() -> list[str]:
    """Every torchvision classification model name, sorted."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def torchvision_model(name: str, num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision classification model ``name`` with random init (``weights=None``, nothing is
    downloaded), ``num_classes`` outputs and its first conv adapted to ``in_channels``."""
    import torchvision

    if name not in torchvision_names():
        raise ConfigError(
            f"unknown torchvision classification model '{name}'; see torchvision.models.list_models()"
        )
    model = torchvision.models.get_model(
        name, weights=None, num_classes=num_classes, **_TV_EXTRA_KWARGS.get(name, {})
    )
    if in_channels != 3:
        adapt_first_conv(model, name, in_channels)
    return model


def adapt_first_conv(model: nn.Module, name: str, in_channels: int) -> None:
    """Replace the first ``Conv2d`` of ``model`` by a fresh one taking ``in_channels`` channels."""
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
