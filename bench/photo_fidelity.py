"""Fidelity on photos as a person sees it: every method on the Kodak photos, side by side.

    python bench/photo_fidelity.py [--configs default,uc16,uc8,uc4,cuda-clusters,uc16-de2,cuda-clusters-de2] [--work /dev/shm/protect-fidelity]

Protects the 16 Kodak photos of ``../shared/data/kodak`` (768x512 and 512x768 PNG, one flat,
unlabelled folder, as a photographer has them) once per configuration with ``protect images
--json`` and prints, from the run's own summary and ``protect inspect --json`` (every figure
measured on the written files): mean PSNR, mean SSIM, mean and worst low-frequency colour
difference (CIELAB dE76 after a blur of sigma = shorter side / 256; about 2.3 is just noticeable)
and the wall time. Issue 19's photo target: mean dE <= 2.0 and SSIM >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import CLI, env_for, stage_kodak  # noqa: E402

CONFIGS: dict[str, list[str]] = {
    "default": [],  # what a user gets with no --method on an unlabelled folder
    "uc16": ["--method", "uc", "--surrogate", "cifar-resnet20"],
    "uc8": ["--method", "uc", "--surrogate", "cifar-resnet20", "--eps", "8/255"],
    "uc4": ["--method", "uc", "--surrogate", "cifar-resnet20", "--eps", "4/255"],
    "cuda-clusters": ["--method", "cuda", "--clusters", "4", "--surrogate", "cifar-resnet20"],
    # the fidelity floor: each image's change scaled back until its dE is at most 2
    "uc16-de2": ["--method", "uc", "--surrogate", "cifar-resnet20", "--max-delta-e", "2"],
    "cuda-clusters-de2": ["--method", "cuda", "--clusters", "4", "--surrogate", "cifar-resnet20", "--max-delta-e", "2"],
    # resize-aware variants (optimised through / defined for the attacker's downscale)
    "uc16-resize": ["--method", "uc", "--surrogate", "cifar-resnet20", "--param", "resize=32-64"],
    "uc16-resize-de2": ["--method", "uc", "--surrogate", "cifar-resnet20", "--param", "resize=32-64",
                        "--max-delta-e", "2"],
    "cuda-clusters-ref32": ["--method", "cuda", "--clusters", "4", "--surrogate", "cifar-resnet20",
                            "--param", "reference=32"],
    # perceptual budget: each pixel's change at most one just-noticeable difference (perturbations.masking)
    "uc16-jnd": ["--method", "uc", "--surrogate", "cifar-resnet20", "--param", "budget=jnd"],
    "uc16-jnd2": ["--method", "uc", "--surrogate", "cifar-resnet20", "--param", "budget=jnd", "--param", "jnd_scale=2"],
    "uc16-resize-jnd": ["--method", "uc", "--surrogate", "cifar-resnet20", "--param", "resize=32-64",
                        "--param", "budget=jnd"],
    "uc16-jnd-de2": ["--method", "uc", "--surrogate", "cifar-resnet20", "--param", "budget=jnd", "--max-delta-e", "2"],
    "uc16-resize-jnd-de2": ["--method", "uc", "--surrogate", "cifar-resnet20", "--param", "resize=32-64",
                            "--param", "budget=jnd", "--max-delta-e", "2"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--work", type=Path, default=Path("/dev/shm/protect-fidelity"))
    args = ap.parse_args()
    photos = stage_kodak(args.work)
    env = env_for(args.work)
    rows = []
    for name in args.configs.split(","):
        out = args.work / name
        cmd = [*CLI, "images", "--json", "--quiet", *CONFIGS[name], str(photos), str(out)]
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            print(f"{name}: failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
            continue
        summary = json.loads(done.stdout)
        info = json.loads(subprocess.run([*CLI, "inspect", "--json", str(out)], env=env, check=True,
                                         capture_output=True, text=True).stdout)
        fid = info.get("fidelity", info)
        rows.append((name, summary.get("method"), summary.get("psnr_mean"), summary.get("ssim_mean"),
                     summary.get("delta_e_mean"), fid.get("delta_e_max"), wall))
        shutil.rmtree(out, ignore_errors=True)
    print("\n| config | method | PSNR dB | SSIM | dE mean | dE worst | wall s |\n|---|---|---:|---:|---:|---:|---:|")
    for name, method, p, s, de, de_max, wall in rows:
        def f(x: float | None, nd: int) -> str:
            return "-" if x is None else f"{x:.{nd}f}"
        print(f"| {name} | {method} | {f(p, 1)} | {f(s, 3)} | {f(de, 2)} | {f(de_max, 2)} | {wall:.0f} |")
    print("target (issue 19, photo defaults): dE mean <= 2.0 and SSIM >= 0.95")


if __name__ == "__main__":
    main()
