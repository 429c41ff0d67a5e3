"""Waves on a 12-megapixel photo: ``protect_levels`` with its perceptual budget and without, beside
decoding and re-encoding the same photo (JPEG q95), alternated and repeated in one process.

    python bench/waves_speed.py [--repeat 5]

Kodak kodim05 upscaled bicubic to 4000x3000 (``../shared/data/kodak``); the wave of that size is
cached after the first call, as it is for a folder of one camera's photos. Prints the median and
the spread of each, in seconds, and the ratio of protecting to decoding plus encoding.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import perturbations  # noqa: E402
from bench.common import SHARED  # noqa: E402
from perturbations import Keyring  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    im = Image.open(SHARED / "kodak" / "kodim05.png").convert("RGB").resize((4000, 3000), Image.BICUBIC)
    pixels = np.array(im)
    v = torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous()
    label = torch.tensor([1])
    waves = perturbations.get("waves")
    methods = {"waves (budget=jnd)": waves(Keyring.from_seed(1), num_classes=2),
               "waves (budget=flat)": waves(Keyring.from_seed(1), num_classes=2, budget="flat")}
    for m in methods.values():
        m.protect_levels(v, label)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()

    def codec() -> None:
        np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        Image.fromarray(pixels).save(io.BytesIO(), format="JPEG", quality=95)

    jobs = {**{k: (lambda m=m: m.protect_levels(v, label)) for k, m in methods.items()}, "decode + encode": codec}
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(args.repeat):
        for k, job in jobs.items():
            t0 = time.perf_counter()
            job()
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["decode + encode"])
    print(f"12-MP photo, {args.repeat} alternated repeats, {torch.get_num_threads()} threads")
    for k, t in times.items():
        med = statistics.median(t)
        print(f"{k}: median {med:.3f} s (spread {min(t):.3f}-{max(t):.3f}), {med / base:.2f}x decode + encode")


if __name__ == "__main__":
    main()
