"""Protect a folder: discover, fit, then decode, perturb, encode and record every file.

The run takes an exclusive lock on its output and record folders, fits the method once (or loads
the fitted state of the run it resumes), saves that state before any output, and hands chunks of
files to an engine (:mod:`protect.engine`: worker processes, memory bounded in bytes) that runs
the per-file work of :mod:`protect.work`. Every output is written atomically, never through a
symbolic link, and journalled once it is in place, so an interrupted run resumes where it stopped
and ends byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import perturbations
from perturbations import FitData, Keyring, Perturbation

from .device import resolve_device
from .discover import Dataset, discover, discover_inputs
from .engine import LocalEngine, chunks, default_memory, default_workers
from .errors import ConfigError, InputError, RecordError
from .fitpass import fit_data, sample_sizes
from .imageio import DEFAULT_MAX_PIXELS, OUT_FORMATS, output_name
from .record import FORMAT_VERSION, JOURNAL, STATE, RunRecord, default_record_dir, deps_digest, state_digest
from .safefs import RunLock, Tree
from .work import Prev, Result, Spec, Task

log = logging.getLogger(__name__)

#: The fidelity floor of the photo default (label-free UC on a folder without labels): mean CIELAB
#: dE of the blurred images at most 2, below the 2.3 of a just-noticeable difference (issue 19's
#: target; on the Kodak photos UC then measures dE 1.93, SSIM 0.999, docs/BENCHMARKS.md).
PHOTO_MAX_DELTA_E = 2.0

#: A labelled folder of colour images whose median shorter side is above this (px) is a folder of
#: photos: every attacker of the quick grid (32 and 64 px) downscales them. Its default is the photo
#: default too (label-free UC under ``PHOTO_MAX_DELTA_E``), not class-wise CUDA: on the 800
#: cats_vs_dogs photos CUDA measures 22.3 dB, SSIM 0.63, dE 4.6 (visible ghosts) and scores -0.05
#: against the attacker at 32 / 64 px, UC under the floor dE 1.94 and 0.03 (docs/BENCHMARKS.md).
PHOTO_MIN_SIDE = 64

#: Where the per-file work runs (``--engine``).
ENGINES = ("local", "ray")


@dataclass
class ProtectOptions:
    """Everything about a run except the folders and the key.

    ``workers``: worker processes (default: the CPU cores); ``memory``: bytes of image working
    memory shared by all workers (default :func:`protect.engine.default_memory`), also what a
    fitting method may keep between its passes; ``prune``: delete the outputs of inputs that were
    removed or now fail (see :mod:`protect.record`); ``state_from``: the record folder of a finished
    run whose fitted method (and parameters) to reuse with the same key, instead of fitting;
    ``fit_progress(stage, done, total)``: called while a method fits; ``engine``: where the per-file
    work runs, ``"local"`` (worker processes, :mod:`protect.engine`) or ``"ray"`` (Ray actors,
    :mod:`protect.ray_engine`; ``workers`` then defaults to the cluster's CPUs).
    ``method``: None picks the method of the run this resumes (its record), else ``cuda`` for
    labelled images and the label-free ``uc`` for unlabelled ones. ``allow_reprotect``: protect
    images that are themselves the output of a protect run (refused otherwise).
    ``on_phase(line)``: called with one line as each phase of the run starts or ends.
    """

    method: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    labels_csv: Path | None = None
    out_format: str = "keep"
    device: str = "auto"
    batch_size: int = 256
    workers: int | None = None
    memory: int | None = None
    record_dir: Path | None = None
    state_from: Path | None = None
    fit_progress: Callable[[str, int, int], Any] | None = None
    engine: str = "local"
    overwrite: bool = False
    prune: bool = False
    strict: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    jpeg_quality: int | None = None  # None: each JPEG's own quality and subsampling ("auto")
    #: fidelity floor: no image's low-frequency dE above it. ``"auto"`` (default): ``PHOTO_MAX_DELTA_E``
    #: for the photo default (no method given; no labels, or labelled colour photos: label-free UC),
    #: the recorded floor when a run resumes or reuses ``--state``, else off; ``None`` or ``"off"``:
    #: off; a number: that floor.
    max_delta_e: float | str | None = "auto"
    progress: bool = True
    allow_reprotect: bool = False
    on_phase: Callable[[str], Any] | None = None


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
    orphans: list[dict[str, str]] = field(default_factory=list)
    pruned: int = 0
    skipped_entries: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    psnr_mean: float | None = None
    ssim_mean: float | None = None
    #: mean over the images of their low-frequency CIELAB dE (None when no image has one)
    delta_e_mean: float | None = None
    seconds: float = 0.0
    fit_seconds: float = 0.0
    fit_report: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    workers: int = 1
    method_note: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def unread(self) -> int:
        """Files with an image name that were not read (RAW photos, broken links, ...)."""
        return len(self.skipped_entries)

    @property
    def images_per_second(self) -> float:
        return (self.done + self.skipped) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failures"] = [{"path": p, "reason": r} for p, r in self.failures]
        d["images_per_second"] = round(self.images_per_second, 2)
        d["unread"] = self.unread
        return d


def _within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_folders(in_dir: Path, out_dir: Path, record_dir: Path) -> None:
    """Refuse layouts where writing could touch the input or mix record and images."""
    try:
        in_r, out_r, rec_r = in_dir.resolve(), out_dir.resolve(), record_dir.resolve()
    except (OSError, RuntimeError) as exc:  # a symbolic link loop in a given path
        raise InputError(f"cannot resolve the folders: {exc}") from None
    if not in_r.is_dir():
        raise InputError(f"input folder not found: {in_dir}" if not in_r.exists() else f"input is not a folder: {in_dir}")
    if out_r.exists() and not out_r.is_dir():
        raise InputError(f"output path exists and is not a folder: {out_dir}")
    if rec_r.exists() and not rec_r.is_dir():
        raise InputError(f"record path exists and is not a folder: {record_dir}")
    if _within(out_r, in_r) or _within(in_r, out_r):
        raise InputError("the output folder must not be, contain, or lie inside the input folder")
    if _within(rec_r, in_r) or _within(rec_r, out_r) or _within(out_r, rec_r) or _within(in_r, rec_r):
        raise InputError("the run record must lie outside both the input and the output folder")


def _requested_params(method_cls: type[Perturbation], dataset: Dataset, given: dict[str, Any]) -> dict[str, Any]:
    params = method_cls.resolve_params(given)
    for name in params:  # a composed method has one per stage (cuda.num_classes)
        if (name == "num_classes" or name.endswith(".num_classes")) and params[name] is None and dataset.labelled:
            params[name] = len(dataset.classes)
    return params


def _check_options(options: ProtectOptions) -> None:
    if options.out_format not in OUT_FORMATS:
        raise ConfigError(f"unknown output format '{options.out_format}'; use {' or '.join(OUT_FORMATS)}")
    if options.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    if options.workers is not None and options.workers < 1:
        raise ConfigError("--workers must be >= 1")
    if options.jpeg_quality is not None and not 1 <= options.jpeg_quality <= 100:
        raise ConfigError("JPEG quality must be in 1..100")
    if options.max_pixels < 1:
        raise ConfigError("--max-pixels must be >= 1")
    if isinstance(options.max_delta_e, str):
        if options.max_delta_e not in ("auto", "off"):
            raise ConfigError(f"--max-delta-e must be a number, 'auto' or 'off', got '{options.max_delta_e}'")
    elif options.max_delta_e is not None and not options.max_delta_e > 0:
        raise ConfigError(f"--max-delta-e must be above 0 (e.g. 2.0, about a just-noticeable colour difference), "
                          f"got {options.max_delta_e:g}")
    if options.engine not in ENGINES:
        raise ConfigError(f"unknown engine '{options.engine}'; use {' or '.join(ENGINES)}")
    if options.engine == "ray":
        from .ray_engine import require_ray

        require_ray()  # before anything is fitted: one line with the install command


class _Run:
    """The parent's side of a run: journal results as they arrive, count, show progress."""

    def __init__(self, record: RunRecord, summary: Summary, strict: bool) -> None:
        self.record, self.summary, self.strict = record, summary, strict
        self.notes: dict[str, int] = {}
        self.failed: set[str] = set()
        self.bar: Any = None

    def on_results(self, results: list[Result]) -> None:
        stop: tuple[str, str] | None = None
        try:
            for r in results:
                if r.kind == "done":
                    assert r.entry is not None
                    self.record.add(r.entry)
                    self.summary.done += 1
                    for note in r.notes:
                        self.notes[note] = self.notes.get(note, 0) + 1
                elif r.kind == "skip":
                    self.summary.skipped += 1
                else:
                    self.summary.failed += 1
                    self.summary.failures.append((r.rel, r.reason))
                    self.failed.add(r.rel)
                    log.warning("%s: %s", r.rel, r.reason)
                    if self.strict and (stop is None or r.rel < stop[0]):  # the first in input order
                        stop = (r.rel, r.reason)
        finally:
            self.record.flush()
        if self.bar is not None:
            self.bar.update(len(results))
            if self.summary.failed:
                self.bar.set_postfix(failed=self.summary.failed, refresh=False)
        if stop is not None:
            raise InputError(f"{stop[0]}: {stop[1]} (stopped by --strict)")


def protect_folder(in_dir: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                   keyring: Keyring, options: ProtectOptions | None = None,
                   on_start: Callable[[int], Any] | None = None) -> Summary:
    """Protect every image under ``in_dir`` into ``out_dir`` (see module doc).

    Args:
        in_dir: the input folder, or a list of image files (one, or several: their common folder
            is the root of the relative paths); never written to.
        out_dir: the output folder (created); mirrors relative paths and names.
        keyring: the key (see ``protect.keys.load_keyring``).
        options: method, parameters and run options.
        on_start: called with the number of images before work starts; may return a progress bar
            (an object with ``update(n)``, ``set_postfix`` and ``close``).
    Returns:
        a :class:`Summary`; failed files are listed there and in the manifest.

    A run that fails before it has written an output or saved a fitted state removes the folders
    it created (output and record), so a refusal leaves nothing behind.
    """
    options = options or ProtectOptions()
    _check_options(options)
    phase = _Phases(options.on_phase)  # held back until the checks have passed: a refusal stays one line
    inputs = [Path(in_dir)] if isinstance(in_dir, (str, os.PathLike)) else [Path(p) for p in in_dir]
    if not inputs:
        raise InputError("no input given: name a folder or image files")
    out_path = Path(out_dir)
    record_dir = Path(options.record_dir) if options.record_dir else default_record_dir(out_path)
    files_given = not (len(inputs) == 1 and inputs[0].is_dir())
    if files_given:
        dataset = discover_inputs(inputs, options.labels_csv)
        check_files(dataset, out_path, record_dir)
        in_path = dataset.root
    else:
        in_path = inputs[0]
        check_folders(in_path, out_path, record_dir)
        dataset = discover(in_path, options.labels_csv)
    phase(f"found {len(dataset)} image(s) in {in_path}"
          + (f" ({len(dataset.classes)} classes from {dataset.label_source})" if dataset.labelled else ", no labels")
          + (f"; {len(dataset.skipped)} file(s) not read (listed in the summary)" if dataset.skipped else ""))
    reprotect = _protect_output_evidence(dataset, in_path, record_dir)
    reprotect_warning = ""
    if reprotect is not None:
        if not options.allow_reprotect:
            raise InputError(f"{in_path} looks like the output of a protect run ({reprotect}): protecting it again "
                             "stacks a second perturbation on the first (twice the change, lower fidelity); protect "
                             "the originals instead, or pass --allow-reprotect")
        reprotect_warning = f"the input looks like the output of a protect run ({reprotect}); protected again"
    source = _state_source(options, keyring, dataset) if options.state_from else None
    recorded = None  # the header of the run recorded at record_dir, read once for both choices
    if source is not None:
        choice = _Choice(source.method, source.params, f"the fitted {source.method} of {options.state_from} (--state)")
        dataset = source.dataset
    else:
        if not options.method or options.max_delta_e == "auto":
            recorded = _recorded_header(record_dir)
        choice = _choose_method(options, dataset, record_dir, recorded)
    method_name, given, method_note = choice.method, choice.params, choice.note
    floor, floor_note = _choose_floor(options, choice.photo_default, source, recorded)
    options = replace(options, max_delta_e=floor)
    method_note = "; ".join(n for n in (method_note, floor_note) if n)
    method_cls = perturbations.get(method_name)
    formats = [e.format for e in dataset.entries]
    out_rels = [output_name(e.rel, f, options.out_format) for e, f in zip(dataset.entries, formats)]
    if options.out_format != "keep" and len(set(out_rels)) < len(out_rels):
        seen: dict[str, str] = {}
        for e, name in zip(dataset.entries, out_rels):
            if name in seen:
                raise InputError(f"'{seen[name]}' and '{e.rel}' would both be written as '{name}'")
            seen[name] = e.rel
    device = resolve_device(options.device)
    params = _requested_params(method_cls, dataset, given)
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
        "max_delta_e": options.max_delta_e,
        "in_dir": str(in_path.resolve()),
    }
    if files_given:
        header["inputs"] = [e.rel for e in dataset.entries]
    if source is not None:
        header["state_from"] = {"record": str(Path(options.state_from).resolve()), "state_sha256": source.sha}  # type: ignore[arg-type]
    method = method_cls(keyring, **params)  # checks the parameters before anything is created
    if method.needs_labels and not dataset.labelled:
        hint = (" (or leave out --method for the label-free default uc, or use --clusters K for label-agnostic "
                "CUDA)" if method_cls.name == "cuda" else " (or leave out --method for the label-free default uc)")
        raise InputError(f"method '{method_cls.name}' needs classes: put the images in class sub-folders or pass "
                         f"--labels FILE.csv{hint}")
    note = getattr(method, "surrogate_choice", None)
    method_note = "; ".join(n for n in (method_note, note) if n)
    phase(f"method: {method_cls.name}" + (f" ({method_note})" if method_note else ""))
    if (not options.overwrite and not (record_dir / JOURNAL).is_file() and out_path.is_dir()
            and any(not p.name.startswith(".") for p in out_path.iterdir())):
        raise RecordError(f"{out_dir} is not empty and holds no run record at {record_dir}; "
                          "choose an empty output folder or pass --overwrite")
    created = _missing_dirs(out_path) + _missing_dirs(record_dir)
    for folder, mode in ((out_path, 0o777), (record_dir, 0o700)):
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=mode)
        except OSError as exc:
            _remove_created(created, record_dir)
            raise InputError(f"cannot create {folder}: {exc.strerror or exc}") from None
        if not folder.is_dir():
            _remove_created(created, record_dir)
            raise InputError(f"cannot create {folder}: not a folder")
    try:
        lock = RunLock(record_dir, out_path)
    except BaseException:
        _remove_created(created, record_dir)
        raise
    try:
        with _cluster(options):  # Ray: reached (or started) before the fit, so a wrong address fails early
            summary = _locked_run(dataset, formats, out_rels, in_path, out_path, record_dir, keyring, options, method,
                                  params, header, device, on_start, source.state if source is not None else None,
                                  phase, sample=choice.sample)
    except BaseException:
        lock.release()
        _remove_created(created, record_dir)
        raise
    lock.release()
    summary.method_note = method_note
    if reprotect_warning:
        summary.warnings.insert(0, reprotect_warning)
    return summary


