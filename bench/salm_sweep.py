"""SALM parameter sweep, in one process: fit SALM on a labelled set with each configuration, apply
it, and train the quick tier's attacker (ERM, or fast L-inf AT) on the result; one line per
configuration with the balanced accuracy, the score against the clean baseline, PSNR and fit time.

This is the tuning loop behind the defaults (the full pipeline and certificate are exercised by
bench/medical.py); it skips the files on disk, so a configuration costs one fit and one training.

    .venv/bin/python bench/salm_sweep.py --set breast --config base: --config aug:augment=true \
        [--training erm] [--seed 0] [--out bench/out/salm-sweep]

``--config NAME:key=value,key=value`` (SALM parameters; values parsed as JSON when they parse).
Sets: ``breast``, ``pneumonia`` (the folders bench/medical.py imports), ``cifar2k`` (the first 200
images of each class of the 10k CIFAR subset of bench/clusters.py, with the full test set).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CIFAR, KEY, ROOT  # noqa: E402

from perturbations import FitData  # noqa: E402
from perturbations.salm import SALM  # noqa: E402
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
    params: dict = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        try:
            params[k] = json.loads(v)
        except json.JSONDecodeError:
            params[k] = v
    return name, params


def fit_data(train: TensorSet) -> FitData:
    x = train.x.float().div(255)
    ids = list(train.rels)

    def batches(size, channels=3, batch_size=64, only=None):
        pos = list(range(len(ids))) if only is None else list(only)
        for i in range(0, len(pos), batch_size):
            p = pos[i:i + batch_size]
            yield x[p], p

    return FitData(train.num_classes, train.y.tolist(), [tuple(x.shape[-2:])] * len(ids), ids, batches,
                   memory=1 << 31, channels=int(x.shape[1]))


def protect(train: TensorSet, params: dict) -> tuple[TensorSet, float, float, list]:
    t = time.perf_counter()
    method = SALM(KEYRING, **params).fit(fit_data(train))
    fit_s = time.perf_counter() - t
    x = train.x.float().div(255)
    out = torch.cat([method.apply(x[i:i + 256], train.y[i:i + 256], train.rels[i:i + 256])
                     for i in range(0, len(train), 256)])
    q = out.mul(255).round().clamp(0, 255).to(torch.uint8)
    mse = (q.float() - train.x.float()).div(255).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    psnr = float((10 * torch.log10(1 / mse)).mean())
    prot = TensorSet(q, train.y, train.classes, train.root, "salm-sweep", list(train.rels))
    return prot, fit_s, psnr, method.history


def peak(train: TensorSet, test: TensorSet, training: str, seed: int, balanced: bool) -> float:
    recipe = fit_to_data(get_recipe("quick"), len(train))
    r = train_cell(train, test, recipe, training, "none", seed)
    return r.peak_balanced_acc if balanced else r.peak_acc


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
    if cache.exists():
        clean = json.loads(cache.read_text())["peak"]
    else:
        clean = peak(train, test, args.training, args.seed, balanced)
        cache.write_text(json.dumps({"peak": clean}))
    print(f"# {args.set}: {len(train)} train, {len(test)} test, {args.training}, seed {args.seed}, "
          f"{'balanced ' if balanced else ''}clean peak {clean:.3f}, chance {chance:.3f}", flush=True)
    for text in args.config:
        name, params = parse_config(text)
        prot, fit_s, psnr, history = protect(train, params)
        acc = peak(prot, test, args.training, args.seed, balanced)
        score = (clean - acc) / (clean - chance)
        row = {"set": args.set, "config": name, "params": params, "training": args.training, "seed": args.seed,
               "peak": round(acc, 4), "clean": round(clean, 4), "score": round(score, 3), "psnr": round(psnr, 2),
               "fit_s": round(fit_s, 1), "rounds": len(history),
               "last_error": history[-1]["train_error"] if history else None}
        print(json.dumps(row), flush=True)
        with open(args.out / "rows.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
