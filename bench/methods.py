"""Every method under the default certificate (protect.certificate/2, quick tier) on 10k CIFAR-10.

On the 10k CIFAR-10 training subset (first 1000 images per class of ../shared/data) and the full
10k test set (a keyed 2,000 of it choose each cell's epoch, the other 8,000 are scored):

1. protect the subset with each method (whole ``protect images`` commands, timed; PSNR/SSIM from
   the run summary; a protected copy already there is reused);
2. ``protect verify PROT --test TEST --clean CLEAN --tier quick``, the default grid exactly as a
   user runs it: the method is read from the run record, so its published breakers join the grid,
   and the adversarial cell uses the quick tier's AT learner (fastcnn_wide, 40 epochs).

The baseline cache is shared by the runs and emptied at the start (``--keep-cache`` keeps it): the
first run pays for the clean baselines (the clean ERM reference and the clean AT baseline) and its
wall time is the cold default certificate; later runs reuse them. A report folder already holding
a certificate is read, not rerun (``--fresh`` reruns). Results: bench/out/methods/<run>.json and
a Markdown table (with the old rule's score on the same cells: the cell with the highest
protected peak against its own clean baseline, as protect.certificate/1 reported it).

    .venv/bin/python bench/methods.py [--runs cuda,uc-r56,cuda+uc-r56,salm,em32-dense] [--keep-cache]
        [--fresh] [--table-only]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CIFAR, CLI, ROOT, env_for, pick_runs, protect_once, stage_subset  # noqa: E402

METHODS = {
    "cuda": ["--method", "cuda"],
    "uc-r56": ["--method", "uc", "--surrogate", "cifar-resnet56"],
    "cuda+uc-r56": ["--method", "cuda+uc", "--param", "uc.surrogate=cifar-resnet56"],
    "salm": ["--method", "salm"],
    # dense error-minimising noise at 32/255, a shortened fit (docs/BENCHMARKS.md, bench/clusters.py)
    "em32-dense": ["--method", "salm", "--mask-ratio", "1", "--eps", "32/255", "--param", "steps=10",
                   "--param", "step_size=3.2/255", "--param", "rounds=5"],
}


def protect(work: Path, name: str, clean: Path, env: dict[str, str]) -> dict:
    out, info_file = work / name, work / f"{name}.protect.json"
    if info_file.exists() and out.exists():
        return json.loads(info_file.read_text())
    summary, wall = protect_once(clean, out, METHODS[name], env)
    info = {"method": name, "wall_s": wall, "psnr": summary["psnr_mean"], "ssim": summary["ssim_mean"],
            "params": summary["params"]}
    info_file.write_text(json.dumps(info, indent=2))
    return info


def verify(work: Path, name: str, clean: Path, env: dict[str, str], fresh: bool) -> dict:
    report = work / f"report-{name}"
    if fresh or not (report / "certificate.json").exists():
        shutil.rmtree(report, ignore_errors=True)  # saved cells would make `verify` resume, not train
        cmd = [*CLI, "verify", "--quiet", str(work / name), "--test", str(CIFAR / "test"), "--clean", str(clean),
               "--tier", "quick", "--report", str(report)]
        print("$", " ".join(cmd), flush=True)
        import subprocess

        t = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        (report / "wall_s.txt").write_text(f"{time.perf_counter() - t:.1f}\n")
    return json.loads((report / "certificate.json").read_text())


def old_rule(cert: dict) -> float | None:
    """The verdict of protect.certificate/1 on these cells: the cell with the highest protected
    *peak* (epoch chosen with the test labels) against *its own* clean baseline's peak."""
    best = max(cert["cells"], key=lambda c: c["protected"]["peak_acc"])
    clean = (best.get("clean") or {}).get("peak_acc")
    if clean is None or clean - cert["chance"] <= 0:
        return None
    return round((clean - best["protected"]["peak_acc"]) / (clean - cert["chance"]), 3)


def summarise(name: str, info: dict, cert: dict, wall: float | None) -> dict:
    v = cert["verdict"]
    cells = []
    for cell in cert["cells"]:
        p, c = cell["protected"], cell.get("clean") or {}
        cells.append({"cell": f"{cell['training']}/{cell['defense']}", "protected": p["acc"],
                      "protected_peak": p["peak_acc"], "clean": c.get("acc"), "effect": cell.get("effect"),
                      "wall_s": p.get("wall_s")})
    return {"run": name, "protect": info, "score": v.get("score"), "interval": v.get("interval"),
            "conclusive": v.get("conclusive"), "best": v.get("best_attacker"), "reference": v.get("reference"),
            "oracle": (v.get("oracle") or {}).get("score"), "smallest_effect": v.get("smallest_effect"),
            "old_rule": old_rule(cert), "verify_wall_s": wall, "cache": cert.get("baseline_cache"), "cells": cells,
            "left_out": (cert.get("breakers") or {}).get("left_out")}


def pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.1f}"


def table(rows: list[dict]) -> None:
    print("| method | PSNR / SSIM | protect s | headline score (95 % interval) | best attacker | old rule | "
          "cells: protected % (effect) | verify wall |")
    print("|---|---|---:|---|---|---:|---|---:|")
    for r in rows:
        ci = r["interval"] or [None, None]
        score = "n/a" if r["score"] is None else f"{r['score']:.2f}"
        if ci[0] is not None:
            score += f" ({ci[0]:.2f} to {ci[1]:.2f})"
        if r["conclusive"] is False:
            score += ", inconclusive"
        best = r["best"] or {}
        cells = "; ".join(f"{c['cell']} {pct(c['protected'])}"
                          + ("" if c["effect"] is None else f" ({c['effect']:.2f})") for c in r["cells"])
        wall = "" if r["verify_wall_s"] is None else f"{r['verify_wall_s'] / 60:.1f} min"
        print(f"| {r['run']} | {r['protect'].get('psnr')} / {r['protect'].get('ssim')} | "
              f"{r['protect'].get('wall_s')} | {score} | {best.get('training')}/{best.get('defense')} | "
              f"{'n/a' if r['old_rule'] is None else format(r['old_rule'], '.2f')} | {cells} | {wall} |")
    ref = next((r["reference"] for r in rows if r.get("reference")), None)
    if ref:
        print(f"\nreference (clean ERM, no defense): {pct(ref.get('acc') if isinstance(ref, dict) else ref)} %")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "methods")
    ap.add_argument("--runs", default=",".join(METHODS))
    ap.add_argument("--keep-cache", action="store_true", help="keep the clean baselines of an earlier run")
    ap.add_argument("--fresh", action="store_true", help="rerun certificates already on disk")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    names = pick_runs(args.runs, METHODS)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    env = env_for(work)
    if not args.keep_cache and not args.table_only:
        shutil.rmtree(work / "baseline-cache", ignore_errors=True)
    clean = stage_subset(work / "clean-train")
    rows = []
    for name in names:
        if args.table_only:
            if not (work / f"report-{name}" / "certificate.json").exists():
                continue
            info = json.loads((work / f"{name}.protect.json").read_text())
        else:
            info = protect(work, name, clean, env)
        cert = verify(work, name, clean, env, args.fresh) if not args.table_only else json.loads(
            (work / f"report-{name}" / "certificate.json").read_text())
        wall_file = work / f"report-{name}" / "wall_s.txt"
        row = summarise(name, info, cert, float(wall_file.read_text()) if wall_file.exists() else None)
        (work / f"{name}.json").write_text(json.dumps(row, indent=2))
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("run", "score", "interval", "best", "verify_wall_s")}), flush=True)
    table(rows)


if __name__ == "__main__":
    main()
