"""Surrogate feature extractors behind one registry of string specs.

>>> s = load_surrogate("cifar-resnet20")              # bundled akamaster weights
>>> s.features(torch.rand(8, 3, 32, 32)).shape        # N x 64, differentiable w.r.t. the input
torch.Size([8, 64])

Specs (``parse_spec`` returns ``(kind, arch, path_or_tag)``):

=================================  ===============================================================
``cifar-resnet20|32|44|56[:PATH]``  akamaster CIFAR-10 ResNet (He et al. 2016, option A), 32x32
                                    input; feature = penultimate layer (64-d). Default PATH: the
                                    bundled ``samples/weights/resnet20-12fca82f.th`` for resnet20;
                                    ``../shared/data/cifar10_resnet_akamaster/resnetNN-*.th`` beside
                                    the checkout for all four. -> ``("cifar-resnet", "resnet20", PATH)``
``clip:ARCH[/PRETRAINED]``          open_clip image tower (see :mod:`perturbations.clip`); PRETRAINED
                                    is a tag (default ``openai`` where it exists, else the first
                                    tag) or a local file. -> ``("clip", "RN50", "openai")``
``torchvision:NAME[:PATH]``         torchvision classifier with local weights (a path, or torch's hub
                                    cache of the DEFAULT weights); feature = input of the last
                                    Linear layer; 224x224, ImageNet statistics.
``random:ARCH``                     keyed random init (``keyring.generator("surrogate/init")``) of
                                    ``cifar-resnet20|32|44|56`` or ``tiny`` (:class:`TinyConvNet`).
=================================  ===============================================================

Relative paths resolve against the working directory, then against the checkout's root (so the
canonical specs, which hold paths relative to that root where they can, work from anywhere). Nothing
is downloaded. Building a network never moves torch's global RNG.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, WeightsError
from .keyring import Keyring
from .nets import IMAGENET_MEAN, IMAGENET_STD, Normalize, TinyConvNet, cifar_resnet, keyed_init
from .nets import torchvision_model, torchvision_names
from .weights import AKAMASTER_URL, REPO_ROOT, TORCHVISION_DOCS, file_sha256, load_weights, read_checkpoint

__all__ = ["SURROGATE_KINDS", "Surrogate", "default_surrogate", "load_surrogate", "parse_spec", "surrogate_reason"]

log = logging.getLogger(__name__)

#: The spec kinds, as :func:`parse_spec` returns them.
SURROGATE_KINDS = ("cifar-resnet", "clip", "torchvision", "random")
RANDOM_ARCHS = ("cifar-resnet20", "cifar-resnet32", "cifar-resnet44", "cifar-resnet56", "tiny")
BUNDLED_WEIGHTS_DIR = REPO_ROOT / "samples" / "weights"
#: Where the akamaster ResNet-20/32/44/56 files are looked for when a spec names no path.
SHARED_WEIGHTS_DIR = REPO_ROOT.parent / "shared" / "data" / "cifar10_resnet_akamaster"
#: The default surrogate of Unlearnable Clusters and clustered CUDA where its weights are on the machine
#: (the paper's), and the bundled one used otherwise (:func:`default_surrogate`).
CLIP_DEFAULT = "clip:RN50/openai"
BUNDLED_DEFAULT = "cifar-resnet20"
_SPEC_FORMS = "cifar-resnet20|32|44|56[:PATH], clip:ARCH[/PRETRAINED], torchvision:NAME[:PATH], random:ARCH"


class Surrogate:
    """A frozen feature extractor: ``features(x)`` maps ``N x C x H x W`` in [0, 1] to ``N x D``.

    Built by :func:`load_surrogate`. ``module`` maps ``N x 3 x input_size`` images in [0, 1] to the
    embedding and holds its own normalisation; it is in eval mode with ``requires_grad=False``
    parameters. Attributes: ``input_size`` (H, W), ``feature_dim`` D, ``spec`` (canonical),
    ``weights_sha256`` ("" for random), ``weights_path`` (None for random), ``device``.
    """

    def __init__(self, module: nn.Module, input_size: tuple[int, int], spec: str, weights_sha256: str = "",
                 weights_path: Path | None = None, device: str | torch.device = "cpu") -> None:
        self.module = module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.spec = spec
        self.weights_sha256 = weights_sha256
        self.weights_path = weights_path
        self.device = torch.device("cpu")
        self.to(device)
        with torch.no_grad():
            self.feature_dim = int(self.module(torch.zeros(1, 3, *self.input_size, device=self.device)).shape[1])

    def __repr__(self) -> str:
        return (f"Surrogate({self.spec!r}, input_size={self.input_size}, feature_dim={self.feature_dim}, "
                f"device={str(self.device)!r})")

    def to(self, device: str | torch.device) -> Surrogate:
        """Move the network to ``device`` (in place); returns self."""
        try:
            device = torch.device(device)
            self.module.to(device)
        except (RuntimeError, AssertionError, ValueError) as e:
            raise ConfigError(f"cannot put surrogate {self.spec} on device {device!r}: {e}") from e
        self.device = device
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``N x D`` float32 embeddings of ``x`` (``N x C x H x W`` float in [0, 1], C in 1 or 3, any
        H, W), computed on the surrogate's device and returned there.

        Grey input is repeated to 3 channels; a size other than ``input_size`` is resized (bilinear,
        antialiased). Differentiable w.r.t. ``x``.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] not in (1, 3) or not x.is_floating_point():
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ConfigError(f"surrogate features need a float N x C x H x W tensor with C in (1, 3), got {shape}")
        x = x.to(device=self.device, dtype=torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        return self.module(x).float()

    def batch_features(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """:meth:`features` without gradients, ``batch_size`` images at a time; returned on ``x``'s device."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            return self.features(x)  # raises the shape error
        with torch.no_grad():
            parts = [self.features(x[i:i + batch_size]).to(x.device) for i in range(0, len(x), batch_size)]
        return torch.cat(parts) if parts else torch.empty(0, self.feature_dim, device=x.device)


