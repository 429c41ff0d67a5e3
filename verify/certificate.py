"""The verification certificate: build it from trained cells, score it, save and load it.

Schema ``protect.certificate/1`` (a contract other tools read; the core below is fixed, more fields
are added beside it; saving, loading and the schema check live in :mod:`verify.certfile`)::

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
its leak).

**Imbalanced test sets** (medical data: e.g. 62 % or 73 % one class): every run also records
balanced accuracy (mean per-class recall) and macro one-vs-rest AUC (:mod:`verify.metrics`):
``peak_balanced_acc``, ``final_balanced_acc``, ``peak_auc``, ``final_auc`` and the curves
``curve_balanced_acc`` and ``curve_auc`` beside ``peak_acc``/``final_acc``/``curve`` (None in
cells trained before these existed). When the test set is imbalanced (some class count more
than 10 % from the mean count, :func:`verify.metrics.is_imbalanced`) the score, the best attacker
and the weak-baseline warnings use balanced accuracy with chance 1/K (the balanced accuracy of
any constant answer); ``score_metric`` says which (``"accuracy"`` or ``"balanced_accuracy"``) and
``score_chance`` its chance. ``chance`` keeps its meaning (the majority-class rate: the chance
level of plain accuracy). On a balanced test set ``score_metric`` is ``"accuracy"`` and
``score_chance`` equals ``chance``: everything is as before. 1 means the protected data trains a model no better than chance, 0 means no protection,
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
import math
import platform
import statistics
from collections.abc import Sequence
from typing import Any

from perturbations.errors import RecordError

from .certfile import EXTRA_RUN_FIELDS as _EXTRA_FIELDS
from .certfile import SCHEMA, load_certificate, save_certificate
from .metrics import BALANCED_CHANCE_DEFINITION, IMBALANCE_RULE, METRICS
from .relabel import original_labelling
from .train import CellResult

__all__ = [
    "BALANCED_SCORE_DEFINITION",
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
BALANCED_SCORE_DEFINITION = (
    "score = (baseline_peak - protected_peak) / (baseline_peak - chance) on balanced accuracy (mean per-class "
    "recall over the classes in the test set), chance = 1/K over the K classes in the test set, "
    "peak = highest clean-test balanced accuracy over epochs (mean over seeds); the test set is imbalanced, "
    "so plain accuracy would reward answering the majority class; baseline = the same tier and training "
    "regime on the clean data; 1 = no better than chance, 0 = no protection"
)
VERDICT_RULE = (
    "best attacker = the cell with the highest protected peak accuracy; verdict score = its score "
    "against its own clean baseline (conservative: never above its score against the best clean baseline)"
)
BALANCED_VERDICT_RULE = VERDICT_RULE.replace("peak accuracy", "peak balanced accuracy")
_ACC_FIELDS = ("final_acc", "peak_acc", "train_acc")
#: The certificate field holding the peak of each score metric.
PEAK_FIELD = {"accuracy": "peak_acc", "balanced_accuracy": "peak_balanced_acc"}


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


def _mean_curve(curves: Sequence[Sequence[float | None]], length: int) -> list[float | None] | None:
    """Epoch-wise mean of ``curves`` over their first ``length`` epochs (None at an epoch where a
    run has no value); None when some run has no such curve at all."""
    if any(len(c) < length for c in curves) or length == 0:
        return None
    out: list[float | None] = []
    for i in range(length):
        values = [c[i] for c in curves]
        out.append(_r(statistics.fmean(values)) if all(v is not None for v in values) else None)
    return out


def _peak(run: CellResult, metric: str) -> float | None:
    return run.peak_balanced_acc if metric == "balanced_accuracy" else run.peak_acc


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"score metric must be one of {METRICS}, got {metric!r}")


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
    for f in _EXTRA_FIELDS:
        values = [getattr(r, f) for r in runs]
        ok = all(v is not None for v in values)
        out[f] = _r(statistics.fmean(values)) if ok else None
        out[f + "_std"] = _r(_std(values)) if ok else None
    out["curve_balanced_acc"] = _mean_curve([r.curve_balanced for r in runs], length)
    out["curve_auc"] = _mean_curve([r.curve_auc for r in runs], length)
    out["wall_s"] = _r(sum(r.wall_s for r in runs), 2)
    out["per_seed"] = []
    for i, r in enumerate(runs):
        entry = {
            "seed": r.seed, "final_acc": _r(r.final_acc), "peak_acc": _r(r.peak_acc), "peak_epoch": r.peak_epoch,
            "train_acc": _r(r.train_acc), "train_loss": _r(r.train_loss), "curve": [_r(a) for a in r.curve],
            "curve_n": list(r.curve_n), "wall_s": _r(r.wall_s, 2),
            "epoch_s": [_r(s, 2) for s in r.epoch_s], "n_train": r.n_train, "n_test": r.n_test, "device": r.device,
            "final_balanced_acc": _r(r.final_balanced_acc), "peak_balanced_acc": _r(r.peak_balanced_acc),
            "peak_balanced_epoch": r.peak_balanced_epoch, "final_auc": _r(r.final_auc), "peak_auc": _r(r.peak_auc),
            "curve_balanced_acc": [_r(a) for a in r.curve_balanced] if r.curve_balanced else None,
            "curve_auc": [_r(a) for a in r.curve_auc] if r.curve_auc else None,
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
    metric: str = "accuracy",
) -> dict:
    """One grid cell: protected runs (one per seed), the clean baseline runs (same seeds) or None.
    ``metric`` (``"accuracy"`` or ``"balanced_accuracy"``) is what the score compares, against
    ``chance`` (that metric's chance level); the cell records it as ``score_metric``."""
    _check_metric(metric)
    peak = PEAK_FIELD[metric]
    cell: dict[str, Any] = {"training": training, "defense": defense, "protected": summarize_runs(protected),
                            "score_metric": metric}
    if clean:
        c = summarize_runs(clean, clean_cached)
        c["defense"] = baseline_defense or defense
        cell["clean"] = c
        cell["score"] = _r(score(c[peak], cell["protected"][peak], chance))
        by_seed = {r.seed: r for r in clean}
        per_seed = [score(_peak(by_seed[p.seed], metric), _peak(p, metric), chance)
                    for p in protected if p.seed in by_seed]
        per_seed_ok = [s for s in per_seed if s is not None]
        if len(protected) > 1 and len(per_seed_ok) == len(per_seed):
            cell["score_per_seed"] = [_r(s) for s in per_seed_ok]
            cell["score_std"] = _r(_std(per_seed_ok))
        cell["accuracy_drop"] = _r(c["peak_acc"] - cell["protected"]["peak_acc"])
        if c["peak_balanced_acc"] is not None and cell["protected"]["peak_balanced_acc"] is not None:
            cell["balanced_accuracy_drop"] = _r(c["peak_balanced_acc"] - cell["protected"]["peak_balanced_acc"])
    else:
        cell["score"] = None
    if extra:
        cell.update(extra)
    return cell


def _cells_metric(cells: Sequence[dict]) -> str:
    """The score metric the cells were scored with (``"accuracy"`` for cells of older versions)."""
    metrics = {c.get("score_metric", "accuracy") for c in cells}
    if len(metrics) > 1:
        raise RecordError(f"cells scored with different metrics: {sorted(metrics)}")
    return metrics.pop() if metrics else "accuracy"


def verdict(cells: Sequence[dict], chance: float, score_chance: float | None = None) -> dict:
    """Best attacker (highest protected peak of the cells' score metric; the first in grid order on
    ties), its score against its own baseline, and the weakest cell (lowest score; the best attacker
    when there are no scores). ``chance``: the accuracy chance (majority-class rate);
    ``score_chance``: the score metric's chance (default ``chance``)."""
    if not cells:
        raise RecordError("a certificate needs at least one cell")
    metric = _cells_metric(cells)
    peak = PEAK_FIELD[metric]
    if any(c["protected"].get(peak) is None for c in cells):
        peak = "peak_acc"  # runs without the metric (hand-built results): rank by accuracy
    best = max(cells, key=lambda c: c["protected"][peak])
    p = best["protected"]
    attacker = {
        "training": best["training"], "defense": best["defense"],
        "peak_acc": p["peak_acc"], "peak_acc_std": p.get("peak_acc_std", 0.0), "final_acc": p["final_acc"],
        "peak_balanced_acc": p.get("peak_balanced_acc"), "final_balanced_acc": p.get("final_balanced_acc"),
        "peak_auc": p.get("peak_auc"), "final_auc": p.get("final_auc"),
    }
    out: dict[str, Any] = {"best_attacker": attacker, "score": best.get("score")}
    if "clean" in best:
        attacker["baseline_peak_acc"] = best["clean"]["peak_acc"]
        attacker["baseline_peak_balanced_acc"] = best["clean"].get("peak_balanced_acc")
        attacker["baseline_peak_auc"] = best["clean"].get("peak_auc")
        out["accuracy_drop"] = best.get("accuracy_drop")
        if "balanced_accuracy_drop" in best:
            out["balanced_accuracy_drop"] = best["balanced_accuracy_drop"]
    scored = [c for c in cells if c.get("score") is not None]
    weakest = min(scored, key=lambda c: c["score"]) if scored else best
    out["weakest_cell"] = {"training": weakest["training"], "defense": weakest["defense"],
                           "peak_acc": weakest["protected"]["peak_acc"],
                           "peak_balanced_acc": weakest["protected"].get("peak_balanced_acc"),
                           "score": weakest.get("score")}
    out["chance"] = _r(chance)
    out["score_metric"] = metric
    out["score_chance"] = _r(chance if score_chance is None else score_chance)
    out["rule"] = BALANCED_VERDICT_RULE if metric == "balanced_accuracy" else VERDICT_RULE
    out["summary"] = verdict_sentence(out)
    return out


def verdict_sentence(v: dict) -> str:
    """The verdict in one sentence (used in report.md and by the CLI)."""
    b = v["best_attacker"]
    who = f"{b['training']} training with defense {b['defense']}"
    if v.get("score_metric") == "balanced_accuracy" and b.get("peak_balanced_acc") is not None:
        what, peak, base = "balanced accuracy", b["peak_balanced_acc"], b.get("baseline_peak_balanced_acc")
        chance = (f"chance {100 * v['score_chance']:.1f}% = 1/K for balanced accuracy on this imbalanced "
                  f"test set; plain accuracy {100 * b['peak_acc']:.1f}%")
    else:
        what, peak, base = "accuracy", b["peak_acc"], b.get("baseline_peak_acc")
        chance = f"chance {100 * v['chance']:.1f}%"
    if v.get("score") is None:
        why = ("no clean baseline was trained" if base is None else
               f"its clean baseline ({100 * base:.1f}%) is not above chance")
        return (f"The best attacker ({who}) reached {100 * peak:.1f}% peak clean-test {what} "
                f"({chance}); {why}, so no protection score.")
    return (f"Protection score {v['score']:.2f}: the best attacker ({who}) reached "
            f"{100 * peak:.1f}% peak clean-test {what} against {100 * base:.1f}% from clean data "
            f"under the same regime ({chance}).")


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
    score_metric: str | None = None,
    score_chance: float | None = None,
) -> dict:
    """Assemble the certificate dict (see module doc) from :func:`cell_entry` cells and settings.

    ``recipe``: a :class:`verify.recipes.Recipe`; ``trainings``: :class:`verify.recipes.Training`
    objects; ``defenses``: Defense objects or names; ``data``: ``{"train": {...}, "test": {...},
    "clean": {...}}`` summaries (:meth:`verify.data.TensorSet.describe`). ``chance`` (and the
    ``chance_class`` it answers): default the majority-class rate of ``data["test"]["per_class"]``,
    else 1/num_classes; pass the same value the cells were scored with. ``classes``: the classes the
    attacker trained on. ``labelling``: the attacker's labelling
    (:meth:`verify.relabel.Labelling.describe` or :func:`verify.relabel.original_labelling`; default:
    the data's own labels). ``score_metric``: the metric the cells were scored with (default: the
    cells' ``score_metric``); ``score_chance``: its chance (default: ``chance`` for accuracy, 1/K
    over the classes present in the test counts for balanced accuracy).
    """
    per_class = (data.get("test") or {}).get("per_class")
    counts_ok = bool(per_class) and len(per_class) == len(classes)
    if chance is None:
        if counts_ok:
            chance, chance_class = chance_level(per_class, classes)
        else:
            chance = 1.0 / len(classes)
    metric = score_metric or _cells_metric(cells)
    _check_metric(metric)
    if score_chance is None:
        if metric == "accuracy":
            score_chance = chance
        else:
            present = sum(1 for n in per_class if n > 0) if counts_ok else len(classes)
            score_chance = 1.0 / max(1, present)
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
        "score_definition": BALANCED_SCORE_DEFINITION if metric == "balanced_accuracy" else SCORE_DEFINITION,
        "score_metric": metric,
        "score_chance": _r(score_chance),
        "score_chance_definition": BALANCED_CHANCE_DEFINITION if metric == "balanced_accuracy" else CHANCE_DEFINITION,
        "imbalance_rule": IMBALANCE_RULE,
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
    cert["verdict"] = verdict(cert["cells"], chance, score_chance)
    cert["warnings"] = certificate_warnings(cert["cells"], score_chance, metric, model=recipe.model)
    return cert


