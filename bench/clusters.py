"""Label-agnostic protection on CIFAR-10: Unlearnable Clusters, label-agnostic CUDA and class-wise
CUDA against attackers with the original labels and with their own labels (quick tier).

On the 10k CIFAR-10 training subset (first 1000 images per class of ../shared/data) and the full
10k test set:

1. protect the subset with every method (timed whole ``protect images`` commands, PSNR/SSIM from
   the run summary); UC and label-agnostic CUDA never see the labels;
2. ``protect verify --tier quick`` each protected copy under each labelling (original, the coarse
   animal/vehicle map, ``random:5``), with the trainings and defenses of the chosen phase.

Phases (each adds cells; finished cells are kept in the report folders, so a rerun resumes):
``erm`` (ERM, no defense), ``linf`` (fast L-inf AT, no defense), ``breakers`` (ERM with grayscale and
JPEG-10). Results: one JSON per (method, labelling) under bench/out/clusters/, and a Markdown table.

    .venv/bin/python bench/clusters.py [--methods cuda,uc-r56,...] [--phases erm,linf,breakers]
        [--labellings original,coarse,random5] [--table-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: This checkout's CLI (run with PYTHONPATH=ROOT): a benchmark measures the code it lives beside.
CLI = [sys.executable, "-m", "cli.main"]
DATA = ROOT.parent / "shared" / "data" / "cifar10"
KEY = "benchmark-key-not-secret"
METHODS = {
    "cuda": ["--method", "cuda"],
    "uc-r56": ["--method", "uc", "--surrogate", "cifar-resnet56"],
    "uc-random": ["--method", "uc", "--surrogate", "random:cifar-resnet20"],
    "cuda-clusters": ["--method", "cuda", "--clusters", "10", "--surrogate", "cifar-resnet56"],
}
LABELLINGS = {"original": [], "coarse": ["--relabel", str(ROOT / "samples" / "cifar10" / "coarse.json")],
              "random5": ["--relabel", "random:5"]}
PHASES = {"erm": ("erm", "none"), "linf": ("linf", "none"), "breakers": ("erm", "grayscale,jpeg10")}


def run(cmd: list[str], env: dict[str, str]) -> float:
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def stage_subset(dst: Path, per_class: int = 1000) -> Path:
    if not dst.exists():
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for cls in sorted((DATA / "train").iterdir()):
            (tmp / cls.name).mkdir(parents=True)
            for f in sorted(cls.glob("*.png"))[:per_class]:
                shutil.copyfile(f, tmp / cls.name / f.name)
        tmp.rename(dst)
    return dst


def protect(work: Path, name: str, clean: Path, env: dict[str, str]) -> dict:
    out = work / name
    info_file = work / f"{name}.protect.json"
    if info_file.exists() and out.exists():
        return json.loads(info_file.read_text())
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".protect"), ignore_errors=True)
    cmd = [*CLI, "images", "--quiet", "--json", *METHODS[name], str(clean), str(out)]
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t
    summary = json.loads(proc.stdout)
    info = {"method": name, "wall_s": round(wall, 1), "psnr": summary["psnr_mean"], "ssim": summary["ssim_mean"],
            "params": summary["params"]}
    info_file.write_text(json.dumps(info, indent=2))
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "clusters")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--labellings", default=",".join(LABELLINGS))
    ap.add_argument("--phases", default="erm")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PROTECT_KEY": KEY, "PROTECT_CACHE": str(work / "baseline-cache"), "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = str(ROOT)
    clean = stage_subset(work / "clean-train")
    test = DATA / "test"
    methods = args.methods.split(",")
    labellings = args.labellings.split(",")
    if not args.table_only:
        for name in methods:
            protect(work, name, clean, env)
        for phase in args.phases.split(","):
            training, defenses = PHASES[phase]
            for name in methods:
                for lab in labellings:
                    report = work / f"report-{name}-{lab}"
                    cmd = [*CLI, "verify", "--quiet", str(work / name), "--test", str(test), "--clean",
                           str(clean), "--tier", "quick", "--report", str(report), "--training", training,
                           "--defenses", defenses, *LABELLINGS[lab]]
                    run(cmd, env)
                    cert = json.loads((report / "certificate.json").read_text())
                    cells_file = work / f"cells-{name}-{lab}.json"
                    kept = json.loads(cells_file.read_text()) if cells_file.exists() else {}
                    for cell in cert["cells"]:
                        kept[f"{cell['training']}/{cell['defense']}"] = {
                            "protected_peak": cell["protected"]["peak_acc"],
                            "protected_final": cell["protected"]["final_acc"],
                            "clean_peak": (cell.get("clean") or {}).get("peak_acc"),
                            "score": cell["score"], "chance": cert["chance"]}
                    cells_file.write_text(json.dumps(kept, indent=2))
    print_table(work, methods, labellings)


def print_table(work: Path, methods: list[str], labellings: list[str]) -> None:
    print("| method | protect time (10k) | PSNR / SSIM | attacker labels | cell | clean peak | protected peak | score |")
    print("|---|---:|---|---|---|---:|---:|---:|")
    for name in methods:
        info_file = work / f"{name}.protect.json"
        info = json.loads(info_file.read_text()) if info_file.exists() else {}
        for lab in labellings:
            cells_file = work / f"cells-{name}-{lab}.json"
            if not cells_file.exists():
                continue
            for key, c in sorted(json.loads(cells_file.read_text()).items()):
                score = "n/a" if c["score"] is None else f"{c['score']:.2f}"
                clean_peak = "" if c["clean_peak"] is None else f"{100 * c['clean_peak']:.1f}"
                print(f"| {name} | {info.get('wall_s', '')} s | {info.get('psnr', '')} / {info.get('ssim', '')} | "
                      f"{lab} (chance {100 * c['chance']:.0f} %) | {key} | {clean_peak} | "
                      f"{100 * c['protected_peak']:.1f} | {score} |")


if __name__ == "__main__":
    main()
