"""``protect tune``: search methods and parameters on a small subset and report the frontier of
fidelity (PSNR) against strength (the verdict score), then optionally protect the folder with the
chosen point.

For every candidate (a method, or a composition such as ``cuda+uc``, with parameters):

1. protect the subset (the first ``per_class`` images of each class, copied once into the tune
   folder) with :func:`protect.pipeline.protect_folder` and the owner's key: mean PSNR / SSIM and
   the time per image come from its summary;
   (with ``max_delta_e``, under that fidelity floor: each image's change scaled back until its
   low-frequency colour difference is at most it, as ``protect images --max-delta-e``; the mean dE
   joins PSNR and SSIM in the row);
2. when the PSNR is below the floor (``min_psnr``), stop there (it cannot be chosen);
3. otherwise certify it with :func:`verify.run.verify_folder` on the subset (clean baselines on the
   clean subset, the given trainings, defenses and seeds; finished cells are kept, so a rerun
   resumes; baselines are cached across candidates).

The **frontier** is the set of candidates no other candidate beats on both axes (a PSNR at least as
high and a score at least as high, one of them higher): sorted by PSNR, its scores fall. The
**choice** is the candidate with the highest score among those at or above the floor (ties: the
higher PSNR). Results: ``tune.json``, ``tune.md`` (the table) and ``frontier.png`` in the tune folder,
beside one ``candidate-<hash>`` folder per candidate (named by its label, so a rerun with the list
reordered or extended reuses them) with its private run record: keep the tune folder private.

Every candidate without a score says why (``reason`` in ``tune.json``, the status column of
``tune.md``): the error, the PSNR floor, or a clean baseline not above chance (too few images or
epochs; the clean baselines are the same for every candidate, so once none of them is above chance
the later candidates are protected but not certified). ``subset_counts`` and ``test_counts`` hold the
images actually staged per class (min, max, total) and the test set's.

Cheap refusals come first (options, candidates, the attacker grid, labels, the test folder, the
``--apply`` folder), before anything is staged; a run that fails later, before its report is written,
removes the folders it created (a tune folder that was there before is kept); the report is written
before ``--apply`` protects the folder.

Scores on a subset are noisy (a small training set, one seed by default) and the quick tier's model
is small: the tuner ranks candidates; the final certificate of the chosen protection is
``protect verify`` on the whole folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perturbations.base import parse_assignments
from perturbations.errors import ConfigError, InputError
from perturbations.keyring import Keyring
from protect.discover import discover
from protect.pipeline import ProtectOptions, protect_folder

from .certfile import write_text_atomic
from .run import check_options, verify_folder

log = logging.getLogger(__name__)

#: The default search: CUDA's filter strength, UC's bound, a composition, SALM's mask ratio, and
#: dense error-minimising noise with a large bound for attackers who train adversarially.
#: ``{surrogate}`` is replaced by the tuner's surrogate (UC's feature extractor).
DEFAULT_CANDIDATES = (
    "cuda",
    "cuda:blur=0.15",
    "cuda:filter_size=5",
    "uc:eps=8/255,surrogate={surrogate}",
    "uc:eps=16/255,surrogate={surrogate}",
    "cuda+uc:uc.eps=8/255,uc.surrogate={surrogate}",
    "salm:mask_ratio=0.1",
    "salm:mask_ratio=0.3",
    # dense error-minimising noise at 32/255 (about 21 dB): the one point measured to hold against
    # fast L-inf AT 8/255 (score 0.64 on 2000 CIFAR-10 images, docs/BENCHMARKS.md); a shortened fit
    "salm:mask_ratio=1,eps=32/255,steps=10,step_size=3.2/255,rounds=5",
)


@dataclass
class Candidate:
    """One point of the search: ``method`` (``cuda``, ``cuda+uc``, ...) and its parameters."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        inner = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.method}:{inner}" if inner else self.method


