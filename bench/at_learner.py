"""The adversarial-training learner of the quick tier: clean accuracy under fast AT against minutes.

An adversarial-training attacker certifies something only if it can learn under adversarial
training: a learner that reaches 46 % on clean images under AT (``fastcnn``) cannot show that a
protection survives AT, whatever it scores on protected images. Target: at least 60 % clean-test
accuracy under fast L-inf AT 8/255 (FGSM-RS, Wong et al. 2020) on the 10k CIFAR-10 subset, within
10 minutes per cell on 2 CPU cores.

Data: the first 1000 training images per class of ``../shared/data/cifar10`` (``clean``), or the
same protected in memory with CUDA at its defaults under the public benchmark key (``cuda``,
:mod:`bench.padding`); scored as ``protect verify`` scores: the epoch chosen on a keyed 20 % of the
10k test images, accuracy on the other 8,000 (``acc``), with the oracle peak and the last epoch
beside it. One seed. Run on an otherwise idle machine: the wall times are the point.

    .venv/bin/python bench/at_learner.py [--runs NAME,...] [--list]

Results are appended to ``bench/out/at_learner.jsonl``, one JSON line per run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import runs_from_cli  # noqa: E402
from padding import DATA, protect_set  # noqa: E402  (the same subset, key and in-memory protection)

from verify.data import load_folder  # noqa: E402
from verify.recipes import get_recipe  # noqa: E402
from verify.train import train_cell  # noqa: E402
from verify.uncertainty import split_validation  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "at_learner.jsonl"

#: name: (data, model, epochs, recipe overrides)
RUNS: dict[str, tuple[str, str, int, dict]] = {
    "fastcnn-e10": ("clean", "fastcnn", 10, {}),
    "fastcnn_wide-e30": ("clean", "fastcnn_wide", 30, {}),
    "fastcnn_wide-e40": ("clean", "fastcnn_wide", 40, {}),
    "fastcnn_xl-e20": ("clean", "fastcnn_xl", 20, {}),
    "fastcnn_xl-e25": ("clean", "fastcnn_xl", 25, {}),
    "fastcnn_xl-e30": ("clean", "fastcnn_xl", 30, {}),
    "vgg3-e15": ("clean", "vgg3", 15, {}),
    "fastcnn_wide-e30-cuda": ("cuda", "fastcnn_wide", 30, {}),
    "fastcnn_xl-e20-cuda": ("cuda", "fastcnn_xl", 20, {}),
}


def main() -> None:
    names = runs_from_cli(__doc__, RUNS, "fastcnn_wide-e30,fastcnn_wide-e40,fastcnn_xl-e20")
    train = load_folder(DATA / "train", max_per_class=1000)
    val, test = split_validation(load_folder(DATA / "test", classes=train.classes))
    sets = {"clean": train}
    if any(RUNS[n][0] == "cuda" for n in names):
        sets["cuda"] = protect_set(train, "zero")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        data, model, epochs, over = RUNS[name]
        recipe = get_recipe("quick", model=model, epochs=epochs, **over)
        t = time.perf_counter()
        r = train_cell(sets[data], test, recipe, "linf", "none", seed=0, progress=None, val=val)
        row = {"run": name, "data": data, "model": model, "epochs": epochs, **over, "training": "linf (fast AT 8/255)",
               "acc": round(r.acc, 4), "selected_epoch": r.selected_epoch, "peak": round(r.peak_acc, 4),
               "final": round(r.final_acc, 4), "train_acc": round(r.train_acc, 4),
               "guard_fired_epoch": r.guard_fired_epoch, "wall_s": round(time.perf_counter() - t, 1),
               "val_curve": [round(c, 3) for c in r.val_curve], "torch_threads": torch.get_num_threads()}
        print(json.dumps(row), flush=True)
        with OUT.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
