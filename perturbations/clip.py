"""open_clip image towers as surrogates (``clip:ARCH[/PRETRAINED]``), loaded offline.

Used by :func:`perturbations.surrogates.load_surrogate`; not a public entry point. Only the image
tower is kept (``model.visual``, what ``model.encode_image`` calls; the embedding is returned
unnormalised, as ``encode_image(normalize=False)``), with its own input size and mean/std from
open_clip's preprocess config (a pretrained tag's statistics take precedence).

Offline by default: for the whole load, ``HF_HUB_OFFLINE=1`` is set (in ``os.environ`` and in
``huggingface_hub.constants``, which reads the variable only at import) and restored afterwards,
so a missing file fails within seconds instead of spending ~45 s in DNS retries. Weights for a tag
are looked up in the Hugging Face cache and in open_clip's URL cache (``~/.cache/clip``). A user who
sets ``HF_HUB_OFFLINE=0`` explicitly lets open_clip download as usual.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, WeightsError
from .nets import Normalize
from .weights import looks_like_weights_name

__all__ = ["ClipImageTower", "load_clip_tower"]

log = logging.getLogger(__name__)

_FALSE = {"0", "false", "no", "off"}
_LOAD_ERRORS = (RuntimeError, OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError)
# open_clip's loaders fail on foreign files with whatever their code trips over; report the file, not a traceback.
_FILE_ERRORS = _LOAD_ERRORS + (TypeError, AttributeError, IndexError, AssertionError)


class ClipImageTower(nn.Module):
    """``Normalize(mean, std)`` then the open_clip image tower: ``N x 3 x H x W`` in [0, 1] -> ``N x D``."""

    def __init__(self, visual: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.visual(self.normalize(x))
        return out[0] if isinstance(out, tuple) else out  # CoCa towers return (pooled, tokens)


def downloads_allowed() -> bool:
    """True only when the user set ``HF_HUB_OFFLINE`` to a false value (0/false/no/off) explicitly."""
    value = os.environ.get("HF_HUB_OFFLINE")
    return value is not None and value.strip().lower() in _FALSE


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Force Hugging Face hub offline mode for the duration, unless :func:`downloads_allowed`."""
    if downloads_allowed():
        yield
        return
    import huggingface_hub.constants as hf_constants  # read HF_HUB_OFFLINE at import: import before patching

    old_env = os.environ.get("HF_HUB_OFFLINE")
    old_const = hf_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    text = f"{e.__class__.__name__}: {text}" if text else e.__class__.__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_torchscript(path: Path) -> bool:
    """OpenAI's original CLIP ``.pt`` files are TorchScript archives (a zip with ``constants.pkl``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in z.namelist())


def _hf_cache_dir() -> str:
    mod = sys.modules.get("huggingface_hub.constants")
    return str(getattr(mod, "HF_HUB_CACHE", "~/.cache/huggingface/hub"))


#: open_clip's pretrained entry for ``RN50/openai`` (where its weights are cached), kept here so that
#: :func:`default_clip_file` can look for them without importing open_clip (about 2 s); a test checks
#: it against open_clip's own table.
RN50_OPENAI = {
    "hf_hub": "timm/resnet50_clip.openai/",
    "url": "https://openaipublic.azureedge.net/clip/models/"
           "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
}
#: open_clip's file names in a Hugging Face repository (``open_clip.constants``), safetensors first.
_HF_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def cached_file(cfg: dict[str, Any]) -> Path | None:
    """The local file of a pretrained entry ``cfg`` (open_clip's ``hf_hub`` / ``url`` / ``file``), or
    None: the entry's own file, the Hugging Face cache (what ``hf_hub_download`` returns offline),
    then open_clip's URL cache (``~/.cache/clip``). Only looks at the disk: never the network."""
    if cfg.get("file") and Path(cfg["file"]).is_file():
        return Path(cfg["file"])
    if cfg.get("hf_hub"):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            model_id, filename = os.path.split(cfg["hf_hub"])
            for name in ((filename,) if filename else _HF_NAMES):
                try:
                    found = try_to_load_from_cache(model_id, name)
                except (ValueError, OSError):  # a malformed id or an unreadable cache
                    found = None
                if isinstance(found, str) and Path(found).is_file():
                    return Path(found)
    if cfg.get("url"):
        cached = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])
        if cached.is_file():
            return cached
    return None


def default_clip_file() -> Path | None:
    """The local weights of ``clip:RN50/openai`` (the default surrogate), or None; fast, offline."""
    return cached_file(RN50_OPENAI)


def _tag_file(open_clip: Any, arch: str, tag: str, cfg: dict[str, Any]) -> Path:
    """The local file of pretrained ``tag``: HF cache, then open_clip's URL cache; WeightsError if absent."""
    if downloads_allowed():
        try:
            return Path(open_clip.download_pretrained(cfg))
        except _LOAD_ERRORS as e:
            raise WeightsError(f"cannot fetch clip:{arch}/{tag} (HF_HUB_OFFLINE=0): {_one_line(e)}; "
                               "use the bundled --surrogate cifar-resnet20, or --surrogate-weights FILE "
                               "with a local copy") from e
    found = cached_file(cfg)
    if found is not None:
        return found
    original = f" or OpenAI's {os.path.basename(cfg['url'])}" if cfg.get("url") else ""
    raise WeightsError(
        f"weights for clip:{arch}/{tag} are not on this machine and protect downloads nothing: use the bundled "
        f"--surrogate cifar-resnet20 (works offline), or --surrogate-weights FILE (a local open_clip "
        f"checkpoint{original}); with network, HF_HUB_OFFLINE=0 lets open_clip fetch it into {_hf_cache_dir()}"
    )


