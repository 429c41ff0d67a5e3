"""Offline, fast parameters for every registered method, for tests that iterate the registry
(a new method adds its entry here; methods not listed run with their defaults)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from perturbations import FitData

#: Parameters that keep a method offline (no CLIP download) and quick in a test.
TEST_PARAMS: dict[str, dict[str, Any]] = {
    "uc": {"surrogate": "cifar-resnet20", "clusters": 3, "steps": 3, "batch": 4},
    "salm": {"rounds": 1, "steps": 2, "train_steps": 2, "surrogate": "tiny", "mask_ratio": 0.2},
}


#: Composed methods the registry-wide tests also run (perturbations.chain).
COMPOSED = ("cuda+uc", "cuda+salm")


def params(name: str) -> dict[str, Any]:
    """Quick parameters of ``name``; a composed method gets each stage's, prefixed (``uc.steps``)."""
    if "+" in name:
        return {f"{stage}.{k}": v for stage in name.split("+") for k, v in TEST_PARAMS.get(stage, {}).items()}
    return dict(TEST_PARAMS.get(name, {}))


def every_method() -> list[str]:
    """The registered methods and :data:`COMPOSED`."""
    import perturbations

    return [*perturbations.available(), *COMPOSED]


def fit_data(x: torch.Tensor, labels: list[int], ids: list[str], num_classes: int) -> FitData:
    """A FitData whose batch factory serves ``x`` (N x C x H x W float in [0, 1]) like the pipeline."""

    def batches(size, channels=3, batch_size=64, only=None):
        pos = list(range(len(ids))) if only is None else list(only)
        for i in range(0, len(pos), batch_size):
            p = pos[i:i + batch_size]
            b = x[p]
            if b.shape[1] != channels:
                b = b.expand(-1, channels, -1, -1) if channels == 3 else b.mean(1, keepdim=True)
            if tuple(b.shape[-2:]) != tuple(size):
                b = F.interpolate(b, size=tuple(size), mode="bilinear", antialias=True)
            yield b, p

    return FitData(num_classes, labels, [tuple(x.shape[-2:])] * len(ids), ids, batches, memory=1 << 28,
                   channels=x.shape[1])


def pil_jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """A real (Pillow) JPEG round trip of ``N x C x H x W`` images in [0, 1] (C = 1 or 3, 8-bit,
    Pillow's default 4:2:0 for colour): what a platform does to a published file."""
    import io

    import numpy as np
    from PIL import Image

    out = []
    for im in x:
        buf = io.BytesIO()
        a = (im * 255).round().byte().numpy()
        Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)).save(buf, "JPEG", quality=quality)
        buf.seek(0)
        b = torch.from_numpy(np.asarray(Image.open(buf)).copy()).float() / 255
        out.append(b[None] if b.ndim == 2 else b.permute(2, 0, 1))
    return torch.stack(out)
