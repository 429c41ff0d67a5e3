"""Protect a folder: discover, decode, perturb, encode, record.

Decoding and encoding run in a thread pool (Pillow releases the GIL) while the main thread
batches same-size images and runs the method on the compute device, so the CPU stays busy.
Every output is written atomically and journalled once it is in place, so an interrupted run
resumes where it stopped and ends byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import perturbations
from perturbations import FitData, Keyring, Perturbation

from .device import resolve_device
from .discover import Dataset, ImageEntry, discover
from .errors import ConfigError, InputError, RecordError
from .fidelity import psnr, ssim
from .imageio import (
    DEFAULT_MAX_PIXELS,
    JPEG_QUALITY,
    OUT_FORMATS,
    Decoded,
    ImageError,
    decode,
    encode,
    output_name,
    remove_stale_temporaries,
    to_image,
    write_atomic,
)
from .record import FORMAT_VERSION, RunRecord, default_record_dir

log = logging.getLogger(__name__)

#: Values (pixels x channels) held per batch and in the decode queue; bounds memory on photos.
BATCH_VALUES = 1 << 22
QUEUE_VALUES = 1 << 26
SIZE_SAMPLE = 256


@dataclass
class ProtectOptions:
    """Everything about a run except the folders and the key."""

    method: str = "cuda"
    params: dict[str, Any] = field(default_factory=dict)
    labels_csv: Path | None = None
    out_format: str = "keep"
    device: str = "auto"
    batch_size: int = 256
    workers: int | None = None
    record_dir: Path | None = None
    overwrite: bool = False
    strict: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    jpeg_quality: int = JPEG_QUALITY
    progress: bool = True


@dataclass
class Summary:
    """What a run did; ``to_dict`` is the ``--json`` output."""

    in_dir: str
    out_dir: str
    record_dir: str
    method: str
    params: dict[str, Any]
    key_fingerprint: str
    class_map: dict[str, int]
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    psnr_mean: float | None = None
    ssim_mean: float | None = None
    seconds: float = 0.0
    device: str = "cpu"

    @property
    def images_per_second(self) -> float:
        return (self.done + self.skipped) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failures"] = [{"path": p, "reason": r} for p, r in self.failures]
        d["images_per_second"] = round(self.images_per_second, 2)
        return d


def _within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_folders(in_dir: Path, out_dir: Path, record_dir: Path) -> None:
    """Refuse layouts where writing could touch the input or mix record and images."""
    in_r, out_r, rec_r = in_dir.resolve(), out_dir.resolve(), record_dir.resolve()
    if not in_r.is_dir():
        raise InputError(f"input folder not found: {in_dir}" if not in_r.exists() else f"input is not a folder: {in_dir}")
    if out_r.exists() and not out_r.is_dir():
        raise InputError(f"output path exists and is not a folder: {out_dir}")
    if _within(out_r, in_r) or _within(in_r, out_r):
        raise InputError("the output folder must not be, contain, or lie inside the input folder")
    if _within(rec_r, in_r) or _within(rec_r, out_r) or _within(out_r, rec_r):
        raise InputError("the run record must lie outside both the input and the output folder")


def _fit_data(dataset: Dataset, max_pixels: int) -> FitData:
    """Labels for all images and sizes for an evenly spaced sample of them (headers only)."""
    from PIL import Image

    entries = dataset.entries
    step = max(1, len(entries) // SIZE_SAMPLE)
    sizes = []
    for entry in entries[::step][:SIZE_SAMPLE]:
        try:
            with Image.open(entry.path) as im:
                w, h = im.size
            if w * h <= max_pixels:
                sizes.append((h, w))
        except Exception:  # noqa: BLE001 - unreadable files are reported when processed
            continue
    labels = [e.label for e in entries] if dataset.labelled else None
    return FitData(len(dataset.classes), labels, sizes, [e.rel for e in entries])  # type: ignore[arg-type]


@dataclass
class _Item:
    entry: ImageEntry
    out_rel: str
    in_sha: str
    decoded: Decoded


class _Run:
    """One protect run's moving parts (kept off the public API)."""

    def __init__(self, dataset: Dataset, out_dir: Path, method: Perturbation, record: RunRecord,
                 options: ProtectOptions, device: torch.device, summary: Summary) -> None:
        self.dataset, self.out_dir, self.method, self.record = dataset, out_dir, method, record
        self.options, self.device, self.summary = options, device, summary
        workers = options.workers or max(2, os.cpu_count() or 2)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="protect-io")
        self.writes: deque[Future] = deque()
        self.write_window = 4 * workers + 2 * options.batch_size
        self.notes: dict[str, int] = {}
        self.bar: Any = None

    # -- worker side -----------------------------------------------------------------------
    def load(self, entry: ImageEntry) -> tuple[str, Any, str]:
        out_rel = output_name(entry.rel, entry.format, self.options.out_format)
        try:
            data = entry.path.read_bytes()
        except OSError as exc:
            return "fail", f"cannot read file: {exc.strerror or exc}", out_rel
        in_sha = hashlib.sha256(data).hexdigest()
        if not self.options.overwrite and self.record.is_current(entry.rel, in_sha, self.out_dir / out_rel):
            return "skip", None, out_rel
        try:
            decoded = decode(data, entry.format, self.options.max_pixels)
        except ImageError as exc:
            return "fail", str(exc), out_rel
        return "ok", _Item(entry, out_rel, in_sha, decoded), out_rel

    def write(self, item: _Item, pixels: np.ndarray, p: float, s: float) -> dict[str, Any]:
        fmt = "PNG" if self.options.out_format == "png" else item.decoded.format
        try:
            data = encode(to_image(pixels, item.decoded.alpha), fmt, item.decoded.meta, self.options.jpeg_quality)
            write_atomic(self.out_dir / item.out_rel, data)
        except (ImageError, OSError, ValueError) as exc:
            return {"path": item.entry.rel, "error": f"cannot write output: {exc}"}
        return {
            "path": item.entry.rel,
            "output": item.out_rel,
            "label": item.entry.label,
            "input_sha256": item.in_sha,
            "output_sha256": hashlib.sha256(data).hexdigest(),
            "psnr": round(p, 3),
            "ssim": round(s, 5),
            "notes": item.decoded.notes,
        }

    # -- main thread -----------------------------------------------------------------------
    def fail(self, rel: str, reason: str) -> None:
        self.summary.failed += 1
        self.summary.failures.append((rel, reason))
        log.warning("%s: %s", rel, reason)
        self._tick()
        if self.options.strict:
            raise InputError(f"{rel}: {reason} (stopped by --strict)")

    def _tick(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if self.summary.failed:
                self.bar.set_postfix(failed=self.summary.failed, refresh=False)

    def flush(self, items: list[_Item]) -> None:
        if not items:
            return
        stack = np.stack([it.decoded.pixels for it in items])  # N x H x W x C
        peak = 65535.0 if stack.dtype == np.uint16 else 255.0
        x = torch.from_numpy(stack.astype(np.int32) if stack.dtype == np.uint16 else stack)
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(peak)
        labels = None
        if self.dataset.labelled:
            labels = torch.tensor([it.entry.label for it in items], dtype=torch.long)
        with torch.inference_mode():
            y = self.method.apply(x, labels, [it.entry.rel for it in items])
            q = y.mul(peak).round_().clamp_(0, peak)
            qf = q / peak
            ps, ss = psnr(x, qf).tolist(), ssim(x, qf).tolist()
            out = q.permute(0, 2, 3, 1).to("cpu", torch.int32).numpy().astype(stack.dtype)
        for i, item in enumerate(items):
            self.writes.append(self.pool.submit(self.write, item, out[i], ps[i], ss[i]))
        self.drain(self.write_window)

    def drain(self, keep: int = 0) -> None:
        """Journal finished writes (in submission order) until at most ``keep`` are pending."""
        while self.writes and (len(self.writes) > keep or self.writes[0].done()):
            self._journal(self.writes.popleft().result())
        self.record.flush()

    def drain_finished(self) -> None:
        """After shutdown: journal every write that completed; cancelled ones are simply redone."""
        for fut in self.writes:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                try:
                    self._journal(fut.result())
                except InputError:  # --strict: the run is already stopping
                    pass
        self.writes.clear()

    def _journal(self, entry: dict[str, Any]) -> None:
        if "error" in entry:
            self.fail(entry["path"], entry["error"])
        else:
            self.record.add(entry)
            self.summary.done += 1
            for note in entry["notes"]:
                self.notes[note] = self.notes.get(note, 0) + 1
            self._tick()

    def run(self) -> None:
        entries = self.dataset.entries
        buckets: dict[tuple, list[_Item]] = {}
        held = 0  # values held in buckets
        loads: deque[Future] = deque()
        it = iter(entries)
        window, seen_values, seen = 2 * self.options.batch_size, 0, 0

        def refill() -> None:
            while len(loads) < window:
                entry = next(it, None)
                if entry is None:
                    return
                loads.append(self.pool.submit(self.load, entry))

        refill()
        while loads:
            status, payload, out_rel = loads.popleft().result()
            rel = entries[seen].rel
            seen += 1
            if status == "skip":
                self.summary.skipped += 1
                self._tick()
            elif status == "fail":
                self.fail(rel, payload)
            else:
                item: _Item = payload
                size = item.decoded.pixels.size
                seen_values += size
                window = int(min(2 * self.options.batch_size, max(8, QUEUE_VALUES * seen / max(seen_values, 1))))
                bucket = buckets.setdefault(item.decoded.key, [])
                bucket.append(item)
                held += size
                # every image in a bucket has the same shape, so its values are len x size
                if len(bucket) >= self.options.batch_size or len(bucket) * size >= BATCH_VALUES:
                    held -= len(bucket) * size
                    self.flush(buckets.pop(item.decoded.key))
                elif held >= QUEUE_VALUES:
                    biggest = max(buckets, key=lambda k: len(buckets[k]))
                    held -= len(buckets[biggest]) * buckets[biggest][0].decoded.pixels.size
                    self.flush(buckets.pop(biggest))
            refill()
            self.drain(self.write_window)
        for key in sorted(buckets):
            self.flush(buckets.pop(key))
        self.drain(0)


def _requested_params(method_cls: type[Perturbation], dataset: Dataset, given: dict[str, Any]) -> dict[str, Any]:
    params = {**method_cls.defaults(), **{k: v for k, v in given.items() if v is not None}}
    unknown = sorted(set(given) - set(method_cls.defaults()))
    if unknown:
        raise ConfigError(f"method '{method_cls.name}' has no parameter {', '.join(unknown)}; "
                          f"it takes {', '.join(sorted(method_cls.defaults()))}")
    if "num_classes" in params and params["num_classes"] is None and dataset.labelled:
        params["num_classes"] = len(dataset.classes)
    return params


def protect_folder(in_dir: str | os.PathLike, out_dir: str | os.PathLike, keyring: Keyring,
                   options: ProtectOptions | None = None,
                   on_start: Callable[[int], Any] | None = None) -> Summary:
    """Protect every image under ``in_dir`` into ``out_dir`` (see module doc).

    Args:
        in_dir: the input folder; never written to.
        out_dir: the output folder (created); mirrors relative paths and names.
        keyring: the key (see ``protect.keys.load_keyring``).
        options: method, parameters and run options.
        on_start: called with the number of images before work starts; may return a progress bar
            (an object with ``update(n)``, ``set_postfix`` and ``close``).
    Returns:
        a :class:`Summary`; failed files are listed there and in the manifest.
    """
    options = options or ProtectOptions()
    if options.out_format not in OUT_FORMATS:
        raise ConfigError(f"unknown output format '{options.out_format}'; use {' or '.join(OUT_FORMATS)}")
    if options.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    if not 1 <= options.jpeg_quality <= 100:
        raise ConfigError("JPEG quality must be in 1..100")
    in_path, out_path = Path(in_dir), Path(out_dir)
    record_dir = Path(options.record_dir) if options.record_dir else default_record_dir(out_path.resolve())
    check_folders(in_path, out_path, record_dir)
    method_cls = perturbations.get(options.method)
    dataset = discover(in_path, options.labels_csv)
    if method_cls.needs_labels and not dataset.labelled:
        raise InputError(
            f"method '{method_cls.name}' needs classes: put the images in class sub-folders or pass "
            "--labels FILE.csv (label-free protection comes with Unlearnable Clusters)"
        )
    out_names: dict[str, str] = {}
    for e in dataset.entries:
        name = output_name(e.rel, e.format, options.out_format)
        if name in out_names:
            raise InputError(f"'{out_names[name]}' and '{e.rel}' would both be written as '{name}'")
        out_names[name] = e.rel
    device = resolve_device(options.device)
    params = _requested_params(method_cls, dataset, options.params)
    header = {
        "format_version": FORMAT_VERSION,
        "tool": "protect",
        "method": method_cls.name,
        "paper": method_cls.paper,
        "params": params,
        "class_map": dataset.class_map,
        "label_source": dataset.label_source,
        "key_fingerprint": keyring.fingerprint(),
        "out_format": options.out_format,
        "jpeg_quality": options.jpeg_quality,
        "in_dir": str(in_path.resolve()),
    }
    previous = None if options.overwrite else RunRecord.find(record_dir)  # the journal is read once
    if previous is not None:
        previous.check_matches(header)  # a record of another run: say what differs
    resuming = previous is not None
    if out_path.is_dir() and not resuming and not options.overwrite and any(
        p for p in out_path.iterdir() if not p.name.startswith(".")
    ):
        raise RecordError(f"{out_dir} is not empty and holds no matching run record at {record_dir}; "
                          "choose an empty output folder or pass --overwrite")
    method = method_cls(keyring, **params)
    state = previous.load_state() if previous is not None else None
    if state:
        method.load_state_dict(state)
    else:
        method.fit(_fit_data(dataset, options.max_pixels))
    header["resolved_params"] = method.params()
    record = RunRecord.open(record_dir, header, previous)
    summary = Summary(str(in_path), str(out_path), str(record_dir), method_cls.name, method.params(),
                      keyring.fingerprint(), dataset.class_map, total=len(dataset.entries), device=str(device))
    summary.warnings.extend(f"skipped {rel}: {why}" for rel, why in dataset.skipped)
    run = _Run(dataset, out_path, method, record, options, device, summary)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # The I/O threads already keep the cores busy; OpenMP workers spinning beside them
        # would slow every tensor op by orders of magnitude (oversubscription).
        torch.set_num_threads(1)
    try:
        if not state:
            record.save_state(method.state_dict())
        out_path.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_path)
        if on_start is not None:
            run.bar = on_start(len(dataset.entries))
        run.run()
    finally:
        run.pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)
        run.drain_finished()
        if run.bar is not None:
            run.bar.close()
        summary.seconds = time.perf_counter() - start
        _finish(summary, record, run, options)
    return summary


def _finish(summary: Summary, record: RunRecord, run: _Run, options: ProtectOptions) -> None:
    values = list(record.done.values())
    if values:
        summary.psnr_mean = round(sum(v["psnr"] for v in values) / len(values), 3)
        summary.ssim_mean = round(sum(v["ssim"] for v in values) / len(values), 5)
    jpeg = sum(1 for v in values if v["output"].lower().endswith((".jpg", ".jpeg")))
    if jpeg:
        summary.warnings.append(f"{jpeg} output(s) written as JPEG (quality {options.jpeg_quality}): "
                                "re-encoding as JPEG weakens the protection; use --format png to keep it lossless")
    for note, count in sorted(run.notes.items()):
        summary.warnings.append(f"{count} image(s): {note}")
    record.write_manifest(
        {k: v for k, v in summary.to_dict().items() if k not in ("failures", "params", "class_map")},
        summary.failures,
    )
    record.close()