class _Phases:
    """One line per phase for ``ProtectOptions.on_phase``; lines said before :meth:`release` wait
    (the run may still be refused, and a refusal is one line on its own)."""

    def __init__(self, sink: Callable[[str], Any] | None) -> None:
        self.sink, self.held, self.released = sink, [], False

    def __call__(self, line: str) -> None:
        if self.sink is None:
            return
        if self.released:
            self.sink(line)
        else:
            self.held.append(line)

    def release(self) -> None:
        self.released = True
        for line in self.held:
            self(line)
        self.held.clear()


def check_files(dataset: Dataset, out_dir: Path, record_dir: Path) -> None:
    """Refuse layouts where writing could touch image files given one by one: the output and the
    record must not be (or lie in) a folder that would put an output over a given file."""
    try:
        out_r, rec_r = out_dir.resolve(), record_dir.resolve()
    except (OSError, RuntimeError) as exc:
        raise InputError(f"cannot resolve the folders: {exc}") from None
    if out_r.exists() and not out_r.is_dir():
        raise InputError(f"output path exists and is not a folder: {out_dir}")
    if rec_r.exists() and not rec_r.is_dir():
        raise InputError(f"record path exists and is not a folder: {record_dir}")
    for e in dataset.entries:
        path = Path(os.path.realpath(e.path))
        for folder, what in ((out_r, "output folder"), (rec_r, "run record")):
            if _within(path, folder) or (folder / e.rel).resolve() == path:
                raise InputError(f"the {what} {folder} would hold or overwrite the input {e.rel}; choose another")
    if _within(out_r, rec_r) or _within(rec_r, out_r):
        raise InputError("the run record must lie outside the output folder")


