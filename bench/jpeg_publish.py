"""JPEG as a publishing step: what a platform's re-encoding at quality 75-90 leaves of each protection.

    python bench/jpeg_publish.py [--configs uc16,uc16-jpeg,cuda] [--per-class 200] [--test-per-class 100]
        [--defenses none,jpeg75,jpeg90] [--table-only]

Data: the first ``--per-class`` training images of every CIFAR-10 class (32 px PNG) and the first
``--test-per-class`` test images (from ../shared/data/cifar10). Per configuration: ``protect
images`` of the training subset, then ``protect verify`` with the clean subset as the baseline,
``--training erm`` x ``--defenses`` (``jpegQ``: the attacker trains on the published files after a
JPEG round trip at quality Q, what a platform does to an upload; its clean baseline is re-encoded
the same way), quick tier, one seed. ``uc16-jpeg`` is UC optimised through kornia's differentiable
JPEG at a keyed random quality in 75-95 (``--param jpeg=75-95``). Results:
``bench/out/jpeg_publish/NAME.json``; ``--table-only`` prints the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import CLI, ROOT, env_for, run_json, stage_subset  # noqa: E402

CONFIGS: dict[str, list[str]] = {
    "uc16": ["--method", "uc", "--surrogate", "cifar-resnet20"],
    "uc16-jpeg": ["--method", "uc", "--surrogate", "cifar-resnet20", "--param", "jpeg=75-95"],
    "uc8": ["--method", "uc", "--surrogate", "cifar-resnet20", "--eps", "8/255"],
    "uc8-jpeg": ["--method", "uc", "--surrogate", "cifar-resnet20", "--eps", "8/255", "--param", "jpeg=75-95"],
    "uc16-jnd": ["--method", "uc", "--surrogate", "cifar-resnet20", "--param", "budget=jnd"],
    "cuda": ["--method", "cuda"],
    "salm": ["--method", "salm"],
    "salm-jpeg": ["--method", "salm", "--param", "jpeg=75-95"],
}


def measure(name: str, train: Path, test: Path, defenses: str, work: Path, env: dict) -> None:
    result = work / f"{name}.json"
    if result.exists():
        return
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = run_json([*CLI, "images", "--json", "--quiet", *CONFIGS[name], str(train), str(out)], env)
    protect_s = time.perf_counter() - t0
    report = work / f"report-{name}"
    shutil.rmtree(report, ignore_errors=True)
    t0 = time.perf_counter()
    cert = run_json([*CLI, "verify", "--json", "--quiet", str(out), "--test", str(test), "--clean", str(train),
                  "--training", "erm", "--defenses", defenses, "--seeds", "1", "--report", str(report)], env)
    result.write_text(json.dumps({
        "config": name, "args": CONFIGS[name], "psnr": summary.get("psnr_mean"), "ssim": summary.get("ssim_mean"),
        "delta_e": summary.get("delta_e_mean"), "protect_s": round(protect_s, 1),
        "verify_s": round(time.perf_counter() - t0, 1), "score": cert["verdict"].get("score"),
        "interval": cert["verdict"].get("interval"),
        "cells": {c["defense"]: {"effect": c.get("effect"), "acc": c["protected"].get("acc"),
                                 "clean_acc": (c.get("clean") or {}).get("acc")} for c in cert["cells"]},
    }, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="uc16,uc16-jpeg,cuda")
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--defenses", default="none,jpeg75,jpeg90")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "jpeg_publish")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    work = args.work
    env = env_for(work)
    names = args.configs.split(",")
    defenses = args.defenses.split(",")
    if not args.table_only:
        work.mkdir(parents=True, exist_ok=True)
        train = stage_subset(work / "data" / "train", args.per_class)
        test = stage_subset(work / "data" / "test", args.test_per_class, split="test")
        for name in names:
            measure(name, train, test, args.defenses, work, env)
    print("| config | PSNR / SSIM / dE | " + " | ".join(f"{d}: score (acc / clean)" for d in defenses)
          + " | protect s |\n|---|---|" + "---|" * len(defenses) + "---:|")
    for name in names:
        f = work / f"{name}.json"
        if not f.exists():
            continue
        r = json.loads(f.read_text())
        cols = []
        for d in defenses:
            c = r["cells"].get(d)
            if c is None or c.get("effect") is None:
                cols.append("-")
                continue
            cols.append(f"{c['effect']:.2f} ({100 * c['acc']:.1f} / {100 * (c['clean_acc'] or 0):.1f} %)")
        fid = " / ".join("-" if r.get(k) is None else format(r[k], fmt)
                         for k, fmt in (("psnr", ".1f"), ("ssim", ".3f"), ("delta_e", ".2f")))
        print(f"| {name} | {fid} | " + " | ".join(cols) + f" | {r['protect_s']:.0f} |")
    print("score: the certificate's effect of that cell (1: learns nothing beyond chance, 0: as much as from "
          "the clean images); jpegQ: the attacker trains on the files after a JPEG round trip at Q")


if __name__ == "__main__":
    main()
