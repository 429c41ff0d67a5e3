"""SALM parameter sweep, in one process: fit SALM on a labelled set with each configuration, apply
it, and train the quick tier's attacker (ERM, or fast L-inf AT) on the result; one line per
configuration with the balanced accuracy, the score against the clean baseline, PSNR and fit time.

This is the tuning loop behind the defaults (the full pipeline and certificate are exercised by
bench/medical.py): the fit reads the folder through the pipeline's own fit pass, but nothing is
written, so a configuration costs one fit and one training.

    .venv/bin/python bench/salm_sweep.py --set breast --config base: --config aug:augment=true \
        [--training erm] [--seed 0] [--out bench/out/salm-sweep]

``--config NAME:key=value,key=value`` (SALM parameters; values parsed as JSON when they parse).
Sets: ``breast``, ``pneumonia`` (the folders bench/medical.py imports), ``cifar2k`` (the first 200
images of each class of the 10k CIFAR subset of bench/clusters.py, with the full test set).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CIFAR, KEY, ROOT  # noqa: E402

from perturbations import FitData  # noqa: E402
from perturbations.base import parse_assignments  # noqa: E402
from perturbations.salm import SALM  # noqa: E402
from protect import fidelity  # noqa: E402
from protect.discover import discover  # noqa: E402
from protect.fitpass import fit_data as pipeline_fit_data  # noqa: E402
from protect.imageio import DEFAULT_MAX_PIXELS  # noqa: E402
from protect.keys import derive_keyring  # noqa: E402
from verify.data import TensorSet, load_folder  # noqa: E402
from verify.metrics import is_imbalanced  # noqa: E402
from verify.recipes import fit_to_data, get_recipe  # noqa: E402
from verify.train import train_cell  # noqa: E402

KEYRING = derive_keyring(KEY)
MED = ROOT / "bench" / "out" / "medical"
SETS = {"breast": (MED / "breast-data" / "train", MED / "breast-data" / "test", None),
        "pneumonia": (MED / "pneumonia-data" / "train", MED / "pneumonia-data" / "test", None),
        "cifar2k": (ROOT / "bench" / "out" / "clusters" / "clean-train", CIFAR / "test", 200)}


def parse_config(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    return name, parse_assignments(filter(None, rest.split(",")))


def fit_data(train: TensorSet) -> FitData:
    """What ``protect images`` gives SALM for ``train``'s files: the pipeline's own fit pass over
    the folder, kept to the loaded images."""
    ds = discover(train.root)
    keep = set(train.rels)
    ds = dataclasses.replace(ds, entries=[e for e in ds.entries if e.rel in keep])
    return pipeline_fit_data(ds, DEFAULT_MAX_PIXELS, memory=1 << 31)


def protect(train: TensorSet, params: dict) -> tuple[TensorSet, float, float, list]:
    t = time.perf_counter()
    method = SALM(KEYRING, **params).fit(fit_data(train))
    fit_s = time.perf_counter() - t
    q = torch.cat([method.protect_levels(train.x[i:i + 256], train.y[i:i + 256], train.rels[i:i + 256])
                   for i in range(0, len(train), 256)])  # the pipeline's integer path
    psnr = float(fidelity.psnr(train.x.float() / 255, q.float() / 255).mean())
    prot = TensorSet(q, train.y, train.classes, train.root, "salm-sweep", list(train.rels))
    return prot, fit_s, psnr, method.history


def attacker_accuracy(train: TensorSet, test: TensorSet, training: str, seed: int, balanced: bool) -> tuple[float, float]:
    """The attacker's peak and final test accuracy (balanced when ``balanced``)."""
    recipe = fit_to_data(get_recipe("quick"), len(train))
    r = train_cell(train, test, recipe, training, "none", seed)
    return (r.peak_balanced_acc, r.final_balanced_acc) if balanced else (r.peak_acc, r.final_acc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", default="breast", choices=sorted(SETS))
    ap.add_argument("--config", action="append", required=True)
    ap.add_argument("--training", default="erm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "salm-sweep")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train_dir, test_dir, per_class = SETS[args.set]
    train = load_folder(train_dir, max_per_class=per_class)
    test = load_folder(test_dir, classes=train.classes)
    balanced = is_imbalanced(torch.bincount(test.y).tolist())
    chance = 1 / test.num_classes if balanced else float(torch.bincount(test.y).max()) / len(test)
    cache = args.out / f"clean-{args.set}-{args.training}-{args.seed}.json"
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    if "final" in cached:
        clean, clean_final = cached["peak"], cached["final"]
    else:
        clean, clean_final = attacker_accuracy(train, test, args.training, args.seed, balanced)
        cache.write_text(json.dumps({"peak": clean, "final": clean_final}))
    print(f"# {args.set}: {len(train)} train, {len(test)} test, {args.training}, seed {args.seed}, "
          f"{'balanced ' if balanced else ''}clean peak {clean:.3f} final {clean_final:.3f}, chance {chance:.3f}", flush=True)
    for text in args.config:
        name, params = parse_config(text)
        prot, fit_s, psnr, history = protect(train, params)
        acc, final = attacker_accuracy(prot, test, args.training, args.seed, balanced)
        score = (clean - acc) / (clean - chance)
        row = {"set": args.set, "config": name, "params": params, "training": args.training, "seed": args.seed,
               "peak": round(acc, 4), "clean": round(clean, 4),
               "final": round(final, 4), "clean_final": round(clean_final, 4), "score": round(score, 3), "psnr": round(psnr, 2),
               "fit_s": round(fit_s, 1), "rounds": len(history),
               "last_error": history[-1]["train_error"] if history else None}
        print(json.dumps(row), flush=True)
        with open(args.out / "rows.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