def parse_candidate(text: str, surrogate: str = "cifar-resnet20") -> Candidate:
    """``METHOD[:NAME=VALUE,NAME=VALUE]`` (values parsed as JSON when they parse, e.g. numbers and
    booleans; ``{surrogate}`` is replaced by ``surrogate``)."""
    method, _, rest = text.strip().partition(":")
    if not method:
        raise ConfigError(f"candidate '{text}': write METHOD[:NAME=VALUE,...], e.g. cuda:blur=0.15")
    items = filter(None, (p.strip() for p in rest.replace("{surrogate}", surrogate).split(",")))
    try:
        params = parse_assignments(items)
    except ConfigError as exc:
        raise ConfigError(f"candidate '{text}': {exc}") from None
    return Candidate(method.strip(), params)


def frontier(rows: Sequence[dict]) -> list[int]:
    """Indices of the rows no other row beats on both ``psnr`` and ``score`` (see module doc), in
    order of rising PSNR; rows without a score are left out."""
    scored = [(i, r) for i, r in enumerate(rows) if r.get("score") is not None and r.get("psnr") is not None]
    keep = []
    for i, r in scored:
        beaten = any((o["psnr"] >= r["psnr"] and o["score"] >= r["score"]) and
                     (o["psnr"] > r["psnr"] or o["score"] > r["score"]) for _, o in scored)
        if not beaten:
            keep.append(i)
    # equal points (same PSNR and score) keep the first only, so the frontier is strictly monotone
    seen: set[tuple[float, float]] = set()
    unique = []
    for i in sorted(keep, key=lambda i: (rows[i]["psnr"], -rows[i]["score"], i)):
        point = (rows[i]["psnr"], rows[i]["score"])
        if point not in seen:
            seen.add(point)
            unique.append(i)
    return unique


def choose(rows: Sequence[dict], min_psnr: float | None) -> int | None:
    """The index of the strongest candidate at or above the floor (ties: higher PSNR), or None."""
    ok = [i for i, r in enumerate(rows) if r.get("score") is not None
          and (min_psnr is None or r["psnr"] >= min_psnr)]
    if not ok:
        return None
    return max(ok, key=lambda i: (rows[i]["score"], rows[i]["psnr"], -i))


@dataclass
class Subset:
    """What the tuner stages: ``picked`` (relative path, class name) in order, the ``classes`` of
    the folder and the images staged per class (``counts``, class name -> n)."""

    picked: list[tuple[str, str]]
    classes: list[str]
    counts: dict[str, int]
    root: Path

    def describe(self) -> dict:
        n = list(self.counts.values())
        return {"per_class": dict(self.counts), "min": min(n), "max": max(n), "total": sum(n)}


def _pick_subset(in_dir: Path, per_class: int | None, labels_csv: Path | None) -> Subset:
    """The first ``per_class`` images of each class of ``in_dir`` (sorted paths); nothing is written.
    InputError for a folder without labels or with fewer than two classes."""
    ds = discover(in_dir, labels_csv)
    if not ds.labelled:
        raise InputError(f"{in_dir} has no labels: protect tune needs class sub-folders (or --labels) to "
                         "score the candidates")
    picked: list[tuple[str, str]] = []
    per: dict[int, int] = {}
    for e in ds.entries:
        if e.label is None:
            continue
        if per_class is None or per.get(e.label, 0) < per_class:
            per[e.label] = per.get(e.label, 0) + 1
            picked.append((e.rel, ds.classes[e.label]))
    counts = {ds.classes[k]: per[k] for k in sorted(per)}
    if len(counts) < 2:
        raise InputError(f"{in_dir} has images of {len(counts)} class ({list(counts)}): protect tune needs at "
                         "least 2 classes to score the candidates")
    return Subset(picked, list(ds.classes), counts, Path(ds.root))


