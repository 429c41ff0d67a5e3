"""Real photos through the whole flow: protect, then certify at the attacker's resolutions.

    python bench/photos.py [--data flowers128|cats_vs_dogs] [--configs uc-de2,cuda,uc16]
        [--resolution 32,64] [--training erm] [--defenses none,jpeg75,grayscale] [--holdout F]
        [--table-only]

Data (``../shared/data``; its README says where they come from, never copied into the repository):
``flowers128`` (4,317 photos of 5 flower classes at 128x128, train/test) or ``cats_vs_dogs``
(1,100 original JPEGs of 706 different sizes, 800 train / 300 test, the mixed folder a real owner
has). For every configuration: ``protect images`` of the training photos (PSNR, SSIM and
low-frequency dE from the run's summary, measured on the written files), then ``protect verify
--resolution R,...`` against the test photos (or, with ``--holdout F``, against a keyed share F of
the clean training photos, whose protected copies leave the training set: one folder certifying
itself) with the clean training photos as baselines: the grid is trained at each attacker
resolution and the headline is the lowest score over the resolutions (each against the clean
reference at that size, joint bootstrap interval).
Configurations: ``uc-de2`` is what a photographer gets from ``protect images`` with no options (a
folder without labels: UC with the default surrogate under ``--max-delta-e 2``); ``cuda`` is the
default for small or grey labelled images; ``uc16`` is UC at its whole 16/255 (``--max-delta-e off``);
``waves-de2`` is ``waves`` with its perceptual budget (the default), ``waves-flat-de2`` without it.
Results: ``bench/out/photos[-DATA][-holdout]/NAME.json`` and the certificates in
``.../report-NAME``; ``--table-only`` prints the table from them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import CLI, ROOT, SHARED, env_for  # noqa: E402

CONFIGS: dict[str, list[str]] = {
    "uc-de2": ["--method", "uc", "--max-delta-e", "2"],
    "uc-resize-de2": ["--method", "uc", "--param", "resize=32-64", "--max-delta-e", "2"],
    "uc16": ["--method", "uc", "--surrogate", "cifar-resnet20"],
    "uc16-de2": ["--method", "uc", "--surrogate", "cifar-resnet20", "--max-delta-e", "2"],
    "cuda": ["--method", "cuda"],
    "cuda-de2": ["--method", "cuda", "--max-delta-e", "2"],
    "waves-de2": ["--method", "waves", "--max-delta-e", "2"],
    "waves": ["--method", "waves"],
    "waves-flat-de2": ["--method", "waves", "--param", "budget=flat", "--max-delta-e", "2"],
    # the budget's texture gain (default 4), its dark term (default 2; d0: off), the bound in
    # texture (--eps), the waves' band and number
    "waves-t16-de2": ["--method", "waves", "--param", "texture=16", "--max-delta-e", "2"],
    "waves-t32-de2": ["--method", "waves", "--param", "texture=32", "--max-delta-e", "2"],
    "waves-d0-t4-de2": ["--method", "waves", "--param", "texture=4", "--param", "dark=0", "--max-delta-e", "2"],
    "waves-d0-t8-de2": ["--method", "waves", "--param", "texture=8", "--param", "dark=0", "--max-delta-e", "2"],
    "waves-d0-t16-de2": ["--method", "waves", "--param", "texture=16", "--param", "dark=0", "--max-delta-e", "2"],
    "waves-d0-t32-de2": ["--method", "waves", "--param", "texture=32", "--param", "dark=0", "--max-delta-e", "2"],
    "waves-d0-e24-t16-de2": ["--method", "waves", "--eps", "24/255", "--param", "texture=16", "--param", "dark=0", "--max-delta-e", "2"],
    "waves-d0-e32-t16-de2": ["--method", "waves", "--eps", "32/255", "--param", "texture=16", "--param", "dark=0", "--max-delta-e", "2"],
    "waves-d0-t16-f12-de2": ["--method", "waves", "--param", "texture=16", "--param", "cycles=3-12", "--param", "dark=0", "--max-delta-e", "2"],
    "waves-d0-t16-c5-de2": ["--method", "waves", "--param", "texture=16", "--param", "components=5", "--param", "dark=0", "--max-delta-e", "2"],
    "cuda-clusters": ["--method", "cuda", "--clusters", "5", "--surrogate", "cifar-resnet20"],
    "waves-d0-t4-c1-de2": ["--method", "waves", "--param", "texture=4", "--param", "components=1", "--param", "dark=0",
                           "--max-delta-e", "2"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=("flowers128", "cats_vs_dogs"), default="flowers128")
    ap.add_argument("--configs", default="uc-de2,cuda,uc16")
    ap.add_argument("--holdout", type=float, default=None,
                    help="certify against a keyed share of the clean training photos instead of the test split")
    ap.add_argument("--resolution", default="32,64")
    ap.add_argument("--training", default="erm")
    ap.add_argument("--defenses", default="none,jpeg75,grayscale")
    ap.add_argument("--work", type=Path, default=None,
                    help="default: bench/out/photos, -DATA for another set, -holdout with --holdout")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    data = SHARED / args.data
    if args.work is None:
        name = "photos" + ("" if args.data == "flowers128" else f"-{args.data}") + ("-holdout" if args.holdout else "")
        args.work = ROOT / "bench" / "out" / name
    args.work.mkdir(parents=True, exist_ok=True)
    env = env_for(args.work)
    for name in args.configs.split(","):
        result_file = args.work / f"{name}.json"
        if args.table_only or result_file.exists():
            continue
        out = args.work / name
        cmd = [*CLI, "images", "--json", "--quiet", *CONFIGS[name], str(data / "train"), str(out)]
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        summary = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
        protect_s = time.perf_counter() - t0
        report = args.work / f"report-{name}"
        test = ["--holdout", str(args.holdout)] if args.holdout else ["--test", str(data / "test")]
        cmd = [*CLI, "verify", "--json", str(out), *test, "--clean", str(data / "train"),
               "--resolution", args.resolution, "--training", args.training, "--defenses", args.defenses,
               "--report", str(report)]
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        cert = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
        v = cert["verdict"]
        result_file.write_text(json.dumps({
            "config": name, "data": args.data, "holdout": args.holdout, "args": CONFIGS[name], "psnr": summary.get("psnr_mean"), "ssim": summary.get("ssim_mean"),
            "delta_e": summary.get("delta_e_mean"), "protect_s": round(protect_s, 1),
            "verify_s": round(time.perf_counter() - t0, 1), "score": v.get("score"), "interval": v.get("interval"),
            "headline_resolution": v.get("resolution"), "per_resolution": v.get("per_resolution"),
            "cells": [{"training": c["training"], "defense": c["defense"], "resolution": c["attacker"]["resolution"],
                       "acc": c["protected"].get("acc"), "clean": (c.get("clean") or {}).get("acc"),
                       "effect": c.get("effect")} for c in cert["cells"]],
        }, indent=1))
    print("| config | PSNR / SSIM / dE | headline (95 % interval) | per resolution: score (best attacker %, clean %) "
          "| cells: protected % (effect) | protect s | verify s |\n|---|---|---|---|---|---:|---:|")
    for name in args.configs.split(","):
        f = args.work / f"{name}.json"
        if not f.exists():
            continue
        r = json.loads(f.read_text())
        ci = r.get("interval")
        per = "; ".join(f"{p['resolution']} px {'-' if p['score'] is None else format(p['score'], '.2f')} "
                        f"({100 * (p['best_attacker'].get('acc') or 0):.1f}, {100 * (p.get('reference') or 0):.1f})"
                        for p in r["per_resolution"] or [])
        cells = "; ".join(f"{c['training']}/{c['defense']}@{c['resolution']} {100 * c['acc']:.1f} "
                          f"({'-' if c['effect'] is None else format(c['effect'], '.2f')})" for c in r["cells"])
        head = "-" if r["score"] is None else f"{r['score']:.2f}" + (f" ({ci[0]:.2f} to {ci[1]:.2f})" if ci else "")
        print(f"| {name} | {r['psnr']:.1f} / {r['ssim']:.3f} / {r['delta_e']:.2f} | {head} | {per} | {cells} | "
              f"{r['protect_s']:.0f} | {r['verify_s']:.0f} |")


if __name__ == "__main__":
    main()