def _missing_dirs(path: Path) -> list[Path]:
    """The folders that ``path.mkdir(parents=True)`` would create, deepest first."""
    missing = []
    cur = Path(os.path.abspath(path))
    while not cur.exists() and cur != cur.parent:
        missing.append(cur)
        cur = cur.parent
    return missing


#: What a run puts in its record folder before its first output (removed after a refusal).
_RECORD_FILES = ("lock", JOURNAL, "manifest.json")


def _remove_created(created: list[Path], record_dir: Path) -> None:
    """After a failed run: remove the folders it created, but only while they hold nothing of
    value (no output, no fitted state); a record with a saved state is kept for the resume."""
    record = Path(os.path.abspath(record_dir))
    if record in created:
        if (record / STATE).exists():
            return  # the fit is saved: rerunning resumes without refitting
        for name in _RECORD_FILES:
            with contextlib.suppress(OSError):
                if (record / name).is_file() and not (record / name).is_symlink():
                    (record / name).unlink()
        with contextlib.suppress(OSError), Tree(record, create=False) as tree:
            tree.remove_temporaries()
    for folder in created:  # deepest first; rmdir refuses a folder that is not empty
        with contextlib.suppress(OSError):
            if folder.is_dir() and not folder.is_symlink():
                with contextlib.suppress(OSError), Tree(folder, create=False) as tree:
                    tree.remove_temporaries()
                folder.rmdir()