class _ForwardFeatures(nn.Module):
    """A :class:`~perturbations.nets.Classifier`'s ``forward_features`` as ``forward``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)


# --------------------------------------------------------------------------------------------
# Specs


def parse_spec(spec: str) -> tuple[str, str, str | None]:
    """Split a surrogate spec into ``(kind, arch, path_or_tag)`` without loading anything.

    ``"cifar-resnet20:w.th"`` -> ``("cifar-resnet", "resnet20", "w.th")``; ``"clip:RN50/openai"`` ->
    ``("clip", "RN50", "openai")``; ``"torchvision:resnet50"`` -> ``("torchvision", "resnet50", None)``;
    ``"random:tiny"`` -> ``("random", "tiny", None)``. Raises ConfigError for malformed specs.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"empty surrogate spec {spec!r}; use one of {_SPEC_FORMS}")
    head, sep, rest = spec.partition(":")
    if sep and not rest:
        raise ConfigError(f"surrogate spec '{spec}' ends in ':'; use one of {_SPEC_FORMS}")
    m = re.fullmatch(r"cifar-resnet(\d+)", head)
    if m:
        if int(m.group(1)) not in (20, 32, 44, 56) or m.group(1).startswith("0"):
            raise ConfigError(f"surrogate spec '{spec}': CIFAR ResNets are cifar-resnet20, 32, 44 or 56")
        return "cifar-resnet", f"resnet{m.group(1)}", rest or None
    if head == "clip":
        arch, slash, tag = rest.partition("/")
        if not arch or (slash and not tag):
            raise ConfigError(f"surrogate spec '{spec}': write clip:ARCH[/PRETRAINED], e.g. clip:RN50/openai")
        return "clip", arch, tag or None
    if head == "torchvision":
        name, colon, path = rest.partition(":")
        if not name or (colon and not path):
            raise ConfigError(f"surrogate spec '{spec}': write torchvision:NAME[:PATH], e.g. torchvision:resnet50:rn50.pth")
        return "torchvision", name, path or None
    if head == "random":
        if rest not in RANDOM_ARCHS:
            raise ConfigError(f"surrogate spec '{spec}': random:ARCH takes ARCH in {', '.join(RANDOM_ARCHS)}")
        return "random", rest, None
    raise ConfigError(f"unknown surrogate kind in '{spec}'; kinds: {', '.join(SURROGATE_KINDS)} "
                      f"({_SPEC_FORMS})")


def _resolve(path: str | os.PathLike) -> Path:
    """A weights path: as given (working directory), else under the checkout's root; WeightsError if absent."""
    p = Path(path).expanduser()
    if p.is_file():
        return Path(os.path.abspath(p))
    if not p.is_absolute() and (REPO_ROOT / p).is_file():
        return REPO_ROOT / p
    raise WeightsError(f"weights file not found: {p} (pass the path of an existing local checkpoint)")


def _display(path: Path) -> str:
    """``path`` relative to the checkout's root when inside it (as a POSIX path), else absolute."""
    try:
        return Path(os.path.abspath(path)).relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(Path(os.path.abspath(path)))


# --------------------------------------------------------------------------------------------
# Builders: each returns (module, input size, canonical spec, weights file or None)


