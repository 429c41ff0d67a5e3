"""Output size and fidelity of JPEG outputs: each input's own quality (the default) against quality 95.

    python bench/jpeg_sizes.py [--per-class 30] [--work /dev/shm/protect-jpeg]

Protects the first N photos of each class of ../shared/data/SET/train (cats_vs_dogs: quality 95 4:2:0; flowers128: quality 75) with CUDA (its
defaults), once with the default (`--jpeg-quality` unset: the input's quality and subsampling) and
once with `--jpeg-quality 95`, and prints output bytes / input bytes and the mean PSNR as written.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import KEY, SHARED, env_for, protect_once  # noqa: E402,F401


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--work", type=Path, default=Path("/dev/shm/protect-jpeg"))
    ap.add_argument("--set", default="cats_vs_dogs", help="a set of ../shared/data with train/<class>/*.jpg")
    args = ap.parse_args()
    src = args.work / "in"
    shutil.rmtree(args.work, ignore_errors=True)
    for cls in sorted((SHARED / args.set / "train").iterdir()):
        (src / cls.name).mkdir(parents=True)
        for f in sorted(cls.glob("*.jpg"))[: args.per_class]:
            shutil.copyfile(f, src / cls.name / f.name)
    size_in = sum(p.stat().st_size for p in src.rglob("*.jpg"))
    env = env_for(args.work)
    for name, opts in (("auto (input's own)", []), ("quality 95, 4:4:4", ["--jpeg-quality", "95"])):
        out = args.work / name.split()[0]
        summary, seconds = protect_once(src, out, opts, env)
        size_out = sum(p.stat().st_size for p in out.rglob("*.jpg"))
        print(f"{name}: {summary['done']} photos, output/input bytes {size_out / size_in:.2f}, "
              f"mean PSNR as written {summary['psnr_mean']:.2f} dB, SSIM {summary['ssim_mean']:.3f}, {seconds} s")


if __name__ == "__main__":
    main()
