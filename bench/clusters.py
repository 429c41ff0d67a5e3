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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CIFAR, CLI, ROOT, env_for, protect_once, run, stage_subset  # noqa: E402

METHODS = {
    "cuda": ["--method", "cuda"],
    "uc-r56": ["--method", "uc", "--surrogate", "cifar-resnet56"],
    "uc-random": ["--method", "uc", "--surrogate", "random:cifar-resnet20"],
    "cuda-clusters": ["--method", "cuda", "--clusters", "10", "--surrogate", "cifar-resnet56"],
}
LABELLINGS = {"original": [], "coarse": ["--relabel", str(ROOT / "samples" / "cifar10" / "coarse.json")],
              "random5": ["--relabel", "random:5"]}
PHASES = {"erm": ("erm", "none"), "linf": ("linf", "none"), "breakers": ("erm", "grayscale,jpeg10")}


def protect(work: Path, name: str, clean: Path, env: dict[str, str]) -> dict:
    out = work / name
    info_file = work / f"{name}.protect.json"
    if info_file.exists() and out.exists():
        return json.loads(info_file.read_text())
    summary, wall = protect_once(clean, out, METHODS[name], env)
    info = {"method": name, "wall_s": wall, "fit_s": summary.get("fit_seconds"), "psnr": summary["psnr_mean"],
            "ssim": summary["ssim_mean"], "params": summary["params"]}
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
    env = env_for(work)
    clean = stage_subset(work / "clean-train")
    test = CIFAR / "test"
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
