"""How many augmented draws a small cluster needs per step of the UC fit (a screen).

    python bench/uc_draws.py [--sets kodak,cifar100] [--draws 0,4,2,1] [--keys 1,2,3]

The direct UC fit draws ``batch`` (16) members of every cluster per step, with replacement. A folder of
a few photos has clusters of one or two photos, so most of a step's batch is augmented copies of the
same image. ``--draws D`` sets ``perturbations.uc.DRAWS_PER_MEMBER``, the cap on a cluster's draws at
``D x its members`` (0: no cap, the fit before the cap; the product caps at 8). For
each cap and key this prints the fit's time and what the fitted perturbations do on *fresh*
augmentations (flip and padded crop, a generator the fit never saw; 32 per image): the mean KL to the
target embedding (lower is stronger) and the share of augmented copies whose embedding is nearer its
target cluster's mean than its own (higher is stronger), for the whole perturbation and scaled to
0.4 (about what the photo default's dE-2 floor keeps). Sets: the 16 Kodak photos (10 clusters of
1-2 photos), 100 CIFAR-10 training images (10 per cluster: the cap changes nothing at D >= 2).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import perturbations.uc as uc  # noqa: E402
from perturbations import FitData, Keyring  # noqa: E402
from perturbations.steps import random_flip_crop  # noqa: E402
from perturbations.uc import UnlearnableClusters, kl_to_target  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def load(name: str) -> tuple[torch.Tensor, list[str]]:
    if name == "kodak":
        files = sorted((SHARED / "kodak").glob("*.png"))
    else:
        root = SHARED / "cifar10" / "train"
        files = [f for d in sorted(p for p in root.iterdir() if p.is_dir()) for f in sorted(d.glob("*.png"))[:10]]
    xs = []
    for f in files:
        x = torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()).permute(2, 0, 1).float() / 255
        xs.append(F.interpolate(x[None], size=(32, 32), mode="bilinear", antialias=True)[0])
    return torch.stack(xs), [f.name for f in files]


def fit_data(x: torch.Tensor, ids: list[str]) -> FitData:
    """An unlabelled FitData serving ``x`` (N x 3 x 32 x 32 in [0, 1], the surrogate's size) as the pipeline does."""

    def batches(size, channels=3, batch_size=64, only=None):
        pos = list(range(len(ids))) if only is None else list(only)
        for i in range(0, len(pos), batch_size):
            b = x[pos[i:i + batch_size]]
            if tuple(b.shape[-2:]) != tuple(size):
                b = F.interpolate(b, size=tuple(size), mode="bilinear", antialias=True)
            yield b, pos[i:i + batch_size]

    return FitData(0, None, [tuple(x.shape[-2:])] * len(ids), list(ids), batches, memory=1 << 28)


def held_out(method: UnlearnableClusters, x: torch.Tensor, ids: list[str], scale: float = 1.0,
             copies: int = 32) -> tuple[float, float]:
    s = method.clusters.surrogate("cpu")
    c = torch.tensor(method.cluster_of(ids))
    means = method.clusters.means
    target = method.targets[c]
    gen = torch.Generator().manual_seed(12345)
    kls, hits = [], []
    with torch.no_grad():
        for _ in range(copies):
            z = random_flip_crop((x + scale * method.deltas[c]).clamp(0, 1), gen)
            f = s.features(z)
            to_target = kl_to_target(f, means[target])
            kls.append(to_target)
            hits.append((to_target < kl_to_target(f, means[c])).float())
    return float(torch.cat(kls).mean()), float(torch.cat(hits).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="kodak,cifar100")
    ap.add_argument("--draws", default="0,4,2,1")
    ap.add_argument("--keys", default="1,2,3")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.sets.split(","):
        x, ids = load(name)
        for draws in [int(d) for d in args.draws.split(",")]:
            rows = []
            for key in [int(k) for k in args.keys.split(",")]:
                m = UnlearnableClusters(Keyring.from_seed(key), surrogate="cifar-resnet20")
                shipped = uc.DRAWS_PER_MEMBER
                uc.DRAWS_PER_MEMBER = draws or m.batch  # ``batch`` per member: every cluster draws ``batch``
                try:
                    t = time.perf_counter()
                    m.fit(fit_data(x, ids))
                    dt = time.perf_counter() - t
                finally:
                    uc.DRAWS_PER_MEMBER = shipped
                kl, hit = held_out(m, x, ids)
                kl4, hit4 = held_out(m, x, ids, 0.4)
                rows.append((dt, kl, hit, kl4, hit4))
                print(f"  {name} draws={draws or 'batch'} key={key}: fit {dt:.1f} s, held-out KL {kl:.3f}, "
                      f"nearer target {hit:.3f}; at 0.4x: KL {kl4:.3f}, nearer target {hit4:.3f}", flush=True)
            med = [statistics.median(r[i] for r in rows) for i in range(5)]
            spread = [max(r[i] for r in rows) - min(r[i] for r in rows) for i in range(5)]
            print(f"{name} draws={draws or 'batch'}: fit {med[0]:.1f} s, KL {med[1]:.3f} (spread {spread[1]:.3f}), "
                  f"nearer target {med[2]:.3f} (spread {spread[2]:.3f}); at 0.4x: KL {med[3]:.3f} "
                  f"(spread {spread[3]:.3f}), nearer target {med[4]:.3f} (spread {spread[4]:.3f})", flush=True)


if __name__ == "__main__":
    main()