def _recorded_header(record_dir: Path) -> dict[str, Any] | None:
    """The header of the run recorded at ``record_dir`` when it names a method, else None."""
    try:
        previous = RunRecord.find(record_dir)
    except RecordError:
        return None  # unreadable: the run itself says why (or --overwrite replaces it)
    return previous.header if previous is not None and previous.header.get("method") else None


def _recorded_floor(header: dict[str, Any]) -> float | None:
    """The fidelity floor a run record's header holds (None: none)."""
    floor = header.get("max_delta_e")
    return None if floor is None else float(floor)


@dataclass
class _Choice:
    """The method a run uses, its parameters and why (``note``); ``photo_default`` when it is the
    photo default (label-free UC chosen for photos, which gets ``PHOTO_MAX_DELTA_E``); ``sample``:
    the header sample (:func:`~protect.fitpass.sample_sizes`) read to choose, reused by the fit."""

    method: str
    params: dict[str, Any]
    note: str = ""
    photo_default: bool = False
    sample: tuple[list[tuple[int, int]], int] | None = None


def _choose_method(options: ProtectOptions, dataset: Dataset, record_dir: Path,
                   recorded: dict[str, Any] | None) -> _Choice:
    """The method, its parameters and why: the given one; else the method of the run recorded at
    ``record_dir`` (its header ``recorded``: a rerun resumes it); else CUDA for labelled images
    that are not colour photos (:data:`PHOTO_MIN_SIDE`), label-free UC otherwise (the photo default)."""
    if options.method:
        return _Choice(options.method, options.params)
    if recorded is not None:
        params = options.params or dict(recorded.get("params") or {})
        return _Choice(str(recorded["method"]), params, f"the method recorded in {record_dir}")
    if not dataset.labelled:
        return _Choice("uc", options.params, "no labels found: the label-free method (--method or class sub-folders "
                       "choose another)", photo_default=True)
    sample = sample_sizes(dataset, options.max_pixels)
    side = _photo_side(*sample)
    if side is None:
        return _Choice("cuda", options.params, sample=sample)
    return _Choice("uc", options.params, f"labelled colour photos (median shorter side {side} px): the photo default, "
                   "the label-free method; class-wise CUDA ghosts photos and is no stronger once an attacker resizes "
                   "them (--method cuda chooses it)", photo_default=True, sample=sample)


