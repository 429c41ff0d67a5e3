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
    "uc-r56-s300": ["--method", "uc", "--surrogate", "cifar-resnet56", "--param", "steps=300"],
    "uc-random": ["--method", "uc", "--surrogate", "random:cifar-resnet20"],
    "cuda-clusters": ["--method", "cuda", "--clusters", "10", "--surrogate", "cifar-resnet56"],
    "cuda+uc-r56": ["--method", "cuda+uc", "--param", "uc.surrogate=cifar-resnet56"],
    "uc-r56-robust": ["--method", "uc", "--surrogate", "cifar-resnet56", "--robust", "4/255"],
    "uc-r56-robust8": ["--method", "uc", "--surrogate", "cifar-resnet56", "--robust", "8/255"],
    # dense error-minimising noise (SALM's machinery, mask 1) at 32/255, a shortened fit: the first
    # configuration measured to hold against fast L-inf AT 8/255 (docs/BENCHMARKS.md)
    "em32-dense": ["--method", "salm", "--mask-ratio", "1", "--eps", "32/255", "--param", "steps=10",
                   "--param", "step_size=3.2/255", "--param", "rounds=5"],
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
                    collect(report, work / f"cells-{name}-{lab}.json")
    for name in methods:  # certificates on disk (also those of an older run of this script)
        for lab in labellings:
            if (work / f"report-{name}-{lab}" / "certificate.json").exists():
                collect(work / f"report-{name}-{lab}", work / f"cells-{name}-{lab}.json")
    print_table(work, methods, labellings)


def collect(report: Path, cells_file: Path) -> None:
    """Merge the cells of ``report``'s certificate into ``cells_file`` (one entry per regime/defense)."""
    cert = json.loads((report / "certificate.json").read_text())
    kept = json.loads(cells_file.read_text()) if cells_file.exists() else {}
    for cell in cert["cells"]:
        p, c = cell["protected"], cell.get("clean") or {}
        kept[f"{cell['training']}/{cell['defense']}"] = {
            "protected_peak": p["acc"], "protected_final": p["final_acc"],
            "protected_bal": p.get("balanced_acc"), "clean_peak": c.get("acc"),
            "clean_bal": c.get("balanced_acc"), "score": cell["effect"], "chance": cert["chance"],
            "score_metric": cert.get("score_metric", "accuracy"), "score_chance": cert.get("score_chance")}
    cells_file.write_text(json.dumps(kept, indent=2))


def print_table(work: Path, methods: list[str], labellings: list[str]) -> None:
    print("| method | protect time (10k) | PSNR / SSIM | attacker labels | cell | clean | protected (chosen epoch) | "
          "balanced: clean / protected | score (metric) |")
    print("|---|---:|---|---|---|---:|---:|---|---:|")
    for name in methods:
        info_file = work / f"{name}.protect.json"
        info = json.loads(info_file.read_text()) if info_file.exists() else {}
        for lab in labellings:
            cells_file = work / f"cells-{name}-{lab}.json"
            if not cells_file.exists():
                continue
            for key, c in sorted(json.loads(cells_file.read_text()).items()):
                score = "n/a" if c["score"] is None else f"{c['score']:.2f}"
                pct = lambda v: "" if v is None else f"{100 * v:.1f}"  # noqa: E731
                bal = (f"{pct(c.get('clean_bal'))} / {pct(c.get('protected_bal'))}"
                       if c.get("score_metric") == "balanced_accuracy" else "")
                metric = "bal." if c.get("score_metric") == "balanced_accuracy" else "acc."
                print(f"| {name} | {info.get('wall_s', '')} s | {info.get('psnr', '')} / {info.get('ssim', '')} | "
                      f"{lab} (chance {100 * c['chance']:.0f} %) | {key} | {pct(c['clean_peak'])} | "
                      f"{pct(c['protected_peak'])} | {bal} | {score} ({metric}) |")


if __name__ == "__main__":
    main()