def _default_cifar_weights(arch: str) -> Path:
    bundled = sorted(BUNDLED_WEIGHTS_DIR.glob(f"{arch}-*.th"))
    shared = sorted(SHARED_WEIGHTS_DIR.glob(f"{arch}-*.th")) if SHARED_WEIGHTS_DIR.is_dir() else []
    if bundled or shared:
        return (bundled or shared)[0]
    raise WeightsError(f"no weights for cifar-{arch}: none bundled in {BUNDLED_WEIGHTS_DIR} and no {arch}-*.th in "
                       f"{SHARED_WEIGHTS_DIR}; pass cifar-{arch}:PATH or --surrogate-weights FILE (akamaster's "
                       f"CIFAR-10 checkpoints are published at {AKAMASTER_URL})")


def _cifar(arch: str, file: Path | None) -> tuple[nn.Module, tuple[int, int], str, Path]:
    file = file or _default_cifar_weights(arch)
    checkpoint = read_checkpoint(file)
    head = checkpoint[0].get("linear.weight")
    num_classes = int(head.shape[0]) if head is not None and head.dim() == 2 else 10
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the global RNG still
        net = cifar_resnet(int(arch[len("resnet"):]), num_classes)
    load_weights(net, file, f"cifar-{arch}", state_dict=checkpoint)
    return _ForwardFeatures(net), (32, 32), f"cifar-{arch}:{_display(file)}", file


def _torchvision_hub_file(name: str) -> Path | None:
    """torchvision's DEFAULT weights for ``name`` in torch's hub cache, if a previous download left them."""
    import torchvision

    try:
        url = torchvision.models.get_model_weights(name).DEFAULT.url
    except (ValueError, KeyError, AttributeError):
        return None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    return cached if cached.is_file() else None


def _torchvision(name: str, file: Path | None) -> tuple[nn.Module, tuple[int, int], str, Path]:
    if name not in torchvision_names():
        raise ConfigError(f"unknown torchvision classification model '{name}'; see torchvision.models.list_models()")
    file = file or _torchvision_hub_file(name)
    if file is None:
        raise WeightsError(f"torchvision:{name} needs local weights (nothing is downloaded): pass "
                           f"torchvision:{name}:PATH or --surrogate-weights FILE, or use the bundled --surrogate "
                           f"cifar-resnet20 (torchvision's weight URLs are "
                           f"listed in {TORCHVISION_DOCS}; files in torch's hub cache are found by themselves)")
    checkpoint = read_checkpoint(file)
    with torch.random.fork_rng(devices=[]):
        net = torchvision_model(name)
    head_path = ""
    for path, m in net.named_modules():
        if isinstance(m, nn.Linear):
            head_path = path
    if not head_path:
        raise ConfigError(f"torchvision:{name} has no Linear classifier layer to take features before")
    parent, _, child = head_path.rpartition(".")
    setattr(net.get_submodule(parent), child, nn.Identity())
    load_weights(net, file, f"torchvision:{name}", torchvision=True, state_dict=checkpoint, drop_prefix=head_path)
    module = nn.Sequential(Normalize(IMAGENET_MEAN, IMAGENET_STD), net)
    return module, (224, 224), f"torchvision:{name}:{_display(file)}", file


def _random(arch: str, keyring: Keyring | None) -> tuple[nn.Module, tuple[int, int], str, None]:
    if keyring is None:
        raise ConfigError(f"random:{arch} draws its weights from the key: pass a keyring")
    if not isinstance(keyring, Keyring):
        raise ConfigError(f"random:{arch} needs a perturbations.keyring.Keyring, got {type(keyring).__name__}")
    with torch.random.fork_rng(devices=[]):
        net = TinyConvNet() if arch == "tiny" else cifar_resnet(int(arch[len("cifar-resnet"):]))
    keyed_init(net, keyring.generator("surrogate/init"))
    return _ForwardFeatures(net), (32, 32), f"random:{arch}", None


def _clip(arch: str, tag_or_path: str | None, weights: Path | None) -> tuple[nn.Module, tuple[int, int], str, Path]:
    try:
        from . import clip
    except ImportError as e:  # open_clip missing
        raise ConfigError(f"clip surrogates need open_clip_torch (pip install open_clip_torch), or use the bundled "
                          f"--surrogate cifar-resnet20: {e}") from e
    tag, file = clip.resolve_tag_or_path(arch, tag_or_path, weights)
    if file is not None:
        file = _resolve(file)
        if weights is not None and file != weights:
            raise ConfigError(f"spec 'clip:{arch}/{tag_or_path}' names {file} and weights= names {weights}; "
                              "give the weights file once")
    tower, size, file = clip.load_clip_tower(arch, tag, file)
    return tower, size, f"clip:{arch}/{tag}" if tag else f"clip:{arch}/{_display(file)}", file


