"""SALM on medical images (and CUDA and dense error-minimising noise beside it), quick tier.

Data: BreastMNIST and the PneumoniaMNIST variant from ../shared/data/medmnist, converted with
``protect import-npz`` (train / test class folders), optionally the 10k CIFAR-10 subset of
bench/clusters.py. For every set and method:

1. ``protect images`` (timed whole command; PSNR/SSIM from its summary; share of pixels changed
   measured here from the files);
2. ``protect verify --tier quick`` with the phase's trainings and defenses; balanced accuracy, AUC
   and accuracy per cell from the certificate.

Methods: ``salm-0.02 .. salm-0.3`` (mask ratio), ``dense`` (SALM with mask ratio 1: sample-wise
error-minimising noise), ``cuda``. Clean baselines come with every verify run.

    .venv/bin/python bench/medical.py [--sets breast,pneumonia] [--methods salm-0.1,dense,cuda]
        [--phases erm,linf,breakers,pretrained] [--table-only]

Phase ``pretrained``: scratch ERM beside ``probe:cifar-resnet56`` (a new linear head on the frozen
features of the CIFAR-10 ResNet-56) and ``finetune:cifar-resnet56`` (all its weights), each with its
own clean baseline; the backbone never saw these images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CIFAR, CLI, ROOT, SHARED, env_for, protect_once, run, stage_subset  # noqa: E402

NPZ = {"breast": (SHARED / "medmnist" / "breastmnist.npz", "malignant,normal"),
       "pneumonia": (SHARED / "medmnist" / "pneumoniamnist_kaggle_variant.npz", "normal,pneumonia")}
METHODS = {f"salm-{r}": ["--method", "salm", "--mask-ratio", str(r)] for r in (0.02, 0.05, 0.1, 0.3)}
METHODS["salm-0.1-aug"] = ["--method", "salm", "--mask-ratio", "0.1", "--param", "augment=true"]
METHODS["dense"] = ["--method", "salm", "--mask-ratio", "1"]
METHODS["cuda"] = ["--method", "cuda"]
METHODS["cuda+salm-aug"] = ["--method", "cuda+salm", "--param", "salm.augment=true"]
METHODS["salm-0.1-aug-robust"] = ["--method", "salm", "--mask-ratio", "0.1", "--param", "augment=true",
                                  "--robust", "2/255", "--param", "robust_steps=3"]
# BreastMNIST's test split holds one image whose pixels are also in its training split (test_0076,
# labelled normal, is train_0115, labelled malignant), and 8 of the PneumoniaMNIST variant's 524
# validation images are training images: verify refuses either unless told (1 of 156; 8 of 524).
OVERLAP = {"breast": ["--allow-overlap"], "pneumonia": ["--allow-overlap"]}
PHASES = {"erm": ("erm", "none"), "linf": ("linf", "none"), "breakers": ("erm", "grayscale,jpeg10"),
          # attackers who start from a network pretrained on other data (CIFAR-10's ResNet-56), beside scratch ERM
          "pretrained": ("erm,probe:cifar-resnet56,finetune:cifar-resnet56", "none")}


def stage(work: Path, name: str, env: dict[str, str]) -> tuple[Path, Path]:
    if name == "cifar":
        return stage_subset(ROOT / "bench" / "out" / "clusters" / "clean-train"), CIFAR / "test"
    root = work / f"{name}-data"
    if not root.exists():
        npz, classes = NPZ[name]
        run([*CLI, "import-npz", str(npz), str(root), "--class-names", classes], env)
    return root / "train", root / "test"


def changed_share(clean: Path, prot: Path) -> float:
    changed = total = 0
    for f in sorted(clean.rglob("*.png")):
        a = np.asarray(Image.open(f)).astype(np.int32)
        b = np.asarray(Image.open(prot / f.relative_to(clean))).astype(np.int32)
        d = a != b
        if d.ndim == 3:
            d = d.any(axis=2)  # a pixel position is changed when any channel is
        changed += int(d.sum())
        total += d.size
    return changed / max(1, total)


def protect(work: Path, set_name: str, method: str, train: Path, env: dict[str, str]) -> dict:
    out = work / f"{set_name}-{method}"
    info_file = work / f"{set_name}-{method}.protect.json"
    if info_file.exists() and out.exists():
        return json.loads(info_file.read_text())
    summary, wall = protect_once(train, out, METHODS[method], env)
    info = {"set": set_name, "method": method, "wall_s": wall, "fit_s": summary.get("fit_seconds"), "images": summary["done"],
            "psnr": summary["psnr_mean"], "ssim": summary["ssim_mean"], "changed": round(changed_share(train, out), 4),
            "params": summary["params"]}
    info_file.write_text(json.dumps(info, indent=2))
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "medical")
    ap.add_argument("--sets", default="breast,pneumonia")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--phases", default="erm")
    ap.add_argument("--seeds", type=int, help="attacker seeds per cell (default: verify's, 3 under 2,000 images)")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    env = env_for(work)
    sets, methods = args.sets.split(","), args.methods.split(",")
    if not args.table_only:
        for set_name in sets:
            train, test = stage(work, set_name, env)
            for method in methods:
                protect(work, set_name, method, train, env)
            for phase in args.phases.split(","):
                training, defenses = PHASES[phase]
                for method in methods:
                    report = work / f"report-{set_name}-{method}"
                    cmd = [*CLI, "verify", "--quiet", str(work / f"{set_name}-{method}"), "--test", str(test),
                           "--clean", str(train), "--tier", "quick", "--report", str(report), "--training", training,
                           "--defenses", defenses, *OVERLAP.get(set_name, [])]
                    if args.seeds is not None:
                        cmd += ["--seeds", str(args.seeds)]
                    if (train.parent / "val").is_dir():  # MedMNIST's own validation split chooses the epochs
                        cmd += ["--val", str(train.parent / "val")]
                    run(cmd, env)
                    cert = json.loads((report / "certificate.json").read_text())
                    cells_file = work / f"cells-{set_name}-{method}.json"
                    kept = json.loads(cells_file.read_text()) if cells_file.exists() else {}
                    for cell in cert["cells"]:
                        p, c = cell["protected"], cell.get("clean") or {}
                        kept[f"{cell['training']}/{cell['defense']}"] = {
                            k: v for k, v in {
                                "bal": p.get("balanced_acc"), "auc": p.get("auc"), "acc": p.get("acc"),
                                "clean_bal": c.get("balanced_acc"), "clean_auc": c.get("auc"),
                                "clean_acc": c.get("acc"), "score": cell.get("effect"),
                                "score_metric": cert.get("score_metric")}.items()}
                    cells_file.write_text(json.dumps(kept, indent=2))
    print_table(work, sets, methods)
    print_verdicts(work, sets, methods)


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.1f}"


def print_table(work: Path, sets: list[str], methods: list[str]) -> None:
    print("| set | method | protect time | PSNR / SSIM | pixels changed | cell | balanced acc (clean) | AUC (clean) | acc (clean) | score |")
    print("|---|---|---:|---|---:|---|---:|---:|---:|---:|")
    for set_name in sets:
        for method in methods:
            info_file = work / f"{set_name}-{method}.protect.json"
            cells_file = work / f"cells-{set_name}-{method}.json"
            if not info_file.exists() or not cells_file.exists():
                continue
            info = json.loads(info_file.read_text())
            for key, c in sorted(json.loads(cells_file.read_text()).items()):
                score = "n/a" if c.get("score") is None else f"{c['score']:.2f}"
                print(f"| {set_name} ({info['images']}) | {method} | {info['wall_s']} s | {info['psnr']} / {info['ssim']} | "
                      f"{100 * info['changed']:.1f} % | {key} | {_pct(c.get('bal'))} ({_pct(c.get('clean_bal'))}) | "
                      f"{_pct(c.get('auc'))} ({_pct(c.get('clean_auc'))}) | {_pct(c.get('acc'))} ({_pct(c.get('clean_acc'))}) | {score} |")


def print_verdicts(work: Path, sets: list[str], methods: list[str]) -> None:
    """The headline of each report's certificate: best attacker against the clean ERM reference."""
    for set_name in sets:
        for method in methods:
            cert_file = work / f"report-{set_name}-{method}" / "certificate.json"
            if not cert_file.exists():
                continue
            cert = json.loads(cert_file.read_text())
            v = cert["verdict"]
            ci = v.get("interval") or [None, None]
            best = v["best_attacker"]
            score = "n/a" if v.get("score") is None else f"{v['score']:.2f}"
            print(f"{set_name} {method}: headline {score}" + ("" if ci[0] is None else f" ({ci[0]:.2f} to {ci[1]:.2f})")
                  + ("" if v.get("conclusive") else f", inconclusive ({v.get('inconclusive_reason')})")
                  + f"; best attacker {best['training']}/{best['defense']}, seeds {cert['seeds']}, "
                  f"trainings {[t['name'] for t in cert['trainings']]}")


if __name__ == "__main__":
    main()
