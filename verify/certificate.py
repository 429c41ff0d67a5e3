"""The verification certificate: build it from trained cells, score it, save and load it.

Schema ``protect.certificate/2`` (a contract other tools read; the core below is fixed, more fields
are added beside it; saving, loading and the schema check live in :mod:`verify.certfile`)::

    {"schema": "protect.certificate/2", "tier": "quick", "model": "fastcnn", "epochs": 10, "seeds": [0],
     "cells": [{"training": "erm", "defense": "none",
                "protected": {"acc": 0.30, "selected_epoch": 7, "peak_acc": 0.33, "final_acc": 0.30,
                              "curve": [0.21, ...]},
                "clean": {"acc": 0.76, "peak_acc": 0.76, ...},
                "effect": 0.70}],
     "verdict": {"score": 0.52, "interval": [0.47, 0.57], "conclusive": true,
                 "reference": {"training": "erm", "defense": "none", "acc": 0.76},
                 "best_attacker": {"training": "linf", "defense": "grayscale", "acc": 0.41, "effect": 0.16},
                 "smallest_effect": {"training": "linf", "defense": "grayscale", "effect": 0.16}}}

``labelling`` says which labels the attacker trained and was scored on: ``{"attacker": "original"}``
(the data's classes) or ``{"attacker": "remapped", "map": {...}, "source": {...}, "sha256": ...}``
(``protect verify --relabel``, :mod:`verify.relabel`); ``classes``, ``num_classes``, ``chance`` and
every accuracy are then in terms of the attacker's classes.

Accuracies are fractions of the clean test set in [0, 1]. **Which epoch**: ``acc`` (and
``balanced_acc``, ``auc``) are measured at the epoch chosen on the validation images
(``selected_epoch``; :mod:`verify.uncertainty` splits them off the test set, or ``--val``); every
score uses them. ``peak_acc`` is the best test accuracy over the epochs where the test set was scored,
chosen with the test labels themselves: the *oracle*, optimistic, kept as a second, labelled number.
With several seeds every accuracy is the mean over seeds, with ``*_std`` (sample standard
deviation, 0 for one seed) and the per-seed values under ``per_seed``; curves are averaged epoch by
epoch. ``clean`` is absent when no clean baseline was trained; ``effect`` is then null.

**Renamed answers**: every epoch's answers are renamed by the permutation of classes that scores
best on the validation images, where the model's own are below chance there and it beats them by
more than 0.1 (:class:`verify.train.CellResult`),
so a model that learned the classes under each other's names (class-targeted adversarial
poisoning) scores what an attacker with those images gets from it. ``answers_remapped``: the
number of seeds whose chosen epoch did; ``per_seed[i]["answer_map"]`` the renaming. With two
classes the attacker also reads a *decision threshold* off the validation images where the model's
own answers are near chance there but its scores rank the classes (AUC more than 0.1 and two null
standard deviations from 1/2, either way round; :func:`verify.evaluation.best_threshold`):
``answers_thresholded`` counts the seeds whose chosen epoch did, ``per_seed[i]["threshold"]`` is
the cut on the (renamed) class-1 log-odds. With more classes, where no renaming holds, the
attacker adds per-class offsets to the log-probabilities where their cross-fitted validation
score wins by more than 0.1 (``answers_offset``, ``per_seed[i]["offsets"]``). All are choices on the validation images, which can
cost on the test set, so a protected run keeps the better on the test set of its own answers and
the read ones (``per_seed[i]["own_score"]``, ``["read_score"]``; each at its own chosen epoch):
reading never lowers a protected cell, and clean baselines keep their own answers, so reading
never raises a score.

**Chance** is the majority-class rate of the test set: the accuracy of always answering its most
frequent class (``chance_class``), which is what a model that learned nothing reaches. It equals
1/num_classes on a balanced test set; on an imbalanced one 1/K would be too low.

**Imbalanced test sets** (medical data: e.g. 62 % or 73 % one class): every run also records
balanced accuracy (mean per-class recall) and macro one-vs-rest AUC (:mod:`verify.metrics`). When
the test set is imbalanced (some class count more than 10 % from the mean count,
:func:`verify.metrics.is_imbalanced`) the scores, the best attacker and the weak-baseline warnings
use balanced accuracy with chance 1/K (the balanced accuracy of any constant answer);
``score_metric`` says which (``"accuracy"`` or ``"balanced_accuracy"``) and ``score_chance`` its
chance. ``chance`` keeps its meaning (the majority-class rate).

**The headline score** (the verdict; RobustBench-style: one number, and every setting that produced it)::

    score = (reference - best) / (reference - chance)

``best`` is the highest protected score metric over *all* cells (what the strongest attacker we
tried gets out of the protected data), ``reference`` what an attacker gets from the *clean* images
with plain training: the clean ERM baseline (same model, tier and resolution, no defense). The
reference does not depend on the grid, and ``best`` can only rise when a cell is added, so adding an
attacker can never raise the score. 1 means the protected data trains a model no better than chance,
0 no protection, negative a better model than the clean data. Null without a clean reference or when
it is not above chance. ``interval``: its 95 % bootstrap interval (:mod:`verify.uncertainty`);
``conclusive`` is false (the verdict says "inconclusive") when the interval contains 0, when the
reference is within :data:`WEAK_BASELINE_MARGIN` of chance, or when there is no score.

**A cell's effect** (``effect``) compares it with the clean data under the *same* regime and
defense of baseline: ``(clean - protected) / (clean - chance)``. It says what the protection takes
away from that attacker (an adversarially trained model learns less from clean images too); it is
not the verdict. ``smallest_effect`` names the cell where the protection does least.
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
    "reference_of",
    "EFFECT_DEFINITION",
]

CHANCE_DEFINITION = (
    "chance = the majority-class rate of the test set (the accuracy of always answering its most frequent "
    "class; 1/num_classes when the test set is balanced)"
)
SCORE_DEFINITION = (
    "score = (reference - best) / (reference - chance): best = the highest protected accuracy over all cells, "
    "reference = the clean ERM baseline (same model, tier and resolution, no defense), accuracies at the epoch "
    "chosen on the validation images (mean over seeds), chance = the majority-class rate of the test set; "
    "1 = no better than chance, 0 = no protection; adding a cell can never raise it"
)
BALANCED_SCORE_DEFINITION = (
    "score = (reference - best) / (reference - chance) on balanced accuracy (mean per-class recall over the "
    "classes in the test set): best = the highest protected balanced accuracy over all cells, reference = the "
    "clean ERM baseline (same model, tier and resolution, no defense), at the epoch chosen on the validation "
    "images (mean over seeds), chance = 1/K; the test set is imbalanced, so plain accuracy would reward "
    "answering the majority class; 1 = no better than chance, 0 = no protection; adding a cell can never raise it"
)
EFFECT_DEFINITION = (
    "effect = (clean - protected) / (clean - chance) of one cell: the clean baseline under the same training "
    "regime (and the same defense with --baseline-per-defense, else none); what the protection takes away from "
    "that attacker, not the verdict"
)
VERDICT_RULE = (
    "best attacker = the cell with the highest protected accuracy at its validation-chosen epoch; headline "
    "score = (reference - best) / (reference - chance) against the clean ERM reference, so it only falls as "
    "attackers are added; inconclusive when its 95 % interval contains 0 or the reference is too weak"
)
BALANCED_VERDICT_RULE = VERDICT_RULE.replace("protected accuracy", "protected balanced accuracy")
ORACLE_DEFINITION = (
    "oracle = the same score from peak accuracies (the best test accuracy over epochs, chosen with the test "
    "labels): optimistic, for comparison with earlier certificates and papers that report peaks"
)
_ACC_FIELDS = ("acc", "final_acc", "peak_acc", "train_acc")
#: The certificate field holding each score metric at the selected epoch, and its oracle peak.
SCORE_FIELD = {"accuracy": "acc", "balanced_accuracy": "balanced_acc"}
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


def score(reference: float | None, protected: float | None, chance: float) -> float | None:
    """``(reference - protected) / (reference - chance)``; None without a reference or when it is
    not above chance (then nothing can be taken away)."""
    if reference is None or protected is None or reference - chance <= 1e-9:
        return None
    return (reference - protected) / (reference - chance)


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


def _selected(run: CellResult, metric: str) -> float | None:
    return run.balanced_acc if metric == "balanced_accuracy" else run.acc


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"score metric must be one of {METRICS}, got {metric!r}")


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    if not values or any(v is None for v in values):
        return None, None
    return _r(statistics.fmean(values)), _r(_std(values))  # type: ignore[arg-type]


def summarize_runs(runs: Sequence[CellResult], cached: Sequence[bool] | None = None) -> dict:
    """Mean (and ``*_std``) of the accuracy fields over seeds, the mean curves, and per-seed values."""
    if not runs:
        raise ValueError("summarize_runs needs at least one run")
    out: dict[str, Any] = {}
    for f in (*_ACC_FIELDS, *_EXTRA_FIELDS):
        out[f], out[f + "_std"] = _mean_std([getattr(r, f) for r in runs])
    length = min(len(r.curve) for r in runs)
    out["curve"] = _mean_curve([r.curve for r in runs], length) or []
    if len(runs) > 1:
        out["curve_std"] = [None if any(r.curve[i] is None for r in runs) else _r(_std([r.curve[i] for r in runs]))
                            for i in range(length)]
    one = len(runs) == 1
    out["selected_epoch"] = runs[0].selected_epoch if one else [r.selected_epoch for r in runs]
    out["peak_epoch"] = runs[0].peak_epoch if one else [r.peak_epoch for r in runs]
    out["epochs_trained"] = runs[0].epochs if one else [r.epochs for r in runs]
    out["selection"] = runs[0].selection
    out["n_val"] = runs[0].n_val
    out["val_curve"] = _mean_curve([r.val_curve for r in runs], min(len(r.val_curve) for r in runs))
    out["val_curve_balanced_acc"] = _mean_curve([r.val_curve_balanced for r in runs],
                                                min(len(r.val_curve_balanced) for r in runs))
    out["curve_balanced_acc"] = _mean_curve([r.curve_balanced for r in runs], length)
    out["curve_auc"] = _mean_curve([r.curve_auc for r in runs], length)
    fired = [r.guard_fired_epoch for r in runs if r.guard_fired_epoch is not None]
    if any(r.guard_pgd_acc for r in runs):
        out["overfitting_guard"] = {"fired_epochs": fired, "fired": bool(fired),
                                    "restored_epochs": [r.guard_restored_epoch for r in runs
                                                        if r.guard_fired_epoch is not None],
                                    "every": max((r.guard_every or 1) for r in runs)}
    out["wall_s"] = _r(sum(r.wall_s for r in runs), 2)
    # seeds whose chosen epoch scored renamed answers (verify.train.CellResult): the model learned
    # the classes under each other's names
    out["answers_remapped"] = sum(r.answer_map is not None for r in runs)
    # seeds whose chosen epoch answered at a threshold read off the validation images (two classes)
    out["answers_thresholded"] = sum(r.threshold is not None for r in runs)
    # seeds whose chosen epoch answered with per-class offsets read off the validation images
    out["answers_offset"] = sum(r.offsets is not None for r in runs)
    # seeds whose read answers scored higher on the test set than the model's own (and were kept)
    out["answers_read"] = sum(r.read_score is not None and r.own_score is not None and r.read_score > r.own_score
                              for r in runs)
    out["per_seed"] = []
    for i, r in enumerate(runs):
        entry = {
            "seed": r.seed, "acc": _r(r.acc), "balanced_acc": _r(r.balanced_acc), "auc": _r(r.auc),
            "selected_epoch": r.selected_epoch, "final_acc": _r(r.final_acc), "peak_acc": _r(r.peak_acc),
            "peak_epoch": r.peak_epoch, "epochs": r.epochs,
            "train_acc": _r(r.train_acc), "train_loss": _r(r.train_loss), "curve": [_r(a) for a in r.curve],
            "curve_n": list(r.curve_n), "val_curve": [_r(a) for a in r.val_curve], "n_val": r.n_val,
            "wall_s": _r(r.wall_s, 2),
            "epoch_s": [_r(s, 2) for s in r.epoch_s], "n_train": r.n_train, "n_test": r.n_test, "device": r.device,
            "final_balanced_acc": _r(r.final_balanced_acc), "peak_balanced_acc": _r(r.peak_balanced_acc),
            "peak_balanced_epoch": r.peak_balanced_epoch, "final_auc": _r(r.final_auc), "peak_auc": _r(r.peak_auc),
            "curve_balanced_acc": [_r(a) for a in r.curve_balanced] if r.curve_balanced else None,
            "curve_auc": [_r(a) for a in r.curve_auc] if r.curve_auc else None,
            "guard_pgd_acc": [_r(a) for a in r.guard_pgd_acc] or None, "guard_fired_epoch": r.guard_fired_epoch,
            "guard_fgsm_acc": [_r(a) for a in r.guard_fgsm_acc] or None,
            "guard_restored_epoch": r.guard_restored_epoch, "guard_every": r.guard_every,
            "answer_map": r.answer_map, "remapped_epochs": r.remapped_epochs,
            "threshold": _r(r.threshold), "thresholded_epochs": r.thresholded_epochs,
            "offsets": None if r.offsets is None else [_r(v) for v in r.offsets], "offset_epochs": r.offset_epochs,
            "own_score": _r(r.own_score), "read_score": _r(r.read_score),
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
    """One grid cell: protected runs (one per seed), the clean baseline runs of the same regime
    (same seeds) or None, and the cell's ``effect`` against them. ``metric`` (``"accuracy"`` or
    ``"balanced_accuracy"``) is what the effect compares, against ``chance`` (that metric's chance
    level); the cell records it as ``score_metric``."""
    _check_metric(metric)
    field_ = SCORE_FIELD[metric]
    cell: dict[str, Any] = {"training": training, "defense": defense, "protected": summarize_runs(protected),
                            "score_metric": metric}
    if clean:
        c = summarize_runs(clean, clean_cached)
        c["defense"] = baseline_defense or defense
        cell["clean"] = c
        cell["effect"] = _r(score(c[field_], cell["protected"][field_], chance))
        by_seed = {r.seed: r for r in clean}
        per_seed = [score(_selected(by_seed[p.seed], metric), _selected(p, metric), chance)
                    for p in protected if p.seed in by_seed]
        per_seed_ok = [s for s in per_seed if s is not None]
        if len(protected) > 1 and len(per_seed_ok) == len(per_seed):
            cell["effect_per_seed"] = [_r(s) for s in per_seed_ok]
            cell["effect_std"] = _r(_std(per_seed_ok))
        if c["acc"] is not None and cell["protected"]["acc"] is not None:
            cell["accuracy_drop"] = _r(c["acc"] - cell["protected"]["acc"])
        if c["balanced_acc"] is not None and cell["protected"]["balanced_acc"] is not None:
            cell["balanced_accuracy_drop"] = _r(c["balanced_acc"] - cell["protected"]["balanced_acc"])
    else:
        cell["effect"] = None
    if extra:
        cell.update(extra)
    return cell


def _cells_metric(cells: Sequence[dict]) -> str:
    """The score metric the cells were scored with (``"accuracy"`` for cells of older versions)."""
    metrics = {c.get("score_metric", "accuracy") for c in cells}
    if len(metrics) > 1:
        raise RecordError(f"cells scored with different metrics: {sorted(metrics)}")
    return metrics.pop() if metrics else "accuracy"


def reference_of(cells: Sequence[dict]) -> dict | None:
    """The clean ERM reference among the cells' baselines: the clean run of an ``erm`` cell trained
    without a defense (None when no such baseline was trained)."""
    for c in cells:
        clean = c.get("clean")
        if c["training"] == "erm" and clean and clean.get("defense", c["defense"]) == "none":
            return clean
    return None


_RUN_KEYS = ("acc", "acc_std", "balanced_acc", "auc", "selected_epoch", "peak_acc", "peak_acc_std", "final_acc",
             "peak_balanced_acc", "final_balanced_acc", "peak_auc", "final_auc")


def verdict(cells: Sequence[dict], chance: float, score_chance: float | None = None,
            reference: dict | None = None, interval: tuple[float, float] | None = None,
            interval_definition: str | None = None) -> dict:
    """The headline score of the grid (see the module doc).

    ``cells``: :func:`cell_entry` cells; ``reference``: the clean ERM reference run summary
    (:func:`summarize_runs`; default :func:`reference_of` the cells); ``chance``: the accuracy
    chance (majority-class rate); ``score_chance``: the score metric's chance (default ``chance``);
    ``interval``: the headline score's 95 % interval (:func:`verify.uncertainty.bootstrap_interval`).
    The best attacker is the cell with the highest protected score metric (the first in grid order
    on ties); the smallest effect the cell with the lowest ``effect``."""
    if not cells:
        raise RecordError("a certificate needs at least one cell")
    metric = _cells_metric(cells)
    field_, peak = SCORE_FIELD[metric], PEAK_FIELD[metric]
    s_chance = chance if score_chance is None else score_chance
    best = max(cells, key=lambda c: c["protected"][field_] if c["protected"].get(field_) is not None else -1.0)
    ref = reference if reference is not None else reference_of(cells)
    attacker = {"training": best["training"], "defense": best["defense"],
                **{k: best["protected"].get(k) for k in _RUN_KEYS}, "effect": best.get("effect")}
    if best.get("attacker"):  # the whole attacker: learner, regime, defense, resolution
        attacker["attacker"] = best["attacker"]
    out: dict[str, Any] = {"score": None, "interval": None, "conclusive": False, "inconclusive_reason": None,
                           "best_attacker": attacker}
    if ref is not None:
        out["reference"] = {"training": "erm", "defense": "none", **{k: ref.get(k) for k in _RUN_KEYS}}
        out["score"] = _r(score(ref.get(field_), best["protected"].get(field_), s_chance))
        best_peak = max((c["protected"].get(peak) for c in cells if c["protected"].get(peak) is not None), default=None)
        out["oracle"] = {"score": _r(score(ref.get(peak), best_peak, s_chance)), "definition": ORACLE_DEFINITION}
        if ref.get("acc") is not None and best["protected"].get("acc") is not None:
            out["accuracy_drop"] = _r(ref["acc"] - best["protected"]["acc"])
        if ref.get("balanced_acc") is not None and best["protected"].get("balanced_acc") is not None:
            out["balanced_accuracy_drop"] = _r(ref["balanced_acc"] - best["protected"]["balanced_acc"])
    if interval is not None and out["score"] is not None:
        out["interval"] = [_r(interval[0]), _r(interval[1])]
        out["interval_definition"] = interval_definition
    if out["score"] is None:
        out["inconclusive_reason"] = ("no clean reference was trained (--clean)" if ref is None else
                                      "the clean reference is not above chance")
    elif ref.get(field_) - s_chance < WEAK_BASELINE_MARGIN:  # type: ignore[union-attr,operator]
        out["inconclusive_reason"] = (f"the clean reference ({100 * ref[field_]:.1f}%) is within "  # type: ignore[index]
                                      f"{100 * WEAK_BASELINE_MARGIN:.0f} points of chance: too little signal")
    elif out["interval"] is not None and out["interval"][0] <= 0 <= out["interval"][1]:
        out["inconclusive_reason"] = "the 95 % interval of the score contains 0: no protection can be shown"
    out["conclusive"] = out["inconclusive_reason"] is None
    scored = [c for c in cells if c.get("effect") is not None]
    small = min(scored, key=lambda c: c["effect"]) if scored else best
    out["smallest_effect"] = {"training": small["training"], "defense": small["defense"],
                              "acc": small["protected"].get("acc"),
                              "balanced_acc": small["protected"].get("balanced_acc"),
                              "effect": small.get("effect")}
    out["chance"] = _r(chance)
    out["score_metric"] = metric
    out["score_chance"] = _r(s_chance)
    out["rule"] = BALANCED_VERDICT_RULE if metric == "balanced_accuracy" else VERDICT_RULE
    out["summary"] = verdict_sentence(out)
    return out


def verdict_sentence(v: dict) -> str:
    """The verdict in one sentence (used in report.md and by the CLI)."""
    b = v["best_attacker"]
    ref = v.get("reference") or {}
    who = f"{b['training']} training with defense {b['defense']}"
    res = (b.get("attacker") or {}).get("resolution")
    if res and res != "native":
        who += f" at {res} px"
    if v.get("score_metric") == "balanced_accuracy" and b.get("balanced_acc") is not None:
        what, got, base = "balanced accuracy", b["balanced_acc"], ref.get("balanced_acc")
        chance = (f"chance {100 * v['score_chance']:.1f}% = 1/K for balanced accuracy on this imbalanced "
                  f"test set; plain accuracy {100 * b['acc']:.1f}%")
    else:
        what, got, base = "accuracy", b["acc"], ref.get("acc")
        chance = f"chance {100 * v['chance']:.1f}%"
    if v.get("score") is None:
        return (f"The best attacker ({who}) reached {100 * got:.1f}% clean-test {what} ({chance}); "
                f"{v.get('inconclusive_reason')}, so no protection score.")
    ci = v.get("interval")
    ci_text = f" (95% interval {ci[0]:.2f} to {ci[1]:.2f})" if ci else ""
    head = "Inconclusive: protection score" if not v.get("conclusive") else "Protection score"
    text = (f"{head} {v['score']:.2f}{ci_text}: the best attacker ({who}) reached {100 * got:.1f}% clean-test "
            f"{what} against {100 * base:.1f}% for plain training on the clean images ({chance}).")
    if not v.get("conclusive") and v.get("inconclusive_reason"):
        text += f" {v['inconclusive_reason'][0].upper()}{v['inconclusive_reason'][1:]}."
    return text


def _learner_info(name: str) -> dict:
    from .learners import learner_info

    return learner_info(name)


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
    reference: dict | None = None,
    interval: tuple[float, float] | None = None,
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
    over the classes present in the test counts for balanced accuracy). ``reference``: the clean
    ERM reference (:func:`summarize_runs`; default: found among the cells' baselines);
    ``interval``: the headline score's 95 % interval.
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
            {"name": t.name, "norm": t.norm, "eps": t.eps, "description": t.describe(), "attack": recipe.attack(t),
             **({"eps_reference": t.eps_reference, "eps_reference_shape": [3, 32, 32]}
                if t.eps_reference is not None else {}),
             **({"learner": _learner_info(t.learner)} if t.learner is not None else {})}
            for t in trainings
        ],
        "defenses": [
            {"name": getattr(d, "name", d), "static": getattr(d, "static", None), "source": getattr(d, "source", None),
             "differences": list(getattr(d, "differences", ()) or ())}
            for d in defenses
        ],
        "baseline_per_defense": bool(baseline_per_defense),
        "recipe": recipe.to_dict(),
        "score_definition": BALANCED_SCORE_DEFINITION if metric == "balanced_accuracy" else SCORE_DEFINITION,
        "effect_definition": EFFECT_DEFINITION,
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
    from .uncertainty import BOOTSTRAP_REPLICATES, INTERVAL_DEFINITION

    cert["verdict"] = verdict(cert["cells"], chance, score_chance, reference=reference, interval=interval,
                              interval_definition=INTERVAL_DEFINITION.format(n=BOOTSTRAP_REPLICATES))
    cert["warnings"] = certificate_warnings(cert["cells"], score_chance, metric, model=recipe.at_model or recipe.model)
    return cert


#: A clean baseline less than this far above chance carries too little signal for a score.
WEAK_BASELINE_MARGIN = 0.10
#: Models too small for a meaningful adversarial-training attacker (their clean AT accuracy is capped).
SMALL_AT_MODELS = ("fastcnn",)


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
                   "ERM): it bounds what such an attacker can show; the quick tier's own AT learner (fastcnn_wide, "
                   "40 epochs: 61.3%) is used unless --model is given; or use --tier standard (ResNet-18, PGD-10)")
    peak = SCORE_FIELD[metric]
    what = "balanced accuracy " if metric == "balanced_accuracy" else ""
    seen: set[tuple[str, str]] = set()
    for c in cells:
        if c["protected"].get(peak) is None or (c.get("clean") and c["clean"].get(peak) is None):
            out.append(f"cell {c['training']}/{c['defense']} has no {metric.replace('_', ' ')} (trained by an "
                       "older version): no effect; rerun with --fresh")
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
            f"(chance {100 * chance:.1f}%): too little signal for a protection effect; train longer "
            f"(--epochs) or on more images"
        )
    return out