def _photo_side(sizes: Sequence[tuple[int, int]], channels: int) -> int | None:
    """The median shorter side (px) of a header sample ``sizes`` (``(height, width)``) when the images
    are colour photos (above :data:`PHOTO_MIN_SIDE`), else None."""
    if channels != 3 or not sizes:
        return None
    side = statistics.median_low(min(h, w) for h, w in sizes)
    return side if side > PHOTO_MIN_SIDE else None


def _choose_floor(options: ProtectOptions, photo_default: bool, source: "_Source | None",
                  recorded: dict[str, Any] | None) -> tuple[float | None, str]:
    """The fidelity floor (``--max-delta-e``) this run uses, and why when it was not given: the
    photo default ``PHOTO_MAX_DELTA_E`` when ``photo_default`` (no ``--method``, no earlier run, and
    label-free UC chosen: no labels, or labelled colour photos), or the floor of the run resumed (its
    header ``recorded``, unless ``--overwrite``) or reused (``--state``)."""
    value = options.max_delta_e
    if value is None or value == "off":
        return None, ""
    if value != "auto":
        return float(value), ""
    if source is not None:
        return source.max_delta_e, ""
    if recorded is not None and not options.overwrite:  # a rerun resumes as it was made
        return _recorded_floor(recorded), ""
    if not photo_default:
        return None, ""
    return PHOTO_MAX_DELTA_E, (f"photo default --max-delta-e {PHOTO_MAX_DELTA_E:g}: no visible colour change; "
                               "--max-delta-e off keeps the whole, visible, perturbation")


