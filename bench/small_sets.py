"""The small-set adaptation and the overfitting guard: what they cost, and what they change.

    python bench/small_sets.py [--per-class 160] [--resolution 64] [--seeds 3] [--at-seeds 1]
        [--work bench/out/small_sets]

Data: ``per-class`` photos of each of the 5 classes of ``../shared/data/flowers128/train`` (the
first in sorted order; 800 by default, the training set of a 1,000-photo folder under
``--holdout 0.2``), the 864 test photos, all brought to ``resolution`` px as the verifier does
(shorter side, centre crop); a keyed 200 of the test photos choose the epoch, the rest score it.
Protected set: ``protect images --method cuda`` (its defaults at 128 px) of the training photos.

Two quick-tier recipes for a small set, side by side (alternating, per seed):
- **before** (until 2026-12-04): batch 1/8 of the set (100), epochs raised to 600 steps (75);
  the AT learner the same 75 epochs; the overfitting guard (FGSM-RS + PGD-5 on 256 training images)
  after every epoch;
- **now** (:func:`verify.recipes.fit_to_data`): the batch chosen so that 600 steps take about 24
  epochs (32, 24 epochs; the AT learner 40); the guard every k epochs within a quarter of
  training's cost (:func:`verify.train.guard_every`: every 4th here).
Both with the learners at full resolution (the stride-2 stem of ``bench/learner_stem.py`` is measured
there). Cells: ERM on the clean and on the CUDA-protected photos (``seeds`` seeds), fast L-inf AT on the
protected photos (``at-seeds`` seeds). Prints accuracy (the epoch chosen on validation), wall time
per cell and the ratio; results in ``WORK/result.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import SHARED, env_for, protect_once  # noqa: E402
import verify.train as vtrain  # noqa: E402
from verify.data import load_folder  # noqa: E402
from perturbations.nets import FastCNN  # noqa: E402
from verify.models import register_model  # noqa: E402
from verify.recipes import fit_to_data, get_recipe  # noqa: E402


def stage(dst: Path, per_class: int) -> Path:
    if not dst.exists():
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for cls in sorted((SHARED / "flowers128" / "train").iterdir()):
            (tmp / cls.name).mkdir(parents=True)
            for f in sorted(cls.glob("*.jpg"))[:per_class]:
                shutil.copyfile(f, tmp / cls.name / f.name)
        tmp.rename(dst)
    return dst


@register_model
def fastcnn_nostem(num_classes: int, in_channels: int = 3, image_size: int = 32):
    """``fastcnn`` at full resolution, as it was when this ran (the stride-2 stem came after)."""
    return FastCNN(num_classes, in_channels)


@register_model
def fastcnn_wide_nostem(num_classes: int, in_channels: int = 3, image_size: int = 32):
    return FastCNN(num_classes, in_channels, widths=(32, 64, 128, 256))


#: The full-resolution learners (``fastcnn`` and ``fastcnn_wide`` before their stride-2 stem).
FULL_RES = {"model": "fastcnn_nostem", "at_model": "fastcnn_wide_nostem"}


def eval_sets(classes: list[str], resolution: int) -> tuple:
    """(validation, test): a keyed 200 of the flowers128 test photos choose the epoch, the rest score."""
    test_all = load_folder(SHARED / "flowers128" / "test", classes=classes, resolution=resolution)
    perm = torch.randperm(len(test_all), generator=torch.Generator().manual_seed(19))
    return test_all.subset(perm[:200]), test_all.subset(perm[200:])


def run_cell(rows: list[dict], variant: str, recipe, set_name: str, data, training: str, seed: int,
             test, val) -> None:
    """Train one cell (no defense), append its row to ``rows`` and print it."""
    t = time.perf_counter()
    res = vtrain.train_cell(data, test, recipe, training, "none", seed=seed, val=val)
    wall = time.perf_counter() - t
    rows.append({"variant": variant, "set": set_name, "training": training, "seed": seed, "acc": res.acc,
                 "epoch": res.selected_epoch, "epochs": res.epochs, "wall_s": round(wall, 1),
                 "guard_fired": res.guard_fired_epoch, "guard_every": res.guard_every})
    print(f"{variant:6s} {set_name:6s} {training:4s} seed {seed}: {res.acc:.3f} at epoch "
          f"{res.selected_epoch}/{res.epochs} ({wall:.0f} s)", flush=True)


def table(rows: list[dict], a: str, b: str, cells: tuple[tuple[str, str], ...], header: str) -> None:
    """The side-by-side table of variants ``a`` and ``b``: mean accuracy (range over seeds) and the
    ratio of median wall times, one line per (set, training) of ``cells`` that both have."""
    print(f"\n| cells | {header} |\n|---|---:|---:|---:|")
    for set_name, training in cells:
        got = {v: [x for x in rows if (x["variant"], x["set"], x["training"]) == (v, set_name, training)]
               for v in (a, b)}
        if not all(got.values()):
            continue
        acc = {v: statistics.mean(x["acc"] for x in g) for v, g in got.items()}
        rng = {v: f"{min(x['acc'] for x in g):.3f}-{max(x['acc'] for x in g):.3f}" for v, g in got.items()}
        wall = {v: statistics.median(x["wall_s"] for x in g) for v, g in got.items()}
        print(f"| {training} on {set_name} | {acc[a]:.3f} ({rng[a]}) | {acc[b]:.3f} ({rng[b]}) | "
              f"{wall[a]:.0f} s / {wall[b]:.0f} s = {wall[a] / wall[b]:.2f}x |")


def recipes(n: int) -> dict:
    q = dataclasses.replace(get_recipe("quick"), **FULL_RES)
    now = fit_to_data(q, n)
    bs = min(q.batch_size, max(16, n // 8), n)  # the rule before 2026-12-04
    epochs = max(q.epochs, -(-q.min_steps // (n // bs)))
    before = dataclasses.replace(q, batch_size=bs, epochs=epochs, at_epochs=max(q.at_epochs, epochs))
    return {"before": before, "now": now}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=160)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--at-seeds", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("bench/out/small_sets"))
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    train_dir = stage(work / f"train{args.per_class}", args.per_class)
    cuda_dir = work / f"cuda{args.per_class}"
    if not (cuda_dir / ".protect-done").exists():
        protect_once(train_dir, cuda_dir, ["--method", "cuda"], env_for(work))
        (cuda_dir / ".protect-done").touch()
    r = args.resolution
    clean = load_folder(train_dir, resolution=r)
    cuda = load_folder(cuda_dir, classes=clean.classes, resolution=r)
    val, test = eval_sets(clean.classes, r)
    recs = recipes(len(clean))
    for name, rec in recs.items():
        print(f"{name}: batch {rec.batch_size}, {rec.epochs} epochs, AT {rec.at_epochs} epochs", flush=True)
    real_every = vtrain.guard_every
    rows: list[dict] = []
    out = work / "result.json"

    def cell(variant: str, data_name: str, data, training: str, seed: int) -> None:
        vtrain.guard_every = (lambda *a: 1) if variant == "before" else real_every
        run_cell(rows, variant, recs[variant], data_name, data, training, seed, test, val)
        out.write_text(json.dumps({"resolution": r, "n_train": len(clean), "n_val": len(val), "n_test": len(test),
                                   "recipes": {k: dataclasses.asdict(v) for k, v in recs.items()},
                                   "rows": rows}, indent=1, default=str))

    for seed in range(args.seeds):
        order = ("before", "now") if seed % 2 == 0 else ("now", "before")
        for data_name, data in (("clean", clean), ("cuda", cuda)):
            for v in order:
                cell(v, data_name, data, "erm", seed)
    for seed in range(args.at_seeds):
        for v in (("now", "before") if seed % 2 == 0 else ("before", "now")):
            cell(v, "cuda", cuda, "linf", seed)
    vtrain.guard_every = real_every
    table(rows, "before", "now", (("clean", "erm"), ("cuda", "erm"), ("cuda", "linf")),
          "before: acc (mean over seeds) | now | wall before / now (median)")


if __name__ == "__main__":
    main()
