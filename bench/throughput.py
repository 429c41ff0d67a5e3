"""Throughput and memory of `protect images` against a bare Pillow decode+encode of the same files.

The bare side is what "just decoding and re-encoding" costs: one process per core (so no GIL),
each reading, decoding, re-encoding with Pillow's default settings and writing its share of the
files. The protect side is the whole `protect images` command (CUDA, defaults). Both are timed as
whole commands, start-up included, alternating bare/protect, ``--repeats`` pairs; the table gives
the median ratio and its range. Input is read from the data folder; outputs go to ``--out``
(default ``/dev/shm``, a RAM disk, so disk noise does not hide the CPU cost) and are deleted after
each run.

Memory is measured in one extra run of each side after the timed pairs (reading
``/proc/PID/smaps_rollup`` walks a process's page tables: sampling it during a timed run would
slow the side with the larger memory). The whole process tree is sampled every 50 ms; the table
reports the peak of the summed PSS (proportional set size: pages shared between the parent and its
forked workers are counted once, split between them, so the sum is the memory the command really
uses) and, for reference, the peak summed RSS (which counts the shared torch libraries once per
process).

    .venv/bin/python bench/throughput.py                              # cifar50k, kodak, photos24mp
    .venv/bin/python bench/throughput.py --sets cifar10k --repeats 5
    .venv/bin/python bench/throughput.py --sets photos24mp --photos 32  # memory does not grow

Sets: ``cifar50k`` / ``cifar10k`` (CIFAR-10 train PNGs, 32x32), ``kodak`` (16 photos, 768x512),
``photos24mp`` (``--photos`` 6000x4000 PNGs made once from the Kodak photos: upscaled, with mild
noise so they compress like camera images; cached under ``bench/out``). Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
KEY = "benchmark-key-not-secret"

BARE = r"""
import io, os, sys, time
from multiprocessing import Pool
from pathlib import Path
from PIL import Image
src, dst, workers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
files = sorted(p for p in src.rglob("*") if p.suffix.lower() == ".png")
def copy(p):
    data = p.read_bytes()
    im = Image.open(io.BytesIO(data)); im.load()
    buf = io.BytesIO(); im.save(buf, format="PNG")
    out = dst / p.relative_to(src); out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buf.getvalue())