def _protect_output_evidence(dataset: Dataset, in_path: Path, own_record: Path) -> str | None:
    """Why the input looks like a protect output, or None: a run record beside it (``IN.protect``),
    or a record beside it (any ``*.protect`` folder next to the input) whose outputs have the same
    bytes as input files here (a few are hashed)."""
    root = Path(os.path.abspath(in_path))
    own = Path(os.path.abspath(own_record))
    beside = default_record_dir(root)
    if beside != own and (beside / JOURNAL).is_file():
        return f"its run record is {beside}"
    try:
        siblings = sorted(p for p in root.parent.iterdir() if p.name.endswith(".protect") and p != own
                          and p != beside and (p / JOURNAL).is_file())
    except OSError:
        return None
    rels = {e.rel for e in dataset.entries}
    with Tree(root, create=False) as tree:  # hashes regular files only, never through a link
        for rec in siblings[:16]:
            try:
                other = RunRecord.read(rec)
            except RecordError:
                continue
            outputs = [(e.output, e.output_sha256) for e in other.done.values() if e.output in rels]
            for rel, sha in outputs[:4]:
                if tree.sha256(rel) == sha:
                    return f"{rel} is an output listed in {rec}"
    return None


@dataclass
class _Source:
    """What ``--state RECORD`` reuses: the finished run's method, parameters and fitted state."""

    method: str
    params: dict[str, Any]
    state: dict[str, torch.Tensor]
    sha: str
    dataset: Dataset
    max_delta_e: float | None = None


def _state_source(options: ProtectOptions, keyring: Keyring, dataset: Dataset) -> _Source:
    """Read the record given as ``--state``: same key required; labels are mapped by class name."""
    root = Path(options.state_from)  # type: ignore[arg-type]
    src = RunRecord.read(root)
    if src.header.get("key_fingerprint") != keyring.fingerprint():
        raise RecordError(f"--state {root}: that run used a different key; use its key to protect more images")
    if options.method not in (None, src.header.get("method")):
        raise ConfigError(f"--state {root}: that run used method '{src.header.get('method')}', not '{options.method}'")
    if options.params:
        raise ConfigError("--state reuses the method and parameters of that run; drop the method options")
    state = _load_state(src)
    if not state:
        raise RecordError(f"--state {root}: the run has no fitted state (it stopped before fitting, or its "
                          "method has none)")
    classes = src.header.get("class_map") or {}
    if dataset.labelled and classes:
        unknown = sorted(set(dataset.classes) - set(classes))
        if unknown:
            raise InputError(f"--state {root}: class(es) {', '.join(unknown[:5])} were not in that run "
                             f"(it had {', '.join(list(classes)[:10])})")
        names = sorted(classes, key=lambda n: classes[n])
        entries = [replace(e, label=classes[dataset.classes[e.label]]) if e.label is not None else e
                   for e in dataset.entries]
        dataset = replace(dataset, entries=entries, classes=names)
    return _Source(str(src.header.get("method")), dict(src.header.get("params") or {}), state,
                   src.state_sha256() or "", dataset, _recorded_floor(src.header))


