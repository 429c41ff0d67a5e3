"""Which CUDA padding is stronger: the reference code's zero padding or reflection?

Protects a 10k CIFAR-10 training subset (1000 per class from ../shared/data) in memory with CUDA
under both paddings (same key, default k=3, p_b=0.3, 8-bit rounding as the pipeline writes), then
trains the quick-tier surrogate (ERM, and with --linf fast L-inf AT) on each and on the clean
subset, scored on the full 10k test set. Lower protected accuracy = stronger protection.

    .venv/bin/python bench/padding.py [--linf] [--model fastcnn]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from perturbations import Keyring, get
from verify.data import load_folder
from verify.recipes import get_recipe
from verify.train import train_cell

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def protect_set(train, padding: str):
    method = get("cuda")(Keyring.from_seed(2023), num_classes=train.num_classes, padding=padding)
    out = []
    for i in range(0, len(train), 1000):
        x = train.x[i : i + 1000].float() / 255
        out.append((method.apply(x, train.y[i : i + 1000]) * 255).round().to(torch.uint8))
    return replace(train, x=torch.cat(out), sha256=f"{train.sha256}-cuda-{padding}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--linf", action="store_true")
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    train = load_folder(DATA / "train", max_per_class=1000)
    test = load_folder(DATA / "test", classes=train.classes)
    recipe = get_recipe("quick", model=args.model)
    sets = {"clean": train, "cuda-reflect": protect_set(train, "reflect"), "cuda-zero": protect_set(train, "zero")}
    rows = []
    for training in ["erm"] + (["linf"] if args.linf else []):
        for name, data in sets.items():
            t = time.perf_counter()
            r = train_cell(data, test, recipe, training, "none", seed=0, progress=None)
            rows.append({"data": name, "training": training, "peak": r.peak_acc, "final": r.final_acc,
                         "curve": r.curve, "wall_s": time.perf_counter() - t})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nquick tier ({recipe.model}, {recipe.epochs} epochs), 10k CIFAR-10 train subset, full test set")
    print("| data | training | peak test acc % | final % | wall s |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['data']} | {r['training']} | {100 * r['peak']:.1f} | {100 * r['final']:.1f} | {r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