if __name__ == "__main__":
    with Pool(workers) as pool:
        for _ in pool.imap_unordered(copy, files, chunksize=max(1, min(256, len(files) // (8 * workers)))):
            pass
    print(len(files))
"""


class TreeSampler(threading.Thread):
    """Peak summed PSS and RSS (bytes) of a process and all its descendants."""

    def __init__(self, pid: int, every: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak_pss = self.peak_rss = 0
        self.stop = threading.Event()

    def _tree(self) -> list[int]:
        pids, frontier = [self.pid], [self.pid]
        while frontier:
            pid = frontier.pop()
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as fh:
                    kids = [int(k) for k in fh.read().split()]
            except OSError:
                continue
            pids += kids
            frontier += kids
        return pids

    def run(self) -> None:
        while not self.stop.is_set():
            pss = rss = 0
            for pid in self._tree():
                try:
                    with open(f"/proc/{pid}/smaps_rollup") as fh:
                        for line in fh:
                            if line.startswith("Pss:"):
                                pss += int(line.split()[1]) << 10
                            elif line.startswith("Rss:"):
                                rss += int(line.split()[1]) << 10
                except OSError:
                    continue
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            time.sleep(self.every)


def timed(cmd: list[str], env: dict[str, str], sample: bool = False) -> tuple[str, float, float, float, float]:
    """(stdout, wall seconds, CPU seconds of the tree, peak PSS MiB, peak RSS MiB) of a command;
    memory only with ``sample`` (else 0)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    sampler = TreeSampler(proc.pid, every=0.05)
    if sample:
        sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t
    if sample:
        sampler.stop.set()
        sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}: {err[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the whole tree: workers are reaped by their parent
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return out, wall, cpu, sampler.peak_pss / 2**20, sampler.peak_rss / 2**20


def make_photos(count: int, work: Path) -> Path:
    """``count`` 6000x4000 RGB PNGs from the Kodak photos (cached)."""
    import numpy as np
    from PIL import Image

    dst = work / f"photos24mp-{count}"
    done = dst / ".complete"
    if done.exists():
        return dst
    kodak = sorted((DATA / "kodak").glob("*.png"))
    rng = np.random.default_rng(0)
    for i in range(count):
        cls = dst / ("ab"[i % 2])
        cls.mkdir(parents=True, exist_ok=True)
        with Image.open(kodak[i % len(kodak)]) as im:
            im = im.convert("RGB")
            if im.width < im.height:
                im = im.rotate(90, expand=True)
            big = np.asarray(im.resize((6000, 4000), Image.Resampling.BICUBIC), dtype=np.int16)
        noisy = np.clip(big + rng.normal(0, 2.0, big.shape).round().astype(np.int16), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(cls / f"photo{i:03d}.png")
        print(f"made {cls / f'photo{i:03d}.png'}", file=sys.stderr, flush=True)
    done.touch()
    return dst


def stage(name: str, work: Path, photos: int) -> tuple[Path, Path | None]:
    """The input folder (and label file) for a set."""
    if name == "cifar50k":
        return DATA / "cifar10" / "train", None
    if name == "cifar10k":
        dst = work / "in-cifar10k"
        if not (dst / ".complete").exists():
            for cls in sorted((DATA / "cifar10" / "train").iterdir()):
                (dst / cls.name).mkdir(parents=True, exist_ok=True)
                for f in sorted(cls.glob("*.png"))[:1000]:
                    shutil.copyfile(f, dst / cls.name / f.name)
            (dst / ".complete").touch()
        return dst, None
    if name == "kodak":
        labels = work / "kodak-labels.csv"
        files = sorted((DATA / "kodak").glob("*.png"))
        labels.write_text("path,label\n" + "".join(f"{f.name},{'ab'[i % 2]}\n" for i, f in enumerate(files)))
        return DATA / "kodak", labels
    if name == "photos24mp":
        return make_photos(photos, work), None
    raise SystemExit(f"unknown set {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="cifar50k,kodak,photos24mp")
    ap.add_argument("--repeats", type=int, default=3, help="alternating bare/protect pairs per set")
    ap.add_argument("--photos", type=int, default=16, help="photos in the photos24mp set")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "throughput")
    ap.add_argument("--out", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--extra", default="", help="extra arguments for protect images, e.g. '--memory 1GB'")
    args = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"benchmark data not found at {DATA}")
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PROTECT_KEY": KEY}
    protect_bin = str(Path(sys.executable).with_name("protect"))
    rows = []
    for name in args.sets.split(","):
        src, labels = stage(name, args.work, args.photos)
        pairs = []
        for rep in range(args.repeats + 1):  # the last run of each side samples memory, untimed
            sample = rep == args.repeats
            outs = Path(tempfile.mkdtemp(prefix="protect-bench-", dir=args.out))
            try:
                bare_out, bare_wall, bare_cpu, bare_pss, bare_rss = timed(
                    [sys.executable, "-c", BARE, str(src), str(outs / "bare"), str(args.workers)], env, sample)
                shutil.rmtree(outs / "bare")
                cmd = [protect_bin, "images", "--quiet", "--json", "--workers", str(args.workers), "--device",
                       args.device, *args.extra.split(), str(src), str(outs / "protected")]
                if labels:
                    cmd[2:2] = ["--labels", str(labels)]
                out, wall, cpu, pss, rss = timed(cmd, env, sample)
            finally:
                shutil.rmtree(outs, ignore_errors=True)
            n = int(bare_out.split()[0])
            summary = json.loads(out)
            assert summary["done"] == n, (summary["done"], n)
            if sample:
                memory = {"bare_pss_mib": round(bare_pss), "protect_pss_mib": round(pss), "protect_rss_mib": round(rss)}
                print(json.dumps({"set": name, "memory": memory}), flush=True)
                continue
            pair = {"set": name, "rep": rep, "images": n, "bare_s": round(bare_wall, 2), "protect_s": round(wall, 2),
                    "bare_cpu_s": round(bare_cpu, 2), "protect_cpu_s": round(cpu, 2),
                    "protect_loop_s": round(summary["seconds"], 2), "ratio": round(bare_wall / wall, 3),
                    "psnr": summary["psnr_mean"], "ssim": summary["ssim_mean"],
                    "device": summary["device"], "workers": summary.get("workers")}
            print(json.dumps(pair), flush=True)
            pairs.append(pair)
        if not pairs:  # --repeats 0: memory only
            continue
        ratios = [p["ratio"] for p in pairs]
        rows.append({
            "set": name, "images": pairs[0]["images"], "ratio": statistics.median(ratios), "lo": min(ratios),
            "hi": max(ratios), "bare_img_s": statistics.median(p["images"] / p["bare_s"] for p in pairs),
            "protect_img_s": statistics.median(p["images"] / p["protect_s"] for p in pairs),
            "pss": memory["protect_pss_mib"], "rss": memory["protect_rss_mib"], "bare_pss": memory["bare_pss_mib"],
            "psnr": pairs[0]["psnr"], "ssim": pairs[0]["ssim"],
            "bare_cpu_ms": statistics.median(1000 * p["bare_cpu_s"] / p["images"] for p in pairs),
            "protect_cpu_ms": statistics.median(1000 * p["protect_cpu_s"] / p["images"] for p in pairs),
        })
    print()
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}; {args.workers} worker processes on both sides; outputs in {args.out}; "
          f"{args.repeats} alternating timed pairs per set, then one memory-sampled run of each side")
    print("| set | images | bare img/s | protect img/s | ratio median (range) | CPU ms/img bare / protect "
          "| peak PSS protect / bare (MiB) | peak RSS sum protect (MiB) | mean PSNR / SSIM |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['set']} | {r['images']} | {r['bare_img_s']:.1f} | {r['protect_img_s']:.1f} | {r['ratio']:.2f} "
              f"({r['lo']:.2f}-{r['hi']:.2f}) | {r['bare_cpu_ms']:.2f} / {r['protect_cpu_ms']:.2f} | "
              f"{r['pss']:.0f} / {r['bare_pss']:.0f} | {r['rss']:.0f} | {r['psnr']:.1f} dB / {r['ssim']:.3f} |")


if __name__ == "__main__":
    main()
