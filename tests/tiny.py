"""Small, fast helpers shared by effect tests: load the bundled samples, train a tiny CNN."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def tree(root: Path) -> dict[str, str]:
    """{relative path: SHA-256} of every file under ``root`` (hidden ones included)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def copy_classes(split: str, dst: Path, n: int, classes: tuple[str, ...] = ("airplane", "frog"),
                 dataset: str = "cifar10") -> Path:
    """The first ``n`` images of each of ``classes`` in ``samples/<dataset>/<split>`` copied into
    ``dst/<class>/``; returns ``dst``."""
    for c in classes:
        (dst / c).mkdir(parents=True)
        for f in sorted((SAMPLES / dataset / split / c).glob("*.png"))[:n]:
            shutil.copy(f, dst / c / f.name)
    return dst


def load_split(dataset: str, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A bundled sample split as float N x C x H x W in [0,1], labels, class names."""
    root = SAMPLES / dataset / split
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    xs, ys = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).glob("*.png")):
            arr = np.asarray(Image.open(path))
            xs.append(arr[:, :, None] if arr.ndim == 2 else arr)
            ys.append(label)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 255
    return x, torch.tensor(ys), classes


def quantise(x: torch.Tensor) -> torch.Tensor:
    """What the pipeline writes: 8-bit rounding."""
    return (x * 255).round() / 255


class TinyNet(nn.Module):
    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


def train_tiny(x: torch.Tensor, y: torch.Tensor, classes: int, epochs: int = 12, seed: int = 0) -> nn.Module:
    """Train :class:`TinyNet` with Adam and flips; deterministic for a seed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TinyNet(x.shape[1], classes)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            xb = x[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item()
