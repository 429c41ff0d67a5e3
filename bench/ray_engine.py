"""The Ray engine against the local engine, whole commands side by side (cluster start included).

1. ``protect images`` (CUDA defaults) on the 50k CIFAR-10 training PNGs and on the 16 Kodak
   photos, ``--engine local`` vs ``--engine ray`` (a private local cluster, started and stopped by
   the command), alternating, outputs on /dev/shm; median and range of the ray/local time ratio.
2. ``protect verify`` on a small grid (``--training erm,linf --defenses none,grayscale`` on the
   CIFAR subset, ``--max-per-class`` images per class, one seed): local with one torch thread
   (``OMP_NUM_THREADS=1``, what a Ray cell uses) vs Ray, fresh report folders, alternating.

    .venv/bin/python bench/ray_engine.py [--repeats 3] [--sets cifar50k,kodak] [--verify-per-class 200]
        [--verify-epochs N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CIFAR, CLI, ROOT, SHARED, env_for, run, stage_subset  # noqa: E402

SETS = {"cifar50k": CIFAR / "train", "kodak": SHARED / "kodak"}


def images(src: Path, engine: str, env: dict[str, str], work: Path) -> float:
    out = Path("/dev/shm") / f"protect-bench-ray-{engine}"
    for p in (out, out.with_name(out.name + ".protect")):
        shutil.rmtree(p, ignore_errors=True)
    extra = []
    if src == SETS["kodak"]:  # CUDA needs classes: two made-up ones
        labels = work / "kodak-labels.csv"
        files = sorted(src.glob("*.png"))
        labels.write_text("path,label\n" + "".join(f"{f.name},{'ab'[i % 2]}\n" for i, f in enumerate(files)))
        extra = ["--labels", str(labels)]
    seconds = run([*CLI, "images", "--quiet", "--engine", engine, *extra, str(src), str(out)], env)
    for p in (out, out.with_name(out.name + ".protect")):
        shutil.rmtree(p, ignore_errors=True)
    return seconds


def verify(prot: Path, clean: Path, engine: str, per_class: int, env: dict[str, str], work: Path,
           epochs: int | None = None) -> float:
    report = work / f"report-{engine}"
    shutil.rmtree(report, ignore_errors=True)
    e = dict(env, OMP_NUM_THREADS="1") if engine == "local" else env
    return run([*CLI, "verify", "--quiet", "--engine", engine, str(prot), "--test", str(CIFAR / "test"), "--clean",
                str(clean), "--tier", "quick", "--training", "erm,linf", "--defenses", "none,grayscale",
                "--max-per-class", str(per_class), "--no-cache", "--report", str(report),
                *(["--epochs", str(epochs)] if epochs else [])], e)


def summary(name: str, local: list[float], ray: list[float]) -> None:
    ratios = [r / l for l, r in zip(local, ray)]
    print(f"| {name} | {statistics.median(local):.1f} | {statistics.median(ray):.1f} | "
          f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "ray")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sets", default="cifar50k,kodak")
    ap.add_argument("--verify-per-class", type=int, default=200, help="0: skip the verify comparison")
    ap.add_argument("--verify-epochs", type=int, help="train every cell this many epochs (no small-set adaptation)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    env = env_for(args.work)
    rows = []
    for name in filter(None, args.sets.split(",")):
        local, ray = [], []
        for _ in range(args.repeats):
            local.append(images(SETS[name], "local", env, args.work))
            ray.append(images(SETS[name], "ray", env, args.work))
        rows.append((f"protect images, {name}", local, ray))
    if args.verify_per_class:
        clean = stage_subset(ROOT / "bench" / "out" / "clusters" / "clean-train")
        prot = args.work / "cuda-10k"
        if not prot.exists():
            run([*CLI, "images", "--quiet", str(clean), str(prot)], env)
        local, ray = [], []
        for _ in range(max(1, args.repeats - 1)):
            local.append(verify(prot, clean, "local", args.verify_per_class, env, args.work, args.verify_epochs))
            ray.append(verify(prot, clean, "ray", args.verify_per_class, env, args.work, args.verify_epochs))
        epochs = f", {args.verify_epochs} epochs" if args.verify_epochs else ""
        rows.append((f"protect verify, 4 cells + 2 baselines, {args.verify_per_class}/class{epochs}", local, ray))
    print("| command | local s (median) | ray s (median) | ray / local time, median (range) |")
    print("|---|---:|---:|---:|")
    for row in rows:
        summary(*row)


if __name__ == "__main__":
    main()
