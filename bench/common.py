"""What the benchmarks share: paths, the public benchmark key, this checkout's CLI, the 10k
CIFAR-10 subset, and a timed ``protect images`` run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CIFAR = SHARED / "cifar10"
KEY = "benchmark-key-not-secret"
#: This checkout's CLI (run with PYTHONPATH=ROOT): a benchmark measures the code it lives beside,
#: whatever `protect` is installed, so a git worktree can be measured while the main tree changes.
CLI = [sys.executable, "-m", "cli.main"]


def env_for(work: Path) -> dict[str, str]:
    """The environment of benchmark commands: the key, a baseline cache in ``work``, this tree."""
    return {**os.environ, "PROTECT_KEY": KEY, "PROTECT_CACHE": str(work / "baseline-cache"),
            "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def stage_kodak(work: Path) -> Path:
    """A fresh ``work`` folder holding ``work/photos``: a copy of the 16 Kodak photos, one flat,
    unlabelled folder as a photographer has them."""
    shutil.rmtree(work, ignore_errors=True)
    photos = work / "photos"
    photos.mkdir(parents=True)
    for f in sorted((SHARED / "kodak").glob("*.png")):
        shutil.copyfile(f, photos / f.name)
    return photos


def run_json(cmd: list[str], env: dict[str, str]) -> dict:
    """Run ``cmd`` (a ``--json`` command of the CLI) and return what it printed, parsed."""
    print("$", " ".join(cmd), flush=True)
    return json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)


def run(cmd: list[str], env: dict[str, str]) -> float:
    """Run ``cmd`` (stdout discarded); its wall time in seconds."""
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def stage_subset(dst: Path, per_class: int = 1000, split: str = "train") -> Path:
    """The first ``per_class`` images of each CIFAR-10 class of ``split``, copied to ``dst`` once."""
    if not dst.exists():
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for cls in sorted((CIFAR / split).iterdir()):
            (tmp / cls.name).mkdir(parents=True)
            for f in sorted(cls.glob("*.png"))[:per_class]:
                shutil.copyfile(f, tmp / cls.name / f.name)
        tmp.rename(dst)
    return dst


def protect_once(src: Path, out: Path, options: list[str], env: dict[str, str]) -> tuple[dict, float]:
    """``protect images --json OPTIONS src out`` from scratch: its summary and wall time (s)."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".protect"), ignore_errors=True)
    cmd = [*CLI, "images", "--quiet", "--json", *options, str(src), str(out)]
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(proc.stdout), round(time.perf_counter() - t, 1)


def pick_runs(spec: str, runs: dict) -> list[str]:
    """The run names of a ``--runs a,b,c`` option, each one of ``runs`` (else exit naming the unknown)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in runs]
    if unknown:
        raise SystemExit(f"unknown run(s): {', '.join(unknown)}; see --list")
    return names


def runs_from_cli(doc: str, runs: dict, default: str) -> list[str]:
    """Parse ``--runs a,b`` / ``--list`` for a benchmark of named ``runs`` (name: a tuple of its
    settings); ``--list`` prints them and exits."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--runs", default=default, help="comma-separated run names (see --list)")
    ap.add_argument("--list", action="store_true", help="list the runs and exit")
    args = ap.parse_args()
    if args.list:
        for name, spec in runs.items():
            print(f"{name}: " + " ".join(str(v) for v in spec if v != {}))
        raise SystemExit(0)
    return pick_runs(args.runs, runs)
