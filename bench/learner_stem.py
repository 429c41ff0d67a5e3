"""The quick tier's learners at 64 px: full-resolution convolutions, or a stride-2 stem.

    python bench/learner_stem.py [--per-class 160] [--seeds 3] [--at-seeds 1] [--work bench/out/small_sets]

At 64 px every layer of ``fastcnn`` costs 4x what it costs at 32 px. A stride-2 first convolution
(as ImageNet networks' stems downsample before their blocks) brings the cost back to the 32-px
network's while the learned 3x3 filter still sees every input pixel. This measures what that takes
from the attacker, on the same 800 flowers128 photos as ``bench/small_sets.py`` (same staging, test
and validation split), at 64 px, with the quick tier's small-set recipe:
- clean photos, ERM;
- ``cuda64``: the photos brought to 64 px first and protected there (``protect images --method
  cuda``, its defaults at 64 px), so the protection works at the attacker's size and a weaker
  learner would show as a lower protected accuracy (a kinder certificate);
- fast L-inf AT on ``cuda64`` (``fastcnn_wide`` against the same with the stride-2 stem).
Variants alternate per seed. Results in ``WORK/stem.json``. (Run on 2026-12-04 before the stem
became the default, with the strided learners registered here and ``fastcnn`` as the full one; now
the full one is ``bench.small_sets``' full-resolution pair; the cells are the same.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import env_for, protect_once  # noqa: E402
from bench.small_sets import FULL_RES, eval_sets, run_cell, stage, table  # noqa: E402
from verify.data import load_folder, resize_crop  # noqa: E402
from verify.recipes import fit_to_data, get_recipe  # noqa: E402


def stage64(src: Path, dst: Path, side: int) -> Path:
    if not dst.exists():
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for f in sorted(src.rglob("*.jpg")):
            out = tmp / f.relative_to(src).with_suffix(".png")
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(resize_crop(np.asarray(Image.open(f).convert("RGB")), side)).save(out)
        tmp.rename(dst)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=160)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--at-seeds", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("bench/out/small_sets"))
    args = ap.parse_args()
    work = args.work.resolve()
    r = args.resolution
    train_dir = stage(work / f"train{args.per_class}", args.per_class)
    small = stage64(train_dir, work / f"train{args.per_class}-{r}", r)
    prot = work / f"cuda{args.per_class}-{r}"
    if not (prot / ".protect-done").exists():
        protect_once(small, prot, ["--method", "cuda"], env_for(work))
        (prot / ".protect-done").touch()
    clean = load_folder(train_dir, resolution=r)
    cuda = load_folder(prot, classes=clean.classes, resolution=r)
    val, test = eval_sets(clean.classes, r)
    base = fit_to_data(get_recipe("quick"), len(clean))
    # stem2: the quick tier's own learners (strided from 64 px up); full: the same without the stem
    variants = {"full": dataclasses.replace(base, **FULL_RES), "stem2": base}
    rows: list[dict] = []

    def cell(v: str, set_name: str, data, training: str, seed: int) -> None:
        run_cell(rows, v, variants[v], set_name, data, training, seed, test, val)
        (work / "stem.json").write_text(json.dumps({"resolution": r, "rows": rows}, indent=1))

    for seed in range(args.seeds):
        order = ("full", "stem2") if seed % 2 == 0 else ("stem2", "full")
        for set_name, data in (("clean", clean), ("cuda64", cuda)):
            for v in order:
                cell(v, set_name, data, "erm", seed)
    for seed in range(args.at_seeds):
        for v in (("stem2", "full") if seed % 2 == 0 else ("full", "stem2")):
            cell(v, "cuda64", cuda, "linf", seed)
    table(rows, "full", "stem2", (("clean", "erm"), ("cuda64", "erm"), ("cuda64", "linf")),
          "full: acc (seeds) | stride-2 stem | wall full / stem (median)")


if __name__ == "__main__":
    main()
