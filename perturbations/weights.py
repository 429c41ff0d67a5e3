"""Local weight files: read a checkpoint, load it into a network, hash it, find bundled copies.

Nothing here downloads. Checkpoints are read with ``torch.load(weights_only=True)`` (tensors and
plain containers only, never arbitrary pickled objects). The akamaster/pytorch_resnet_cifar10
trainer format (``{'best_prec1', 'state_dict'}`` with ``module.`` keys) is recognised, and loading it
into a :class:`~perturbations.nets.Classifier` installs the ImageNet input normalisation those
networks were trained with.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import WeightsError
from .nets import AKAMASTER_MEAN, AKAMASTER_STD, Classifier

__all__ = [
    "AKAMASTER_URL",
    "REPO_ROOT",
    "TORCHVISION_DOCS",
    "file_sha256",
    "load_weights",
    "looks_like_weights_name",
    "read_checkpoint",
]

log = logging.getLogger(__name__)

#: The checkout this package lives in (``perturbations/..``); bundled and shared data resolve from it.
REPO_ROOT = Path(__file__).resolve().parents[1]
TORCHVISION_DOCS = "https://pytorch.org/vision/stable/models.html"
AKAMASTER_URL = "https://github.com/akamaster/pytorch_resnet_cifar10 (folder pretrained_models)"
_WEIGHT_SUFFIXES = {".pt", ".pth", ".th", ".bin", ".ckpt", ".tar", ".pkl", ".safetensors"}


def looks_like_weights_name(weights: str) -> bool:
    """``"DEFAULT"``, ``"IMAGENET1K_V2"``, ``"ResNet50_Weights.IMAGENET1K_V1"``, ``"pretrained"``: a name, not a path."""
    return (
        re.fullmatch(r"[A-Za-z0-9_.\-]+", weights) is not None
        and Path(weights).suffix.lower() not in _WEIGHT_SUFFIXES
    )


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], bool]:
    """Read a local checkpoint: ``(state dict with 'module.'/'_orig_mod.' stripped, is_akamaster)``.

    Accepts a plain state dict or one under ``'state_dict'`` / ``'model_state_dict'``. Raises
    WeightsError for unreadable files and files that hold anything but tensors.
    """
    path = Path(path)
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


def load_weights(
    model: nn.Module,
    weights: str | os.PathLike,
    name: str,
    *,
    torchvision: bool = False,
    state_dict: tuple[dict[str, torch.Tensor], bool] | None = None,
    drop_prefix: str | None = None,
) -> None:
    """Load the local checkpoint ``weights`` into ``model`` (strict, in place); ``name`` labels errors.

    A :class:`Classifier` gets the checkpoint's ``normalize.mean/std`` prefix, or the akamaster
    normalisation for akamaster checkpoints. BatchNorm ``num_batches_tracked`` missing from old
    checkpoints is kept from the model. ``torchvision=True`` words the "not a file" error for
    torchvision weight names. ``state_dict``: the already read :func:`read_checkpoint` result;
    ``drop_prefix``: keys under this module path are ignored (e.g. a classifier head replaced by an
    identity). Raises WeightsError for missing, unreadable or unfitting files.
    """
    path = Path(weights)
    if state_dict is None:
        if not path.is_file():
            if isinstance(weights, str) and looks_like_weights_name(weights):
                if torchvision:
                    raise WeightsError(
                        f"model '{name}': pretrained torchvision weights '{weights}' are not downloaded "
                        "(protect works offline). Download the .pth file by hand (torchvision's weight URLs are "
                        f"listed in the torchvision docs, {TORCHVISION_DOCS}) and pass its local path as the weights"
                    )
                raise WeightsError(
                    f"model '{name}': weights '{weights}' is not a file; pass the path of a local checkpoint "
                    "(resnet20/32/44/56 load the akamaster CIFAR-10 files, e.g. resnet20-12fca82f.th)"
                )
            raise WeightsError(f"weights file not found: {path} (pass the path of an existing local checkpoint)")
        state_dict = read_checkpoint(path)
    sd, is_akamaster = dict(state_dict[0]), state_dict[1]
    if drop_prefix:
        sd = {k: v for k, v in sd.items() if not k.startswith(drop_prefix + ".")}

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
