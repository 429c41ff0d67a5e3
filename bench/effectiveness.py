"""How much clean accuracy CUDA protection takes away, under attackers and breakers (quick tier).

On a 10k CIFAR-10 training subset (the first 1000 images of each class of ../shared/data) and the
full 10k test set:

1. protect the subset with CUDA (default parameters, a fixed public benchmark key);
2. time the default quick certificate, exactly as a user runs it, with a cold baseline cache and
   an empty report folder (no saved cells to resume from):
   ``protect verify PROT --test TEST --clean CLEAN --tier quick`` (erm,linf x none,grayscale,jpeg10);
3. add the other attackers, reusing the cached clean baselines: erm x ueraser,coin,rskff and l2;
4. (``--padding-ablation``) protect again with reflect padding (no dark border) and run erm/none.

Prints a Markdown table beside the CUDA paper's numbers (a different tier: ResNet-18, 100 epochs,
full 50k) and writes every certificate under bench/out/effectiveness/.

    .venv/bin/python bench/effectiveness.py [--padding-ablation] [--skip-extra]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CIFAR as DATA, KEY, ROOT, run, stage_subset  # noqa: E402
PAPER = {("erm", "none"): 18.48, ("linf", "none"): 32.85, ("l2", "none"): 51.19, ("erm", "grayscale"): 20.12,
         ("clean", "none"): 94.66}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "effectiveness")
    ap.add_argument("--padding-ablation", action="store_true")
    ap.add_argument("--skip-extra", action="store_true", help="only the timed default certificate")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "baseline-cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "PROTECT_KEY": KEY, "PROTECT_CACHE": str(cache)}
    protect = str(Path(sys.executable).with_name("protect"))
    clean = stage_subset(work / "clean-train")
    test = DATA / "test"

    def protected(padding: str) -> Path:
        out = work / f"cuda-{padding}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.with_name(out.name + ".protect"), ignore_errors=True)
        run([protect, "images", "--quiet", "--padding", padding, str(clean), str(out)], env)
        return out

    prot = protected("zero")  # the default
    times: dict[str, float] = {}
    certs: list[dict] = []

    def verify(name: str, folder: Path, *extra: str) -> None:
        report = work / f"report-{name}"
        shutil.rmtree(report, ignore_errors=True)  # its saved cells would make `verify` resume, not train
        times[name] = run([protect, "verify", "--quiet", str(folder), "--test", str(test), "--clean", str(clean),
                           "--tier", "quick", "--report", str(report), *extra], env)
        cert = json.loads((report / "certificate.json").read_text())
        cert["_name"] = name
        certs.append(cert)

    verify("default", prot)
    if not args.skip_extra:
        verify("breakers", prot, "--training", "erm", "--defenses", "ueraser,coin,rskff")
        verify("l2", prot, "--training", "l2", "--defenses", "none")
    if args.padding_ablation:
        verify("reflect-padding", protected("reflect"), "--training", "erm", "--defenses", "none")

    print()
    print(f"quick tier, {certs[0]['model']}, {certs[0]['epochs']} epochs, seed 0, device {certs[0].get('device')}; "
          f"accuracies in % on the full CIFAR-10 test set; chance {100 * certs[0]['chance']:.1f} % (the "
          "majority-class rate of the test set)")
    print("| run | training | defense | protected (chosen epoch) | protected peak* | clean baseline | effect | "
          "paper (ResNet-18, 100 ep, 50k) | cell wall s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for cert in certs:
        for cell in cert["cells"]:
            p, c = cell["protected"], cell.get("clean") or {}
            paper = PAPER.get((cell["training"], cell["defense"]))
            wall = p.get("wall_s")
            effect = "n/a" if cell.get("effect") is None else f"{cell['effect']:.2f}"
            clean_acc = "" if c.get("acc") is None else f"{100 * c['acc']:.1f}"
            print(f"| {cert['_name']} | {cell['training']} | {cell['defense']} | {100 * p['acc']:.1f} | "
                  f"{100 * p['peak_acc']:.1f} | {clean_acc} | {effect} | "
                  f"{'' if paper is None else paper} | {'' if wall is None else f'{wall:.0f}'} |")
    print()
    print("peak*: the best epoch chosen with the test labels (optimistic); effect: against clean data under the "
          "same regime")
    for cert in certs:
        v = cert["verdict"]
        ci = v.get("interval") or [None, None]
        score = "n/a" if v.get("score") is None else f"{v['score']:.2f}"
        ci_text = "" if ci[0] is None else f" (95% interval {ci[0]:.2f} to {ci[1]:.2f})"
        print(f"{cert['_name']}: headline score {score}{ci_text}, best attacker "
              f"{v['best_attacker']['training']}/{v['best_attacker']['defense']}, oracle {(v.get('oracle') or {}).get('score')}")
    print()
    for name, seconds in times.items():
        print(f"{name}: {seconds / 60:.1f} min wall (protect verify, including data loading)")


if __name__ == "__main__":
    main()
