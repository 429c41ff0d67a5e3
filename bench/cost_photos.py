"""The verify cost on a folder of large photos: 1,000 12-megapixel JPEGs certified at 64 px.

    python bench/cost_photos.py [--count 1000] [--resolution 64] [--work bench/out/cost_photos]
        [--skip-protect] [--verify-args "..."]

Data (made here once; the photos are synthetic stand-ins for a photographer's folder, never
committed): each of the 16 Kodak photos (../shared/data/kodak, 768x512 or 512x768) gives
``count / 16`` variants, one class folder per source photo: a keyed crop of 60-100 % of each side,
a keyed horizontal flip and brightness (0.8-1.2), resized bicubic to 12 megapixels (4000x3000, or
3000x4000 for the portrait sources) and written as quality-90 4:2:0 JPEG, as a camera does (the
variants differ enough that no two are the same image at the attacker's 64 px, which verify's
overlap check would refuse).

Then, timed and with the peak resident memory of each command (GNU time's maximum RSS, the largest
process of the command's tree):
1. ``protect images`` (the method's defaults; ``--method cuda``) of the whole folder;
2. ``protect verify OUT --clean IN --holdout 0.2 --resolution R`` at the quick tier (its default
   grid; a keyed 20 % of the clean photos is the test set, their protected copies leave the training
   set): issue 19's cost target is this command within 15 minutes on 2 CPU cores with a peak of at
   most 2 GiB.
``--stand-in`` skips step 1: the "protected" folder is a hard-linked copy of the photos and verify
gets ``--method METHOD`` (the method's default grid): verify's cost depends on the number and size of
the images and on the grid, not on what the pixels are (protecting the folder took 29 minutes).
Results: ``WORK/result.json``; the wall times, peak memory and the certificate's score are printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import CLI, KEY, ROOT, SHARED, env_for  # noqa: E402

BIG = (4000, 3000)


def _draw(name: str, i: int) -> tuple[float, float, float, bool, float]:
    """Keyed crop fraction, crop offsets (0-1), flip and brightness for variant ``i`` of ``name``."""
    d = hashlib.sha256(f"{KEY}/cost/{name}/{i}".encode()).digest()
    return 0.6 + 0.4 * d[0] / 255, d[1] / 255, d[2] / 255, bool(d[3] % 2), 0.8 + 0.4 * d[4] / 255


def _make(args: tuple[Path, Path, int]) -> None:
    src, dst, i = args
    out = dst / src.stem / f"{src.stem}-{i:04d}.jpg"
    if out.exists():
        return
    img = Image.open(src).convert("RGB")
    frac, oy, ox, flip, bright = _draw(src.name, i)
    w, h = img.size
    cw, ch = round(w * frac), round(h * frac)
    left, top = round((w - cw) * ox), round((h - ch) * oy)
    img = img.crop((left, top, left + cw, top + ch))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = ImageEnhance.Brightness(img).enhance(bright)
    size = BIG if w >= h else BIG[::-1]
    tmp = out.with_suffix(".tmp")
    img.resize(size, Image.Resampling.BICUBIC).save(tmp, "JPEG", quality=90, subsampling=2)
    tmp.rename(out)


def stage(dst: Path, count: int) -> Path:
    sources = sorted((SHARED / "kodak").glob("*.png"))
    jobs = []
    for k, src in enumerate(sources):
        (dst / src.stem).mkdir(parents=True, exist_ok=True)
        per = count // len(sources) + (1 if k < count % len(sources) else 0)
        jobs.extend((src, dst, i) for i in range(per))
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(_make, jobs, chunksize=8))
    return dst


def timed(cmd: list[str], env: dict) -> tuple[float, int, str]:
    """Run ``cmd`` under GNU time: wall seconds, peak RSS in bytes, stdout."""
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        sys.stderr.write(p.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) * 1024
    return wall, peak, p.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--resolution", default="64")
    ap.add_argument("--method", default="cuda")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "cost_photos")
    ap.add_argument("--skip-protect", action="store_true", help="reuse WORK/out from an earlier run")
    ap.add_argument("--verify-args", default="", help="extra arguments for protect verify")
    ap.add_argument("--no-verify", action="store_true", help="only stage and protect")
    ap.add_argument("--stand-in", action="store_true",
                    help="certify a hard-linked copy of the photos under --method METHOD (cost only)")
    args = ap.parse_args()
    work = args.work
    env = env_for(work)
    t = time.perf_counter()
    src = stage(work / f"photos{args.count}", args.count)
    stage_s = time.perf_counter() - t
    files = sorted(src.rglob("*.jpg"))
    in_bytes = sum(f.stat().st_size for f in files)
    out = work / f"out{args.count}-{args.method}"
    result: dict = {"count": len(files), "input_bytes": in_bytes, "staging_s": round(stage_s, 1),
                    "cpu_count": os.cpu_count()}
    if args.stand_in:
        out = work / f"standin{args.count}"
        if not out.exists():
            tmp = work / f"standin{args.count}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            for f in files:
                (tmp / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                os.link(f, tmp / f.relative_to(src))
            tmp.rename(out)
        result["stand_in"] = True
    elif not args.skip_protect:
        wall, peak, _ = timed([*CLI, "images", "--quiet", "--method", args.method, "--overwrite", str(src), str(out)],
                              env)
        result["protect"] = {"wall_s": round(wall, 1), "peak_bytes": peak, "images_per_second": round(len(files) / wall, 2)}
    if args.no_verify:
        (work / "result-protect.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return
    if args.skip_protect and not args.stand_in and (work / "result-protect.json").exists():
        result.update({k: v for k, v in json.loads((work / "result-protect.json").read_text()).items()
                       if k == "protect"})
    report = work / f"report{args.count}-{args.method}"
    cmd = [*CLI, "verify", "--json", "--quiet", "--fresh", "--no-cache", str(out), "--clean", str(src),
           "--holdout", "0.2", "--resolution", args.resolution, "--tier", "quick", "--report", str(report),
           *(["--method", args.method] if args.stand_in else []), *shlex.split(args.verify_args)]
    wall, peak, stdout = timed(cmd, env)
    cert = json.loads(stdout)
    v = cert["verdict"]
    result["verify"] = {"wall_s": round(wall, 1), "peak_bytes": peak, "command": " ".join(cmd[2:]),
                        "cells": len(cert.get("cells", [])), "score": v.get("score"), "interval": v.get("interval"),
                        "best_attacker": v.get("best_attacker")}
    (work / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"verify: {wall / 60:.1f} min, peak {peak / 2**30:.2f} GiB (target: <= 15 min, <= 2 GiB)")


if __name__ == "__main__":
    main()