def _stage_subset(dst: Path, subset: Subset, labels_csv: Path | None) -> Path:
    """Copy ``subset`` to ``dst`` once (class folders; a CSV's labels become folders).
    Reused when ``dst`` is complete."""
    marker = dst / ".complete"
    listing = json.dumps(subset.picked)
    if marker.is_file() and marker.read_text(encoding="utf-8") == listing:
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    for rel, cls in subset.picked:
        target = dst / cls / Path(rel).name if labels_csv is not None else dst / rel
        if target.exists():  # two CSV rows with one file name in one class
            target = target.with_name(f"{len(list(target.parent.iterdir()))}-{target.name}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(subset.root / rel, target)
    marker.write_text(listing, encoding="utf-8")
    return dst


def _check_candidates(cands: Sequence[Candidate], keyring: Keyring) -> None:
    """Build every candidate's method (unknown methods and parameters: ConfigError naming it)."""
    import perturbations

    for c in cands:
        try:
            cls = perturbations.get(c.method)
            cls(keyring, **cls.resolve_params(dict(c.params)))
        except ConfigError as exc:
            raise ConfigError(f"candidate '{c.label}': {exc}") from None


def _check_test(test_path: Path, test_labels_csv: Path | None, in_path: Path, labels_csv: Path | None,
                subset: Subset, same_size: bool = True) -> dict:
    """Load the test folder (labels, the training classes, one image size with the training images:
    the first image of each training class is decoded) before anything is staged; returns its counts."""
    from .data import load_folder

    test = load_folder(test_path, test_labels_csv, classes=subset.classes, name="test", expected_name="training",
                       resolution=None if same_size else 32)
    if not same_size:  # the attackers bring every image to their resolution: sizes may differ
        counts = dict(zip(test.classes, test.counts()))
        return {"per_class": counts, "total": len(test)}
    first = load_folder(in_path, labels_csv, max_per_class=1, name="training")
    if first.x.shape[1:] != test.x.shape[1:]:
        (ct, ht, wt), (ci, hi, wi) = test.x.shape[1:], first.x.shape[1:]
        raise InputError(f"training images are {wi}x{hi} with {ci} channel(s) but test images are {wt}x{ht} with "
                         f"{ct} channel(s): the attacker needs one size and channel count")
    counts = dict(zip(test.classes, test.counts()))
    return {"per_class": counts, "total": len(test)}


def _check_apply(in_path: Path, apply_to: Path) -> None:
    """The refusals ``--apply`` would meet only after the search, checked before it."""
    from protect.pipeline import check_folders
    from protect.record import JOURNAL, default_record_dir

    record = default_record_dir(apply_to)
    check_folders(in_path, apply_to, record)
    if (apply_to.is_dir() and not (record / JOURNAL).is_file()
            and any(not p.name.startswith(".") for p in apply_to.iterdir())):
        raise InputError(f"--apply {apply_to} is not empty and holds no run record at {record}; choose an empty "
                         "output folder")


def _new_top(path: Path) -> Path | None:
    """The outermost folder that creating ``path`` would create (None when it exists)."""
    path = Path(os.path.abspath(path))
    if path.exists():
        return None
    top = path
    while not top.parent.exists():
        top = top.parent
    return top


def _remove(paths: Sequence[Path]) -> None:
    for path in reversed(paths):
        try:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove %s: %s", path, exc)


def _no_score_reason(cert: dict, subset: Subset) -> str:
    """Why a certified candidate has no score (the verdict's baseline is not above chance)."""
    verdict = cert.get("verdict") or {}
    balanced = cert.get("score_metric") == "balanced_accuracy"
    base = (verdict.get("reference") or {}).get("balanced_acc" if balanced else "acc")
    chance = cert.get("score_chance", verdict.get("score_chance"))
    if base is None or chance is None:
        return "no clean baseline was trained"
    d = subset.describe()
    per = f"{d['min']}" if d["min"] == d["max"] else f"{d['min']}-{d['max']}"
    what = "balanced accuracy" if balanced else "accuracy"
    return (f"clean baseline at {100 * base:.1f}% {what}, {100 * (base - chance):+.1f} points from chance "
            f"{100 * chance:.1f}% (not above it): too few images ({per} per class) or epochs ({cert.get('epochs')}) "
            "for the attacker to learn the clean subset; raise --per-class or --epochs")


def _baselines_at_chance(cert: dict) -> bool:
    """True when no cell's clean baseline is above chance: then no candidate can get a score (the
    baselines are the same for every candidate)."""
    from .certificate import SCORE_FIELD

    peak = SCORE_FIELD.get(cert.get("score_metric", "accuracy"), "acc")
    chance = cert.get("score_chance")
    cells = cert.get("cells") or []
    bases = [(c.get("clean") or {}).get(peak) for c in cells]
    return bool(cells) and chance is not None and all(b is not None and b - chance <= 1e-9 for b in bases)


def tune_folder(
    in_dir: str | Path,
    test_dir: str | Path | None,
    keyring: Keyring,
    candidates: Sequence[str | Candidate] | None = None,
    *,
    min_psnr: float | None = None,
    per_class: int | None = 100,
    surrogate: str = "cifar-resnet20",
    tier: str = "quick",
    trainings: str = "erm",
    defenses: str = "none",
    seeds: int = 1,
    epochs: int | None = None,
    device: str = "auto",
    workers: int | None = None,
    report_dir: str | Path | None = None,
    labels_csv: str | Path | None = None,
    test_labels_csv: str | Path | None = None,
    apply_to: str | Path | None = None,
    progress: Callable[[str], Any] | None = None,
    holdout: float | None = None,
    resolution: int | str | None = None,
    max_delta_e: float | None = None,
) -> dict:
    """Search ``candidates`` on a subset of ``in_dir`` (see module doc); returns the tune report.

    ``labels_csv`` / ``test_labels_csv``: ``path,label`` CSVs for an input or test folder without
    class sub-folders (as for ``protect verify --labels / --test-labels``). ``apply_to``: protect the
    whole ``in_dir`` into that folder with the chosen candidate (a normal ``protect images`` run,
    resumable, its record beside it); the report is written before.

    Refusals come before anything is written: the options, the candidates' methods and parameters,
    the attacker grid (:func:`verify.run.check_options`), the labels of ``in_dir``, the test folder
    (loaded: labels, classes, image size) and ``apply_to``. A run that fails later, before its
    report is written, removes what it created (the tune folder when it made it, the subset, the
    candidates' folders and records); a tune folder that was there before is kept with what it held.
    An interrupted run (Ctrl-C) keeps its work, so the same command resumes.

    ``holdout`` (with ``test_dir`` None): every candidate is certified with ``protect verify
    --holdout``: a keyed share of the staged subset's originals is its test set and their protected
    copies leave its training set (:func:`verify.uncertainty.split_holdout`). ``resolution``: the
    attackers train at R x R (``protect verify --resolution``), so subsets of mixed sizes certify.
    ``max_delta_e``: every candidate, and ``apply_to``, is protected under that fidelity floor
    (``protect images --max-delta-e``); candidates made without it are other folders, never reused."""
    if holdout is not None:
        if test_dir is not None:
            raise ConfigError("--holdout makes the test set from the input images: leave out --test (or --holdout)")
        if not 0 < float(holdout) < 1:
            raise ConfigError(f"--holdout must lie between 0 and 1 (e.g. 0.2), got {holdout}")
    elif test_dir is None:
        raise ConfigError("give the clean test images (--test DIR), or --holdout F to hold out a share of the "
                          "input images")
    in_path, test_path = Path(in_dir), (None if test_dir is None else Path(test_dir))
    if min_psnr is not None and not (math.isfinite(min_psnr) and min_psnr > 0):
        raise ConfigError(f"--min-psnr must be a positive number of dB, got {min_psnr}")
    if max_delta_e is not None and not (math.isfinite(max_delta_e) and max_delta_e > 0):
        raise ConfigError(f"--max-delta-e must be a positive colour difference (dE), got {max_delta_e}")
    if per_class is not None and per_class < 1:
        raise ConfigError(f"--per-class must be >= 1, got {per_class}")
    report = Path(report_dir) if report_dir is not None else in_path.with_name(in_path.name + ".tune")
    if report.resolve() == in_path.resolve() or report.resolve().is_relative_to(in_path.resolve()):
        raise InputError("the tune folder must lie outside the input folder")
    if report.exists() and not report.is_dir():
        raise InputError(f"the tune folder {report} exists and is not a folder")
    chosen_cands = [c if isinstance(c, Candidate) else parse_candidate(c, surrogate)
                    for c in (candidates or DEFAULT_CANDIDATES)]
    _check_candidates(chosen_cands, keyring)
    check_options(tier, trainings, defenses, seeds, epochs=epochs, device=device)
    labels = Path(labels_csv) if labels_csv else None
    test_labels = Path(test_labels_csv) if test_labels_csv else None
    subset = _pick_subset(in_path, per_class, labels)
    sized = resolution is not None and str(resolution).strip().lower() != "native"
    test_counts = (_check_test(test_path, test_labels, in_path, labels, subset, same_size=not sized)
                   if test_path is not None else _holdout_counts(subset, float(holdout)))
    if apply_to is not None:
        _check_apply(in_path, Path(apply_to))
    say = progress or (lambda text: None)
    created: list[Path] = []  # what this run made, removed again when it fails before its report

    def make(path: Path) -> Path:
        top = _new_top(path)
        if top is not None:
            created.append(top)
        return path

    try:
        make(report).mkdir(parents=True, exist_ok=True)
        clean = _stage_subset(make(report / "subset"), subset, labels)
        result = _search(chosen_cands, clean, report, make, keyring, test_path, test_labels, subset, test_counts,
                         in_path, min_psnr=min_psnr, per_class=per_class, tier=tier, trainings=trainings,
                         defenses=defenses, seeds=seeds, epochs=epochs, device=device, workers=workers, say=say,
                         holdout=holdout, resolution=resolution, max_delta_e=max_delta_e)
        _write_report(result, report)
    except Exception:
        _remove(created)
        if created:
            log.info("tune failed before its report: removed %s", ", ".join(map(str, created)))
        raise
    if apply_to is not None:
        pick = result["chosen"]
        if pick is None:
            raise InputError(f"no candidate reached the PSNR floor with a score; nothing applied (the report is "
                             f"in {report}; lower --min-psnr or add gentler candidates)")
        cand = chosen_cands[pick]
        say(f"applying {cand.label} to {in_path} -> {apply_to}")
        summary = protect_folder(in_path, Path(apply_to), keyring, ProtectOptions(
            method=cand.method, params=dict(cand.params), device=device, workers=workers,
            labels_csv=labels, progress=False, max_delta_e=max_delta_e))
        result["applied"] = {"out_dir": str(Path(apply_to).resolve()), "record_dir": summary.record_dir,
                             "done": summary.done, "skipped": summary.skipped, "failed": summary.failed,
                             "psnr": summary.psnr_mean, "ssim": summary.ssim_mean, "delta_e": summary.delta_e_mean}
        _write_report(result, report)
    result["report_dir"] = str(report)
    return result


def _write_report(result: dict, report: Path) -> None:
    write_text_atomic(report / "tune.json", json.dumps(result, indent=2), ".tune-")
    write_text_atomic(report / "tune.md", table(result), ".tune-")
    _plot(result, report / "frontier.png")


def _holdout_counts(subset: Subset, fraction: float) -> dict:
    """The test counts ``--holdout fraction`` gives on the staged subset (as split_holdout rounds)."""
    per = {c: (min(n - 1, max(1, round(fraction * n))) if n >= 2 else 0) for c, n in subset.counts.items()}
    return {"per_class": per, "total": sum(per.values()), "holdout": fraction}


def _search(chosen_cands: Sequence[Candidate], clean: Path, report: Path, make: Callable[[Path], Path],
            keyring: Keyring, test_path: Path | None, test_labels: Path | None, subset: Subset, test_counts: dict,
            in_path: Path, *, min_psnr: float | None, per_class: int | None, tier: str, trainings: str,
            defenses: str, seeds: int, epochs: int | None, device: str, workers: int | None,
            say: Callable[[str], Any], holdout: float | None = None, resolution: int | str | None = None,
            max_delta_e: float | None = None) -> dict:
    """Protect and certify every candidate on the staged subset ``clean``; the tune report."""
    before = _previous_rows(report / "tune.json")
    rows: list[dict] = []
    verified = False
    hopeless: str | None = None  # set when the clean baselines cannot be beaten: later candidates skip verify
    for n, cand in enumerate(chosen_cands):
        row: dict[str, Any] = {"candidate": cand.label, "method": cand.method, "params": cand.params}
        # folders survive a reordered list; a floor is part of the name (made without one: the old name)
        name = cand.label if max_delta_e is None else f"{cand.label}|max_delta_e={max_delta_e:g}"
        tag = hashlib.sha256(name.encode("utf-8")).hexdigest()[:10]
        out = make(report / f"candidate-{tag}")
        make(report / f"candidate-{tag}.protect")
        started = time.perf_counter()
        say(f"[{n + 1}/{len(chosen_cands)}] {cand.label}: protecting {clean}")
        try:
            summary = protect_folder(clean, out, keyring, ProtectOptions(
                method=cand.method, params=dict(cand.params), device=device, workers=workers, progress=False,
                max_delta_e=max_delta_e))
        except (ConfigError, InputError) as exc:
            row.update(status="error", error=str(exc), reason=str(exc))
            rows.append(row)
            say(f"  skipped: {exc}")
            continue
        total = summary.done + summary.skipped
        row.update(psnr=summary.psnr_mean, ssim=summary.ssim_mean, delta_e=summary.delta_e_mean,
                   fit_s=summary.fit_seconds,
                   protect_s_per_image=round((time.perf_counter() - started) / max(1, total), 4))
        if summary.done == 0 and cand.label in before:  # resumed: keep the time of the run that protected it
            row.update(fit_s=before[cand.label].get("fit_s"), protect_s_per_image=before[cand.label].get("protect_s_per_image"))
        if summary.psnr_mean is None:
            row.update(status="error", error="no fidelity measured", reason="no fidelity measured")
        elif min_psnr is not None and summary.psnr_mean < min_psnr:
            row.update(status="below floor", score=None,
                       reason=f"PSNR {summary.psnr_mean:.1f} dB is below the floor {min_psnr:g} dB: not certified")
            say(f"  PSNR {summary.psnr_mean:.1f} dB is below the floor {min_psnr} dB: not certified")
        elif hopeless is not None:
            row.update(status="not certified", score=None, reason=hopeless)
            say(f"  PSNR {summary.psnr_mean:.1f} dB; not certified: {hopeless}")
        else:
            try:
                cert = verify_folder(out, test_path, clean, tier=tier, trainings=trainings, defenses=defenses,
                                     seeds=seeds, epochs=epochs, device=device, test_labels_csv=test_labels,
                                     report_dir=make(report / f"verify-{tag}"), progress=False, holdout=holdout,
                                     resolution=resolution)
                verified = True
            except (ConfigError, InputError) as exc:
                if not verified:  # the first certification: a bad test folder or attacker grid, for all
                    raise
                row.update(status="error", error=str(exc), reason=str(exc))
                rows.append(row)
                say(f"  not certified: {exc}")
                continue
            verdict = cert.get("verdict") or {}
            row.update(status="ok", score=verdict.get("score"),
                       best_attacker=verdict.get("best_attacker"), score_metric=cert.get("score_metric", "accuracy"))
            if cert.get("warnings"):
                row["warnings"] = list(cert["warnings"])
            if row["score"] is None:
                row.update(status="no score", reason=_no_score_reason(cert, subset))
                say(f"  PSNR {summary.psnr_mean:.1f} dB, no score: {row['reason']}")
                if _baselines_at_chance(cert):
                    hopeless = (f"the clean baselines are not above chance (see {cand.label}), so no candidate "
                                "can get a score; raise --per-class or --epochs")
            else:
                say(f"  PSNR {summary.psnr_mean:.1f} dB, score {row['score']:.2f}")
        rows.append(row)
    return {
        "schema": "protect.tune/1", "in_dir": str(in_path.resolve()),
        "test_dir": None if test_path is None else str(test_path.resolve()), "holdout": holdout,
        "resolution": resolution,
        "test_labels": str(test_labels.resolve()) if test_labels is not None else None,
        "subset": str(clean), "per_class": per_class, "subset_counts": subset.describe(), "test_counts": test_counts,
        "min_psnr": min_psnr, "max_delta_e": max_delta_e, "tier": tier, "trainings": trainings,
        "defenses": defenses, "seeds": seeds, "epochs": epochs, "key_fingerprint": keyring.fingerprint(),
        "candidates": rows, "frontier": frontier(rows), "chosen": choose(rows, min_psnr),
    }


def _previous_rows(path: Path) -> dict[str, dict]:
    """The candidate rows of an earlier tune run in the same folder, by candidate label."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        return {r["candidate"]: r for r in old.get("candidates", []) if isinstance(r, dict) and "candidate" in r}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


SUBSET_CAVEAT = ("Scores come from a subset and one training per seed: rank with them, then certify the chosen "
                 "protection on the whole folder (protect verify); close scores may swap there.")


def subset_text(result: dict) -> str:
    """``7 images, 2-5 per class (--per-class 100: some classes have fewer)``: what was staged."""
    counts = result.get("subset_counts")
    if not counts:  # a report of an older version
        return f"{result['per_class']} images per class"
    per = f"{counts['min']}" if counts["min"] == counts["max"] else f"{counts['min']}-{counts['max']}"
    text = f"{counts['total']} images, {per} per class"
    cap = result.get("per_class")
    if cap is not None and counts["min"] < cap:
        text += f" (--per-class {cap}: some classes have fewer)"
    test = result.get("test_counts")
    if test:
        text += f"; test set {test['total']} images"
        if test.get("holdout") is not None:
            text += f" held out of it (--holdout {test['holdout']:g}; their protected copies do not train)"
    return text


def table(result: dict) -> str:
    """The tune report as Markdown: one row per candidate, frontier and choice marked."""
    lines = [f"# protect tune: {result['in_dir']}", "",
             f"Subset: {subset_text(result)}; attacker: tier {result['tier']}, "
             f"trainings {result['trainings']}, defenses {result['defenses']}, {result['seeds']} seed(s). "
             f"PSNR floor: {result['min_psnr'] if result['min_psnr'] is not None else 'none'}; "
             f"dE floor: {'none' if result.get('max_delta_e') is None else format(result['max_delta_e'], 'g')}.", "",
             "| | candidate | PSNR | SSIM | dE | score | best attacker | protect s/img | status |",
             "|---|---|---:|---:|---:|---:|---|---:|---|"]
    front = set(result["frontier"])
    for i, r in enumerate(result["candidates"]):
        mark = ("**chosen**" if i == result["chosen"] else "") + (" frontier" if i in front else "")
        best = r.get("best_attacker") or {}
        attacker = f"{best.get('training', '')}/{best.get('defense', '')}" if best else ""
        psnr = f"{r['psnr']:.1f}" if r.get("psnr") is not None else ""
        ssim = f"{r['ssim']:.3f}" if r.get("ssim") is not None else ""
        de = f"{r['delta_e']:.2f}" if r.get("delta_e") is not None else ""
        score = f"{r['score']:.2f}" if r.get("score") is not None else ""
        per = f"{r['protect_s_per_image']:.3f}" if r.get("protect_s_per_image") is not None else ""
        why = r.get("reason") or r.get("error")
        status = r.get("status", "") + (f": {why}" if why else "")
        lines.append(f"| {mark.strip()} | `{r['candidate']}` | {psnr} | {ssim} | {de} | {score} | {attacker} | {per} | {status} |")
    lines += ["", SUBSET_CAVEAT]
    return "\n".join(lines) + "\n"


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["candidates"]
    fig, ax = plt.subplots(figsize=(6, 4))
    pts = [(r["psnr"], r["score"], r["candidate"]) for r in rows if r.get("score") is not None]
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:gray")
        for x, y, name in pts:
            ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    front = [rows[i] for i in result["frontier"]]
    if front:
        ax.plot([r["psnr"] for r in front], [r["score"] for r in front], "o-", color="tab:red", label="frontier")
    if result["min_psnr"] is not None:
        ax.axvline(result["min_psnr"], color="tab:blue", linestyle="--", label="PSNR floor")
    ax.set_xlabel("mean PSNR (dB): fidelity")
    ax.set_ylabel("verdict score: strength")
    ax.set_title("protect tune: fidelity against strength")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["Candidate", "DEFAULT_CANDIDATES", "choose", "frontier", "parse_candidate", "table", "tune_folder"]
