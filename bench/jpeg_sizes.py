"""Output size and fidelity of JPEG outputs: each input's own quality (the default) against quality 95.

    python bench/jpeg_sizes.py [--per-class 30] [--work /dev/shm/protect-jpeg] [--verify]

Protects the first N photos of each class of ../shared/data/SET/train (cats_vs_dogs: quality 95 4:2:0; flowers128: quality 75;
cifar10: its PNGs first saved as JPEG at --input-quality, the test set too) with CUDA (its
defaults), once with the default (`--jpeg-quality` unset: the input's quality and subsampling) and
once with `--jpeg-quality 95`, and prints output bytes / input bytes and the mean PSNR as written.
With --verify it also certifies both outputs (quick tier, ERM, no defense, against SET/test with the
staged originals as --clean): what the lower quality costs the protection.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import CLI, KEY, SHARED, env_for, protect_once  # noqa: E402,F401


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--work", type=Path, default=Path("/dev/shm/protect-jpeg"))
    ap.add_argument("--set", default="cats_vs_dogs", help="a set of ../shared/data with train/<class>/*.jpg")
    ap.add_argument("--verify", action="store_true", help="also certify both outputs (quick tier, ERM)")
    ap.add_argument("--input-quality", type=int, default=75,
                    help="--set cifar10 only: the JPEG quality the PNG images are first saved at")
    args = ap.parse_args()
    src = args.work / "in"
    shutil.rmtree(args.work, ignore_errors=True)
    test = SHARED / args.set / "test"
    if args.set == "cifar10":  # PNG: made JPEG at --input-quality (4:2:0), train and test alike
        test = args.work / "test"
        _jpeg_copy(SHARED / "cifar10" / "train", src, args.per_class, args.input_quality)
        _jpeg_copy(SHARED / "cifar10" / "test", test, 10**9, args.input_quality)
    for cls in sorted((SHARED / args.set / "train").iterdir()) if args.set != "cifar10" else []:
        (src / cls.name).mkdir(parents=True)
        for f in sorted(cls.glob("*.jpg"))[: args.per_class]:
            shutil.copyfile(f, src / cls.name / f.name)
    size_in = sum(p.stat().st_size for p in src.rglob("*.jpg"))
    env = env_for(args.work)
    for name, opts in (("auto (input's own)", []), ("quality 95, 4:4:4", ["--jpeg-quality", "95"])):
        out = args.work / name.split()[0]
        summary, seconds = protect_once(src, out, opts, env)
        size_out = sum(p.stat().st_size for p in out.rglob("*.jpg"))
        line = (f"{name}: {summary['done']} photos, output/input bytes {size_out / size_in:.2f}, "
                f"mean PSNR as written {summary['psnr_mean']:.2f} dB, SSIM {summary['ssim_mean']:.3f}, {seconds} s")
        if args.verify:
            line += "; " + certify(out, src, test, env)
        print(line, flush=True)


def _jpeg_copy(src: Path, dst: Path, per_class: int, quality: int) -> None:
    """The first ``per_class`` PNG images of each class of ``src`` saved as JPEG at ``quality`` under ``dst``."""
    from PIL import Image

    for cls in sorted(src.iterdir()):
        (dst / cls.name).mkdir(parents=True)
        for f in sorted(cls.glob("*.png"))[:per_class]:
            with Image.open(f) as img:
                img.convert("RGB").save(dst / cls.name / (f.stem + ".jpg"), quality=quality, subsampling=2)


def certify(out: Path, clean: Path, test: Path, env: dict[str, str]) -> str:
    """Quick-tier ERM certificate of ``out``: the score, and protected against clean accuracy."""
    cmd = [*CLI, "verify", "--quiet", "--json", "--tier", "quick", "--training", "erm", "--defenses", "none",
           "--seeds", "1", "--test", str(test), "--clean", str(clean), str(out)]
    print("$", " ".join(cmd), flush=True)
    cert = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
    verdict = cert["verdict"]
    best = verdict["best_attacker"]
    ci = verdict.get("interval") or [float("nan")] * 2
    return (f"verify quick ERM: score {verdict['score']:.3f} (95% interval {ci[0]:.2f} to {ci[1]:.2f}; protected "
            f"{best['acc']:.3f}, clean {verdict['reference']['acc']:.3f})")


if __name__ == "__main__":
    main()