def default_tag(arch: str) -> str | None:
    """``openai`` when open_clip has it for ``arch``, else its first listed tag, else None."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(arch)
    return "openai" if "openai" in tags else (tags[0] if tags else None)


def resolve_tag_or_path(arch: str, tag_or_path: str | None, weights: Path | None) -> tuple[str | None, Path | None]:
    """Split the spec's ``PRETRAINED`` part into ``(tag, file)``; ConfigError for unknown tags and archs."""
    import open_clip

    if arch not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip architecture '{arch}' (e.g. RN50, RN50-quickgelu, ViT-B-32); "
                          "see open_clip.list_models()")
    if tag_or_path is None:
        return (None if weights is not None else default_tag(arch)), weights
    if open_clip.get_pretrained_cfg(arch, tag_or_path):
        return tag_or_path, weights
    p = Path(tag_or_path).expanduser()
    if p.is_file() or os.sep in tag_or_path or "/" in tag_or_path or not looks_like_weights_name(tag_or_path):
        return None, p
    tags = open_clip.list_pretrained_tags_by_model(arch)
    raise ConfigError(f"unknown pretrained tag '{tag_or_path}' for clip:{arch}; "
                      f"available: {', '.join(tags) or 'none'} (or pass a local file with --surrogate-weights PATH)")


def load_clip_tower(arch: str, tag: str | None, file: Path | None) -> tuple[ClipImageTower, tuple[int, int], Path]:
    """Build ``arch`` with the weights of ``file`` (or of ``tag``, looked up locally) on the CPU.

    Returns ``(tower in eval mode, (H, W) input size, weights file)``. At least one of ``tag`` and
    ``file`` must be given; a tag supplies QuickGELU and preprocessing settings, the file the tensors.
    TorchScript archives (OpenAI's original files) go through ``open_clip.load_openai_model``
    (``torch.jit.load``: TorchScript, not pickled Python objects); other files through
    ``open_clip.create_model(pretrained=file)`` with ``weights_only=True``.
    """
    import open_clip

    cfg: dict[str, Any] = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    if file is None:
        if tag is None:
            raise WeightsError(f"open_clip has no pretrained weights for clip:{arch}: pass --surrogate-weights FILE, "
                               "or use the bundled --surrogate cifar-resnet20")
        file = _tag_file(open_clip, arch, tag, cfg)
    if not file.is_file():
        raise WeightsError(f"weights file not found: {file} (pass the path of an existing local checkpoint)")

    overrides = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
    torchscript = _is_torchscript(file)
    try:
        with hub_offline(), torch.random.fork_rng(devices=[]):  # random init must not move the global RNG
            if torchscript:
                model = open_clip.load_openai_model(str(file), precision="fp32", device="cpu")
            else:
                model = open_clip.create_model(
                    arch, pretrained=str(file), precision="fp32", device="cpu",
                    force_quick_gelu=bool(cfg.get("quick_gelu", False)), force_preprocess_cfg=overrides or None,
                )
    except _FILE_ERRORS as e:
        what = " (a TorchScript archive, but not one of OpenAI's CLIP models)" if torchscript else ""
        raise WeightsError(f"weights file {file} does not fit clip:{arch}{what}: {_one_line(e)}") from e
    if torchscript:
        _check_openai_arch(open_clip, model, arch, file)
    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp.get("size", 224)
    hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mean = tuple(overrides.get("mean", pp.get("mean", open_clip.OPENAI_DATASET_MEAN)))
    std = tuple(overrides.get("std", pp.get("std", open_clip.OPENAI_DATASET_STD)))
    tower = ClipImageTower(model.visual, mean, std).eval()
    log.info("loaded clip:%s%s from %s (input %dx%d)", arch, f"/{tag}" if tag else "", file, *hw)
    return tower, hw, file


def _check_openai_arch(open_clip: Any, model: nn.Module, arch: str, file: Path) -> None:
    """An OpenAI archive defines its own architecture; refuse one that is not ``arch``."""
    cfg = open_clip.get_model_config(arch) or {}
    want = (cfg.get("embed_dim"), cfg.get("vision_cfg", {}).get("image_size"))
    got = (getattr(model.visual, "output_dim", None), getattr(model.visual, "image_size", None))
    if isinstance(got[1], (tuple, list)):
        got = (got[0], got[1][0])
    if None not in want and want != got:
        raise WeightsError(f"weights file {file} holds a different CLIP model than clip:{arch} "
                           f"(embedding {got[0]}, input {got[1]} px vs {want[0]}, {want[1]} px)")