# --------------------------------------------------------------------------------------------
# The default surrogate

#: spec -> the reason :func:`default_surrogate` gave for it last (so a method built from resolved
#: parameters can still say why its surrogate was chosen).
_REASONS: dict[str, str] = {}


def default_surrogate(weights: str | os.PathLike | None = None) -> tuple[str, str]:
    """The surrogate to use when none is given, and a one-line reason: ``clip:RN50/openai`` (the
    paper's) where its weights are on this machine (the Hugging Face cache, open_clip's URL cache),
    where a ``weights`` file is given for it, or where ``HF_HUB_OFFLINE=0`` allows the download;
    else the bundled ``cifar-resnet20``. Looks only at the disk (a few ``stat`` calls; open_clip is
    not imported), never at the network.

    >>> default_surrogate()[1]   # offline, no CLIP weights cached
    'surrogate: cifar-resnet20 (bundled; CLIP RN50/openai weights not found locally, see --surrogate-weights)'
    """
    import importlib.util

    if weights is not None:
        spec, why = CLIP_DEFAULT, "the default CLIP surrogate, with the --surrogate-weights file"
    elif importlib.util.find_spec("open_clip") is None:
        spec, why = BUNDLED_DEFAULT, "bundled; open_clip is not installed, so CLIP RN50/openai cannot be used"
    else:
        from . import clip

        found = clip.default_clip_file()
        if found is not None:
            spec, why = CLIP_DEFAULT, f"the paper's CLIP surrogate; weights found locally ({found})"
        elif clip.downloads_allowed():
            spec, why = CLIP_DEFAULT, "the paper's CLIP surrogate; HF_HUB_OFFLINE=0 lets open_clip download it"
        else:
            spec, why = BUNDLED_DEFAULT, "bundled; CLIP RN50/openai weights not found locally, see --surrogate-weights"
    reason = f"surrogate: {spec} ({why})"
    _REASONS[spec] = reason
    log.info("%s", reason)
    return spec, reason


def default_surrogate_info() -> dict[str, Any]:
    """What :func:`default_surrogate` needs here, for ``protect methods`` (see
    :meth:`perturbations.base.Perturbation.weights_info`)."""
    spec, reason = default_surrogate()
    bundled = spec == BUNDLED_DEFAULT
    where = "not found here, so the bundled cifar-resnet20" if bundled else "found here"
    return {"needs": f"a surrogate: {CLIP_DEFAULT} where its weights are local ({where}); "
                     "any other with --surrogate SPEC", "spec": spec, "present": True, "bundled": bundled,
            "reason": reason}


def surrogate_reason(spec: str) -> str:
    """One line saying why ``spec`` is the surrogate: :func:`default_surrogate`'s reason when it chose
    ``spec`` in this process, else that it was asked for."""
    return _REASONS.get(spec, f"surrogate: {spec} (as given)")


# --------------------------------------------------------------------------------------------
# Public factory


def load_surrogate(
    spec: str,
    weights: str | os.PathLike | None = None,
    keyring: Keyring | None = None,
    device: str | torch.device = "cpu",
) -> Surrogate:
    """Load the surrogate of ``spec`` (see the module docstring) onto ``device``, frozen, in eval mode.

    ``weights``: a local file, for specs that take one (the same as the spec's own PATH; giving two
    different files is a ConfigError; with ``clip:ARCH/TAG`` the tag names the recipe and the file
    holds it). ``keyring``: required by ``random:`` and ignored otherwise. Raises ConfigError for bad
    specs and WeightsError, with one actionable line, when weights are missing or do not fit.
    """
    kind, arch, path_or_tag = parse_spec(spec)
    if weights is not None and (not isinstance(weights, (str, os.PathLike)) or not str(weights)):
        raise ConfigError(f"weights must be the path of a local file, got {weights!r}")
    given = _resolve(weights) if weights is not None else None
    if kind == "random":
        if given is not None:
            raise ConfigError(f"{spec} takes no weights file (its weights come from the key)")
        built = _random(arch, keyring)
    elif kind == "clip":
        built = _clip(arch, path_or_tag, given)
    else:
        own = _resolve(path_or_tag) if path_or_tag else None
        if own is not None and given is not None and own != given:
            raise ConfigError(f"spec '{spec}' names {own} and weights= names {given}; give the weights file once")
        built = (_cifar if kind == "cifar-resnet" else _torchvision)(arch, own or given)
    module, size, canonical, file = built
    sha = file_sha256(file) if file is not None else ""
    surrogate = Surrogate(module, size, canonical, sha, file, device)
    log.info("surrogate %s: %s features at %dx%d on %s", canonical, surrogate.feature_dim, *size, surrogate.device)
    return surrogate