def _stable_params(method: Perturbation) -> dict[str, Any]:
    """Resolved parameters without the ones that only describe a loaded file (a weights path)."""
    return {k: v for k, v in method.params().items() if k.rpartition(".")[2] != "surrogate_weights"}


def _load_state(previous: RunRecord) -> dict[str, torch.Tensor] | None:
    fh = previous.open_state()
    if fh is None:
        return None
    with fh:
        try:
            return torch.load(fh, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
            raise RecordError(f"cannot read method state in {previous.root}: {exc.__class__.__name__}; "
                              "rerun with --overwrite") from None


def _locked_run(dataset: Dataset, formats: list[str], out_rels: list[str], in_path: Path, out_path: Path,
                record_dir: Path, keyring: Keyring,
                options: ProtectOptions, method: Perturbation, params: dict[str, Any],
                header: dict[str, Any], device: torch.device, on_start: Callable[[int], Any] | None,
                source_state: dict[str, torch.Tensor] | None, phase: "_Phases",
                sample: tuple[list[tuple[int, int]], int] | None = None) -> Summary:
    method_cls = type(method)
    previous = None if options.overwrite else RunRecord.find(record_dir)  # read under the lock
    if previous is not None:
        previous.check_matches(header)  # a record of another run: say what differs
    state = _load_state(previous) if previous is not None else None
    workers = options.workers or default_workers()
    memory = options.memory or default_memory()
    data = fit_data(dataset, options.max_pixels, threads=workers, device=str(device), memory=memory,
                    progress=options.fit_progress, sample=sample)
    changed = False
    fit_start = time.perf_counter()
    phase.release()
    phase(f"fit: loading the fitted {method_cls.name} of {record_dir}" if state else
          f"fit: {method_cls.name} with the fitted state of --state" if source_state else
          f"fit: {method_cls.name} on {len(dataset)} image(s)")
    if state:  # resuming: never refit; only images the state has not seen join it
        method.load_state_dict(state)
        changed = method.extend(data)
    elif source_state:  # --state: a finished run's fitted method; every image here joins it afresh
        method.load_state_dict({k: v for k, v in source_state.items() if k not in method.per_image_state})
        method.extend(data)
        changed = True
    else:
        method.fit(data)
        changed = True
    fit_seconds = time.perf_counter() - fit_start
    notes = list(method.notes())
    if fit_seconds >= 0.5:
        phase(f"fit: done in {fit_seconds:.1f} s")
    header["resolved_params"] = method.params()
    for root in (out_path, record_dir):
        with Tree(root) as tree:
            tree.remove_temporaries()
    record = RunRecord.open(record_dir, header, previous)
    summary = Summary(str(in_path), str(out_path), str(record_dir), method_cls.name, method.params(),
                      keyring.fingerprint(), dataset.class_map, total=len(dataset.entries), device=str(device),
                      workers=workers, fit_seconds=round(fit_seconds, 2), fit_report=method.fit_report(),
                      notes=notes)
    summary.skipped_entries = [{"path": rel, "reason": why} for rel, why in dataset.skipped]
    summary.warnings.extend(f"skipped {rel}: {why}" for rel, why in dataset.skipped)
    run = _Run(record, summary, options.strict)
    start = time.perf_counter()
    try:
        state_dict = {k: v.detach().cpu() for k, v in method.state_dict().items()}
        if changed or record.state_sha256() is None:
            record.save_state(lambda fh: torch.save(state_dict, fh))
        # what the outputs depend on: the shared state, not the per-image table (it only grows)
        core = state_digest({k: v for k, v in state_dict.items() if k not in method.per_image_state})
        deps = deps_digest({"method": method_cls.name, "params": _stable_params(method), "state": core,
                            "out_format": options.out_format, "jpeg_quality": options.jpeg_quality,
                            "compute": "exact" if method.exact else device.type,
                            **({"max_delta_e": options.max_delta_e} if options.max_delta_e is not None else {})})
        classes = dataset.classes
        tasks = []
        for e, fmt, out_rel in zip(dataset.entries, formats, out_rels):
            old = record.done.get(e.rel)
            prev = Prev(old.input_sha256, old.output_sha256, old.output, old.label, old.deps) if old else None
            tasks.append(Task(e.rel, fmt, out_rel, e.label, classes[e.label] if e.label is not None else None, prev))
        spec = Spec(method_cls.name, params, state_dict, keyring, str(dataset.root), str(out_path.resolve()),
                    options.out_format, options.jpeg_quality, options.max_pixels, options.batch_size,
                    options.overwrite, str(device), deps, memory, options.max_delta_e)
        engine = _engine(options, spec, workers, len(tasks))
        summary.workers = engine.workers

        def ready() -> None:
            phase(f"protect: {len(tasks)} image(s) on {engine.workers} worker(s), {device}")
            if on_start is not None:
                run.bar = on_start(len(tasks))

        try:
            engine.run(chunks(tasks, engine.workers), run.on_results, ready, ordered=options.strict)
        except BaseException:
            # Stopped (Ctrl-C, --strict, a dead worker): the workers were killed, perhaps mid-write.
            with Tree(out_path) as tree:
                tree.remove_temporaries()
            raise
    finally:
        if run.bar is not None:
            run.bar.close()
        summary.seconds = time.perf_counter() - start
        _finish(summary, record, run, dataset, out_path, options)
    return summary


def _cluster(options: ProtectOptions) -> contextlib.AbstractContextManager:
    """The Ray cluster for the whole run with ``--engine ray`` (nothing otherwise)."""
    if options.engine != "ray":
        return contextlib.nullcontext()
    from .ray_engine import cluster

    return cluster(options.workers or default_workers())


def _engine(options: ProtectOptions, spec: Spec, workers: int, files: int) -> LocalEngine | Any:
    """The engine ``options.engine`` names, with no more workers than files."""
    if options.engine == "ray":
        from .ray_engine import RayEngine

        return RayEngine(spec, options.workers, max(1, files))
    return LocalEngine(spec, min(workers, max(1, files)))


def _finish(summary: Summary, record: RunRecord, run: _Run, dataset: Dataset, out_path: Path,
            options: ProtectOptions) -> None:
    rels = {e.rel for e in dataset.entries}
    current = [r for r in record.done if (r in rels or dataset.given_files) and r not in run.failed]
    # files given one by one: the outputs of other files protected into the same folder stay current
    orphan_rels = sorted(r for r in record.done if (r not in rels and not dataset.given_files) or r in run.failed)
    outputs = {record.done[r].output for r in current}
    orphans = [{"path": r, "output": record.done[r].output,
                "reason": "input was removed" if r not in rels else "input now fails"} for r in orphan_rels]
    if options.prune and orphans:
        with Tree(out_path) as tree:
            for o in orphans:
                entry = record.done[o["path"]]
                if entry.output in outputs:
                    continue  # the same name is a current output now
                if tree.sha256(entry.output) == entry.output_sha256:
                    tree.unlink(entry.output)
                    summary.pruned += 1
                elif tree.sha256(entry.output) is not None:
                    summary.warnings.append(f"kept {entry.output}: it changed since it was written (not pruned)")
        record.forget(orphan_rels)
        record.compact()
        orphans = []
    summary.orphans = orphans
    if orphans:
        summary.warnings.append(f"{len(orphans)} output(s) belong to inputs that were removed or now fail; "
                                "`protect images ... --prune` deletes them")
    values = [record.done[r] for r in current]
    if values:
        summary.psnr_mean = round(sum(v.psnr for v in values) / len(values), 3)
        summary.ssim_mean = round(sum(v.ssim for v in values) / len(values), 5)
        des = [v.delta_e for v in values if v.delta_e is not None]
        summary.delta_e_mean = round(sum(des) / len(des), 3) if des else None
    jpeg = sum(1 for v in values if v.output.lower().endswith((".jpg", ".jpeg")))
    if jpeg:
        quality = "each input's own quality" if options.jpeg_quality is None else f"quality {options.jpeg_quality}"
        summary.warnings.append(f"{jpeg} output(s) written as JPEG ({quality}): "
                                "re-encoding as JPEG weakens the protection; use --format png to keep it lossless")
    for note, count in sorted(run.notes.items()):
        summary.warnings.append(f"{count} image(s): {note}")
    record.write_manifest(
        {k: v for k, v in summary.to_dict().items() if k not in ("failures", "params", "class_map", "orphans")},
        current, summary.failures, orphans,
    )
    record.close()