#: A clean baseline less than this far above chance carries too little signal for a score.
WEAK_BASELINE_MARGIN = 0.10
#: Models too small for a meaningful adversarial-training attacker (their clean AT accuracy is capped).
SMALL_AT_MODELS = ("fastcnn", "fastcnn_wide", "vgg3")


def certificate_warnings(cells: Sequence[dict], chance: float, metric: str = "accuracy",
                         model: str | None = None) -> list[str]:
    """Plain-language caveats about the numbers (empty when there are none): clean baselines whose
    ``metric`` peak barely beats ``chance`` (their scores are noise), runs that lack the score
    metric (saved by an older version), and adversarial training with a small ``model``."""
    out: list[str] = []
    at = sorted({c["training"] for c in cells if c["training"] != "erm"})
    if at and model in SMALL_AT_MODELS:
        out.append(f"adversarial training ({', '.join(at)}) used the small model '{model}', whose own clean accuracy "
                   "under adversarial training is low (about 46% on 10k CIFAR-10 with fastcnn, against 68% with "
                   "ERM): it bounds what such an attacker can show; for an AT certificate that means something, "
                   "use --tier standard (ResNet-18, PGD-10) or --model resnet18")
    peak = PEAK_FIELD[metric]
    what = "balanced accuracy " if metric == "balanced_accuracy" else ""
    seen: set[tuple[str, str]] = set()
    for c in cells:
        if c["protected"].get(peak) is None or (c.get("clean") and c["clean"].get(peak) is None):
            out.append(f"cell {c['training']}/{c['defense']} has no {metric.replace('_', ' ')} (trained by an "
                       "older version): no score; rerun with --fresh")
            continue
        clean = c.get("clean")
        if not clean:
            continue
        key = (c["training"], clean.get("defense", c["defense"]))
        if key in seen or clean[peak] - chance >= WEAK_BASELINE_MARGIN:
            continue
        seen.add(key)
        out.append(
            f"the clean baseline {key[0]}/{key[1]} reached only {what}{100 * clean[peak]:.1f}% "
            f"(chance {100 * chance:.1f}%): too little signal for a protection score; train longer "
            f"(--epochs) or on more images"
        )
    return out
