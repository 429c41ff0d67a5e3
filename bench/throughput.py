"""Throughput of `protect images` against a bare Pillow decode+encode copy of the same files.

Both run in their own subprocess over the same files, with the same number of threads and the
same PNG encoder settings (Pillow defaults), so the ratio isolates what protection costs on top of
the unavoidable image I/O. Peak RSS is read from the finished subprocess (``wait4``).

    .venv/bin/python bench/throughput.py                       # 10k + 50k CIFAR-10, 16 Kodak photos
    .venv/bin/python bench/throughput.py --sets cifar10k,kodak  # a subset

Needs ../shared/data (CIFAR-10 PNG folders and the Kodak photos).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
KEY = "benchmark-key-not-secret"

BARE = r"""
import io, os, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from PIL import Image
src, dst, workers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
files = sorted(p for p in src.rglob("*") if p.suffix.lower() == ".png")
def copy(p):
    data = p.read_bytes()
    im = Image.open(io.BytesIO(data)); im.load()
    buf = io.BytesIO(); im.save(buf, format="PNG")
    out = dst / p.relative_to(src); out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buf.getvalue())
t = time.perf_counter()
with ThreadPoolExecutor(workers) as ex:
    list(ex.map(copy, files))
print(len(files), time.perf_counter() - t)
"""


def peak_rss_run(cmd: list[str], env: dict[str, str]) -> tuple[str, float, float]:
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return out, wall, usage.ru_maxrss / 1024.0


def stage(name: str, work: Path) -> tuple[Path, Path | None]:
    """The input folder (and label file) for a set."""
    if name == "cifar50k":
        return DATA / "cifar10" / "train", None
    if name == "cifar10k":
        dst = work / "in-cifar10k"
        if not dst.exists():
            for cls in sorted((DATA / "cifar10" / "train").iterdir()):
                (dst / cls.name).mkdir(parents=True)
                for f in sorted(cls.glob("*.png"))[:1000]:
                    shutil.copyfile(f, dst / cls.name / f.name)
        return dst, None
    if name == "kodak":
        labels = work / "kodak-labels.csv"
        files = sorted((DATA / "kodak").glob("*.png"))
        labels.write_text("path,label\n" + "".join(f"{f.name},{'ab'[i % 2]}\n" for i, f in enumerate(files)))
        return DATA / "kodak", labels
    raise SystemExit(f"unknown set {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="kodak,cifar10k,cifar50k")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "throughput")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"benchmark data not found at {DATA}")
    args.work.mkdir(parents=True, exist_ok=True)
    # Outputs go to a fresh folder: rewriting just-deleted files is much slower on ext4 with
    # discard, which would distort both timings. Older runs are deleted after this one is measured.
    old_runs = sorted(args.work.glob("run-*"))
    run_dir = args.work / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    env = {**os.environ, "PROTECT_KEY": KEY}
    protect_bin = str(Path(sys.executable).with_name("protect"))
    rows = []
    for name in args.sets.split(","):
        src, labels = stage(name, args.work)
        out, bare_wall, bare_rss = peak_rss_run(
            [sys.executable, "-c", BARE, str(src), str(run_dir / f"{name}-bare"), str(args.workers)], env)
        n, bare_s = int(out.split()[0]), float(out.split()[1])
        cmd = [protect_bin, "images", "--quiet", "--json", "--workers", str(args.workers), "--device", args.device,
               str(src), str(run_dir / f"{name}-protected")]
        if labels:
            cmd[2:2] = ["--labels", str(labels)]
        out, wall, rss = peak_rss_run(cmd, env)
        summary = json.loads(out)
        assert summary["done"] == n, (summary["done"], n)
        row = {
            "set": name, "images": n, "bare_img_s": n / bare_s, "protect_img_s": n / summary["seconds"],
            "protect_wall_img_s": n / wall, "ratio": bare_s / summary["seconds"], "ratio_wall": bare_wall / wall,
            "bare_rss_mib": bare_rss, "protect_rss_mib": rss, "psnr": summary["psnr_mean"], "ssim": summary["ssim_mean"],
            "device": summary["device"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}; "
          f"workers {args.workers}")
    print("| set | images | bare copy img/s | protect img/s | ratio (loop) | ratio (incl. start-up) | peak RSS bare / protect (MiB) | mean PSNR / SSIM |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['set']} | {r['images']} | {r['bare_img_s']:.0f} | {r['protect_img_s']:.0f} | {r['ratio']:.2f} | "
              f"{r['ratio_wall']:.2f} | {r['bare_rss_mib']:.0f} / {r['protect_rss_mib']:.0f} | {r['psnr']:.1f} dB / {r['ssim']:.3f} |")
    for old in old_runs:
        shutil.rmtree(old, ignore_errors=True)


if __name__ == "__main__":
    main()
