"""The verification certificate: build it from trained cells, score it, save and load it.

Schema ``protect.certificate/1`` (a contract other tools read; the core below is fixed, more fields
are added beside it)::

    {"schema": "protect.certificate/1", "tier": "quick", "model": "fastcnn", "epochs": 10, "seeds": [0],
     "cells": [{"training": "erm", "defense": "none",
                "protected": {"final_acc": 0.30, "peak_acc": 0.33, "curve": [0.21, ...]},
                "clean": {"final_acc": 0.76, "peak_acc": 0.76, "curve": [0.18, ...]},
                "score": 0.70}],
     "verdict": {"best_attacker": {"training": "linf", "defense": "grayscale", "peak_acc": 0.41},
                 "score": 0.52}}

``labelling`` says which labels the attacker trained and was scored on: ``{"attacker": "original"}``
(the data's classes) or ``{"attacker": "remapped", "map": {...}, "source": {...}, "sha256": ...}``
(``protect verify --relabel``, :mod:`verify.relabel`); ``classes``, ``num_classes``, ``chance`` and
every accuracy are then in terms of the attacker's classes.

Accuracies are fractions of the clean test set in [0, 1]. With several seeds every accuracy is the
mean over seeds, with ``*_std`` (sample standard deviation, 0 for one seed) and the per-seed values
under ``per_seed``; curves are averaged epoch by epoch. ``clean`` is absent when no clean baseline was
trained; ``score`` is then null.

**Score** (RobustBench-style: one number, and every setting that produced it)::

    score = (baseline_peak - protected_peak) / (baseline_peak - chance)

``chance`` is the majority-class rate of the test set: the accuracy of always answering its most
frequent class (``chance_class``), which is what a model that learned nothing reaches. It equals
1/num_classes on a balanced test set; on an imbalanced one 1/K would be too low, and a baseline
stuck at the majority rate would get a meaningful-looking score.

using *peak* accuracies over epochs (a protection that leaks early and recovers later is judged by
its leak). 1 means the protected data trains a model no better than chance, 0 means no protection,
negative means the protected data trains a better model than the clean data. The baseline is the
same tier and training regime on the clean data (with the same defense when baselines were trained
per defense, else with no defense). Undefined (null) when the baseline itself is not above chance.

**Verdict**: the best attacker is the cell with the highest protected peak accuracy (what the
strongest attacker we tried can get out of the protected data). The verdict score is that cell's
score against *its own* baseline. This is the conservative choice: for an attacker above chance the
score grows with the baseline, and the own baseline is never above the best clean baseline, so it
never claims more protection than scoring against the best baseline would. The weakest cell (the
lowest score anywhere in the grid) is reported beside it.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from perturbations.errors import RecordError

from .relabel import original_labelling
from .train import CellResult

__all__ = [
    "CHANCE_DEFINITION",
    "SCHEMA",
    "SCORE_DEFINITION",
    "VERDICT_RULE",
    "build_certificate",
    "cell_entry",
    "chance_level",
    "library_versions",
    "load_certificate",
    "save_certificate",
    "score",
    "summarize_runs",
    "verdict",
]

SCHEMA = "protect.certificate/1"
CHANCE_DEFINITION = (
    "chance = the majority-class rate of the test set (the accuracy of always answering its most frequent "
    "class; 1/num_classes when the test set is balanced)"
)
SCORE_DEFINITION = (
    "score = (baseline_peak - protected_peak) / (baseline_peak - chance), chance = the majority-class rate "
    "of the test set, "
    "peak = highest clean-test accuracy over epochs (mean over seeds); baseline = the same tier and "
    "training regime on the clean data; 1 = no better than chance, 0 = no protection"
)
VERDICT_RULE = (
    "best attacker = the cell with the highest protected peak accuracy; verdict score = its score "
    "against its own clean baseline (conservative: never above its score against the best clean baseline)"
)
_ACC_FIELDS = ("final_acc", "peak_acc", "train_acc")


def _r(x: float | None, nd: int = 4) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), nd)


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def chance_level(counts: Sequence[int], classes: Sequence[str] | None = None) -> tuple[float, str | None]:
    """``(majority-class rate, that class's name)`` of a test set with ``counts`` images per class:
    the name is the first of the most frequent classes, None when every class has as many images
    (then the rate is 1/K) or for an empty set (rate 1/K)."""
    total = sum(counts)
    if total <= 0:
        return 1.0 / max(1, len(counts)), None
    k = max(range(len(counts)), key=lambda i: counts[i])
    balanced = min(counts) == counts[k]
    return counts[k] / total, (classes[k] if classes is not None and not balanced else None)


def score(baseline_peak: float | None, protected_peak: float | None, chance: float) -> float | None:
    """``(baseline - protected) / (baseline - chance)``; None without a baseline or when the baseline
    is not above chance (then nothing can be taken away)."""
    if baseline_peak is None or protected_peak is None or baseline_peak - chance <= 1e-9:
        return None
    return (baseline_peak - protected_peak) / (baseline_peak - chance)


def summarize_runs(runs: Sequence[CellResult], cached: Sequence[bool] | None = None) -> dict:
    """Mean (and ``*_std``) of the accuracy fields over seeds, the mean curve, and per-seed values."""
    if not runs:
        raise ValueError("summarize_runs needs at least one run")
    out: dict[str, Any] = {}
    for f in _ACC_FIELDS:
        values = [getattr(r, f) for r in runs]
        out[f] = _r(statistics.fmean(values))
        out[f + "_std"] = _r(_std(values))
    length = min(len(r.curve) for r in runs)
    out["curve"] = [_r(statistics.fmean(r.curve[i] for r in runs)) for i in range(length)]
    if len(runs) > 1:
        out["curve_std"] = [_r(_std([r.curve[i] for r in runs])) for i in range(length)]
    out["peak_epoch"] = runs[0].peak_epoch if len(runs) == 1 else [r.peak_epoch for r in runs]
    out["wall_s"] = _r(sum(r.wall_s for r in runs), 2)
    out["per_seed"] = []
    for i, r in enumerate(runs):
        entry = {
            "seed": r.seed, "final_acc": _r(r.final_acc), "peak_acc": _r(r.peak_acc), "peak_epoch": r.peak_epoch,
            "train_acc": _r(r.train_acc), "train_loss": _r(r.train_loss), "curve": [_r(a) for a in r.curve],
            "curve_n": list(r.curve_n), "wall_s": _r(r.wall_s, 2),
            "epoch_s": [_r(s, 2) for s in r.epoch_s], "n_train": r.n_train, "n_test": r.n_test, "device": r.device,
        }
        if cached is not None:
            entry["cached"] = bool(cached[i])
        out["per_seed"].append(entry)
    return out


def cell_entry(
    training: str,
    defense: str,
    protected: Sequence[CellResult],
    clean: Sequence[CellResult] | None,
    chance: float,
    baseline_defense: str | None = None,
    clean_cached: Sequence[bool] | None = None,
    extra: dict | None = None,
) -> dict:
    """One grid cell: protected runs (one per seed), the clean baseline runs (same seeds) or None."""
    cell: dict[str, Any] = {"training": training, "defense": defense, "protected": summarize_runs(protected)}
    if clean:
        c = summarize_runs(clean, clean_cached)
        c["defense"] = baseline_defense or defense
        cell["clean"] = c
        cell["score"] = _r(score(c["peak_acc"], cell["protected"]["peak_acc"], chance))
        by_seed = {r.seed: r for r in clean}
        per_seed = [score(by_seed[p.seed].peak_acc, p.peak_acc, chance) for p in protected if p.seed in by_seed]
        per_seed_ok = [s for s in per_seed if s is not None]
        if len(protected) > 1 and len(per_seed_ok) == len(per_seed):
            cell["score_per_seed"] = [_r(s) for s in per_seed_ok]
            cell["score_std"] = _r(_std(per_seed_ok))
        cell["accuracy_drop"] = _r(c["peak_acc"] - cell["protected"]["peak_acc"])
    else:
        cell["score"] = None
    if extra:
        cell.update(extra)
    return cell


def verdict(cells: Sequence[dict], chance: float) -> dict:
    """Best attacker (highest protected peak; the first in grid order on ties), its score against its
    own baseline, and the weakest cell (lowest score; the best attacker when there are no scores)."""
    if not cells:
        raise RecordError("a certificate needs at least one cell")
    best = max(cells, key=lambda c: c["protected"]["peak_acc"])
    attacker = {
        "training": best["training"], "defense": best["defense"],
        "peak_acc": best["protected"]["peak_acc"], "peak_acc_std": best["protected"].get("peak_acc_std", 0.0),
        "final_acc": best["protected"]["final_acc"],
    }
    out: dict[str, Any] = {"best_attacker": attacker, "score": best.get("score")}
    if "clean" in best:
        attacker["baseline_peak_acc"] = best["clean"]["peak_acc"]
        out["accuracy_drop"] = best.get("accuracy_drop")
    scored = [c for c in cells if c.get("score") is not None]
    weakest = min(scored, key=lambda c: c["score"]) if scored else best
    out["weakest_cell"] = {"training": weakest["training"], "defense": weakest["defense"],
                           "peak_acc": weakest["protected"]["peak_acc"], "score": weakest.get("score")}
    out["chance"] = _r(chance)
    out["rule"] = VERDICT_RULE
    out["summary"] = verdict_sentence(out)
    return out


def verdict_sentence(v: dict) -> str:
    """The verdict in one sentence (used in report.md and by the CLI)."""
    b = v["best_attacker"]
    who = f"{b['training']} training with defense {b['defense']}"
    if v.get("score") is None:
        why = ("no clean baseline was trained" if b.get("baseline_peak_acc") is None else
               f"its clean baseline ({100 * b['baseline_peak_acc']:.1f}%) is not above chance")
        return (f"The best attacker ({who}) reached {100 * b['peak_acc']:.1f}% peak clean-test accuracy "
                f"(chance {100 * v['chance']:.1f}%); {why}, so no protection score.")
    base = b.get("baseline_peak_acc")
    return (f"Protection score {v['score']:.2f}: the best attacker ({who}) reached "
            f"{100 * b['peak_acc']:.1f}% peak clean-test accuracy against {100 * base:.1f}% from clean data "
            f"under the same regime (chance {100 * v['chance']:.1f}%).")


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries that shape the numbers (None where not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "kornia", "numpy", "pillow", "protect"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def build_certificate(
    *,
    recipe: Any,
    trainings: Sequence[Any],
    defenses: Sequence[Any],
    seeds: Sequence[int],
    classes: Sequence[str],
    cells: Sequence[dict],
    data: dict,
    device: str,
    wall_s: float,
    baseline_per_defense: bool = False,
    chance: float | None = None,
    chance_class: str | None = None,
    extra: dict | None = None,
    labelling: dict | None = None,
) -> dict:
    """Assemble the certificate dict (see module doc) from :func:`cell_entry` cells and settings.

    ``recipe``: a :class:`verify.recipes.Recipe`; ``trainings``: :class:`verify.recipes.Training`
    objects; ``defenses``: Defense objects or names; ``data``: ``{"train": {...}, "test": {...},
    "clean": {...}}`` summaries (:meth:`verify.data.TensorSet.describe`). ``chance`` (and the
    ``chance_class`` it answers): default the majority-class rate of ``data["test"]["per_class"]``,
    else 1/num_classes; pass the same value the cells were scored with. ``classes``: the classes the
    attacker trained on. ``labelling``: the attacker's labelling
    (:meth:`verify.relabel.Labelling.describe` or :func:`verify.relabel.original_labelling`; default:
    the data's own labels).
    """
    if chance is None:
        per_class = (data.get("test") or {}).get("per_class")
        if per_class and len(per_class) == len(classes):
            chance, chance_class = chance_level(per_class, classes)
        else:
            chance = 1.0 / len(classes)
    import torch

    cert: dict[str, Any] = {
        "schema": SCHEMA,
        "tier": recipe.tier,
        "model": recipe.model,
        "epochs": recipe.epochs,
        "seeds": list(seeds),
        "num_classes": len(classes),
        "classes": list(classes),
        "chance": _r(chance),
        "chance_class": chance_class,
        "chance_definition": CHANCE_DEFINITION,
        "labelling": labelling if labelling is not None else original_labelling(classes),
        "fast_at": bool(recipe.fast_at and any(t.adversarial for t in trainings)),
        "trainings": [
            {"name": t.name, "norm": t.norm, "eps": t.eps, "description": t.describe(), "attack": recipe.attack(t)}
            for t in trainings
        ],
        "defenses": [
            {"name": getattr(d, "name", d), "static": getattr(d, "static", None), "source": getattr(d, "source", None)}
            for d in defenses
        ],
        "baseline_per_defense": bool(baseline_per_defense),
        "recipe": recipe.to_dict(),
        "score_definition": SCORE_DEFINITION,
        "device": device,
        "threads": torch.get_num_threads(),
        "versions": library_versions(),
        "data": data,
        "wall_s": _r(wall_s, 2),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cells": list(cells),
    }
    if extra:
        cert.update(extra)
    cert["verdict"] = verdict(cert["cells"], chance)
    cert["warnings"] = certificate_warnings(cert["cells"], chance)
    return cert


#: A clean baseline less than this far above chance carries too little signal for a score.
WEAK_BASELINE_MARGIN = 0.10


def certificate_warnings(cells: Sequence[dict], chance: float) -> list[str]:
    """Plain-language caveats about the numbers (empty when there are none): clean baselines that
    barely beat chance, whose scores are therefore noise."""
    out: list[str] = []
    seen: set[tuple[str, str]] = set()
    for c in cells:
        clean = c.get("clean")
        if not clean:
            continue
        key = (c["training"], clean.get("defense", c["defense"]))
        if key in seen or clean["peak_acc"] - chance >= WEAK_BASELINE_MARGIN:
            continue
        seen.add(key)
        out.append(
            f"the clean baseline {key[0]}/{key[1]} reached only {100 * clean['peak_acc']:.1f}% "
            f"(chance {100 * chance:.1f}%): too little signal for a protection score; train longer "
            f"(--epochs) or on more images"
        )
    return out


def _sanitize(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    return obj


def save_certificate(cert: dict, path: str | os.PathLike) -> Path:
    """Validate and write ``cert`` as JSON to ``path`` atomically (non-finite numbers become null)."""
    _validate(cert, "certificate")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_sanitize(cert), indent=2, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".certificate-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_certificate(path: str | os.PathLike) -> dict:
    """Read and validate a certificate; RecordError when missing, unreadable or of another schema."""
    path = Path(path)
    try:
        cert = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecordError(f"certificate not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"cannot read certificate {path}: {exc}") from None
    _validate(cert, str(path))
    return cert


def _is_acc(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 <= x <= 1.0


def _check_run(run: Any, where: str) -> None:
    if not isinstance(run, dict):
        raise RecordError(f"{where} is not an object")
    for key in ("final_acc", "peak_acc"):
        if not _is_acc(run.get(key)):
            raise RecordError(f"{where}.{key} must be an accuracy in [0, 1], got {run.get(key)!r}")
    curve = run.get("curve")
    if not isinstance(curve, list) or not all(_is_acc(a) for a in curve):
        raise RecordError(f"{where}.curve must be a list of accuracies in [0, 1]")


def _validate(cert: Any, where: str) -> None:
    """RecordError unless ``cert`` has the fixed core of schema ``protect.certificate/1``."""
    if not isinstance(cert, dict):
        raise RecordError(f"{where}: not a certificate (expected a JSON object)")
    if cert.get("schema") != SCHEMA:
        raise RecordError(f"{where}: schema is {cert.get('schema')!r}, expected {SCHEMA!r}")
    for key, types in (("tier", str), ("model", str), ("epochs", int), ("seeds", list), ("cells", list), ("verdict", dict)):
        if not isinstance(cert.get(key), types) or isinstance(cert.get(key), bool):
            raise RecordError(f"{where}: field '{key}' is missing or not a {types.__name__}")
    if not cert["cells"]:
        raise RecordError(f"{where}: no cells")
    for i, cell in enumerate(cert["cells"]):
        at = f"{where}: cells[{i}]"
        if not isinstance(cell, dict) or not isinstance(cell.get("training"), str) or not isinstance(cell.get("defense"), str):
            raise RecordError(f"{at} needs string fields 'training' and 'defense'")
        _check_run(cell.get("protected"), f"{at}.protected")
        if "clean" in cell:
            _check_run(cell["clean"], f"{at}.clean")
        s = cell.get("score")
        if s is not None and (not isinstance(s, (int, float)) or isinstance(s, bool)):
            raise RecordError(f"{at}.score must be a number or null")
    v = cert["verdict"]
    b = v.get("best_attacker")
    if not isinstance(b, dict) or not isinstance(b.get("training"), str) or not isinstance(b.get("defense"), str) \
            or not _is_acc(b.get("peak_acc")):
        raise RecordError(f"{where}: verdict.best_attacker needs training, defense and peak_acc")
    if "score" not in v or (v["score"] is not None and not isinstance(v["score"], (int, float))):
        raise RecordError(f"{where}: verdict.score must be a number or null")
