"""Screen: does a class-wise global tone curve make real chest X-rays unlearnable? (Not a method.)

    python bench/xray_tone.py [--gamma 1.2] [--training erm] [--defenses none,jpeg75] [--seeds 1]

Each class of ``../shared/data/chest_xray512/train`` gets its own gamma curve (NORMAL ``x ** (1/g)``,
brighter; PNEUMONIA ``x ** g``, darker; at g = 1.2 a mid-grey moves by about 15/255), written as PNG
to ``WORK/gamma-G``. No artefact and no texture changes: the two classes differ as two X-ray
machines' window settings would. Then ``protect verify`` at the attacker's 128 px, quick tier,
against the clean training X-rays (balanced accuracy on the 120 test X-rays).

Why it is only a screen: per-image histogram equalisation, which medical pipelines use, maps any
strictly increasing tone curve of an image back to the same equalised image, so a tone shortcut's
own breaker removes it exactly; a method made of it would have to be measured with that breaker.
Results: ``WORK/gamma-G.json`` (the cells: protected and clean balanced accuracy, effect).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import CLI, ROOT, SHARED, env_for, run_json  # noqa: E402

DATA = SHARED / "chest_xray512"


def toned(dst: Path, gamma: float) -> Path:
    """The training X-rays with a class-wise gamma curve, as 8-bit grey PNGs (made once)."""
    if (dst / ".complete").exists():
        return dst
    exponent = {"NORMAL": 1 / gamma, "PNEUMONIA": gamma}
    for folder in sorted(p for p in (DATA / "train").iterdir() if p.is_dir()):
        (dst / folder.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(folder.iterdir()):
            with Image.open(f) as im:
                a = np.asarray(im.convert("L"), dtype=np.float64) / 255
            out = np.clip(np.round(255 * a ** exponent[folder.name]), 0, 255).astype(np.uint8)
            Image.fromarray(out).save(dst / folder.name / f"{f.stem}.png")
    (dst / ".complete").write_text("")
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gamma", type=float, default=1.2)
    ap.add_argument("--training", default="erm")
    ap.add_argument("--defenses", default="none,jpeg75")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "xray_tone")
    args = ap.parse_args()
    name = f"gamma-{args.gamma:g}"
    prot = toned(args.work / name, args.gamma)
    cert = run_json([*CLI, "verify", "--json", "--quiet", "--fresh", str(prot), "--test", str(DATA / "test"),
                     "--clean", str(DATA / "train"), "--resolution", "128", "--seeds", str(args.seeds),
                     "--tier", "quick", "--training", args.training, "--defenses", args.defenses,
                     "--report", str(args.work / f"report-{name}")], env_for(args.work))
    cells = [{"cell": f"{c['training']}/{c['defense']}", "effect": c.get("effect"),
              "balanced_acc": c["protected"].get("balanced_acc"),
              "clean_balanced_acc": (c.get("clean") or {}).get("balanced_acc")} for c in cert["cells"]]
    (args.work / f"{name}.json").write_text(json.dumps({"gamma": args.gamma, "cells": cells,
                                                         "score": cert["verdict"].get("score")}, indent=1))
    for c in cells:
        print(f"{c['cell']}: protected {100 * c['balanced_acc']:.1f} % balanced, clean "
              f"{100 * (c['clean_balanced_acc'] or 0):.1f} %, effect {c['effect']}")


if __name__ == "__main__":
    main()
