"""Human-readable views of a certificate: ``report.md``, ``curves.png`` and ``samples.png``.

* ``report.md``: the tier/model/epochs line, the attacker's labels when remapped (``--relabel``),
  the verdict in one sentence (the headline score against the clean ERM reference, its interval, or
  "inconclusive"), the reference, the best attacker and the cell with the smallest effect, the
  regime x defense table (the protected score metric at the validation-chosen epoch with the clean
  baseline of the same regime beside it, and the cell's effect), then per-cell details (accuracy,
  balanced accuracy and macro AUC at the chosen epoch, the oracle peak) and the settings that
  produced the numbers.
* ``curves.png``: one panel per cell, the validation score metric (accuracy, or balanced accuracy
  on an imbalanced test set) per epoch, clean baseline vs protected, the chosen epochs marked.

Certificates written before balanced accuracy and AUC existed render with "n/a" in those columns.
* ``samples.png``: a few images as clean / protected / amplified difference (matplotlib, Agg).

Matplotlib is used through :class:`matplotlib.figure.Figure` with the Agg canvas, so no global
pyplot state or display is touched.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from .data import TensorSet

__all__ = ["plot_curves", "plot_samples", "report_markdown", "write_report"]

log = logging.getLogger(__name__)


def _pct(x: float | None, std: float | None = None) -> str:
    if x is None:
        return "n/a"
    s = f"{100 * x:.1f}%"
    if std:
        s = f"{100 * x:.1f} ± {100 * std:.1f}%"
    return s


def _score(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _auc(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _balanced(cert: dict) -> bool:
    """Whether the score uses balanced accuracy (absent in older certificates: accuracy)."""
    return cert.get("score_metric") == "balanced_accuracy"


def _row(c: dict, multi: bool) -> str:
    """A cell's row name: its training, and its attacker resolution when there are several."""
    if not multi:
        return c["training"]
    res = (c.get("attacker") or {}).get("resolution", "native")
    return f"{c['training']} @ {res}" + ("" if res == "native" else " px")


def _multi(cert: dict) -> bool:
    return len(cert.get("resolutions") or ()) > 1


def _cell_lookup(cert: dict) -> tuple[list[str], list[str], dict[tuple[str, str], dict]]:
    """Rows (trainings, one per attacker resolution when there are several), defenses, and the cells by both."""
    trainings: list[str] = []
    defenses: list[str] = []
    cells: dict[tuple[str, str], dict] = {}
    multi = _multi(cert)
    for c in cert["cells"]:
        row = _row(c, multi)
        if row not in trainings:
            trainings.append(row)
        if c["defense"] not in defenses:
            defenses.append(c["defense"])
        cells[(row, c["defense"])] = c
    return trainings, defenses, cells


def _tier_line(cert: dict) -> str:
    recipe = cert.get("recipe", {})
    seeds = cert.get("seeds", [])
    parts = [f"Tier **{cert['tier']}**", f"model {cert['model']}", f"{cert['epochs']} epochs",
             f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))})"]
    if recipe:
        parts.append(f"batch {recipe.get('batch_size')}, {recipe.get('schedule')} LR (peak {recipe.get('lr')})")
    if cert.get("fast_at"):
        parts.append("adversarial training is **fast AT** (FGSM with random start, Wong et al. 2020), not PGD")
    elif any(t.get("norm") for t in cert.get("trainings", [])):
        steps = recipe.get("pgd_steps")
        text = f"adversarial training is PGD-{steps}" if steps else "adversarial training is PGD"
        if recipe.get("attack_eval_mode"):
            text += " with the model in eval mode"
        parts.append(text)
    if recipe.get("grad_clip"):
        parts.append(f"gradients clipped to norm {recipe['grad_clip']:g}")
    return "; ".join(parts) + "."


def _chance_sentence(cert: dict) -> str:
    text = f"Chance is {_pct(cert.get('chance'))}: the majority-class rate of the test set"
    if cert.get("chance_class"):
        text += f" (always answering '{cert['chance_class']}')"
    text += "."
    if _balanced(cert):
        text += (f" The test set is imbalanced, so the score uses **balanced accuracy** (mean per-class recall), "
                 f"whose chance is {_pct(cert.get('score_chance'))} (1/K: any constant answer).")
    return text


def _labels_sentence(cert: dict) -> str | None:
    """The attacker's labelling in one paragraph, when it is not the data's own (``--relabel``)."""
    lab = cert.get("labelling") or {}
    if lab.get("attacker") != "remapped":
        return None
    src = lab.get("source") or {}
    if src.get("kind") == "file":
        origin = f"the map file {src.get('path')} (sha256 {str(src.get('sha256'))[:16]}…)"
    elif src.get("kind") == "random":
        origin = f"a random grouping, {src.get('spec')} with seed {src.get('seed')}"
    else:
        origin = "a map given in code"
    groups = "; ".join(f"{a} ← {', '.join(members)}" for a, members in (lab.get("groups") or {}).items())
    classes = lab.get("classes") or []
    return (f"**Attacker labels.** The attacker trained and was scored on {len(classes)} remapped classes "
            f"({', '.join(classes)}), not the data's {len(lab.get('data_classes') or [])}, from {origin}: "
            f"{groups}. Baselines, chance and scores use these labels.")


def report_markdown(cert: dict) -> str:
    """The Markdown report for ``cert`` (see module doc)."""
    trainings, defenses, cells = _cell_lookup(cert)
    v = cert["verdict"]
    lines = ["# Unlearnability verification", "", _tier_line(cert), ""]
    labels = _labels_sentence(cert)
    if labels:
        lines += [labels, ""]
    lines += ["**Verdict.** " + v.get("summary", ""), ""]
    if v.get("per_resolution"):
        lines += ["| attacker resolution | score (95 % interval) | best attacker | its accuracy | clean reference |",
                  "| --- | --- | --- | --- | --- |"]
        for p in v["per_resolution"]:
            b = p.get("best_attacker") or {}
            ci = p.get("interval")
            score_text = _score(p.get("score")) + (f" ({ci[0]:.2f} to {ci[1]:.2f})" if ci else "")
            if p.get("excluded"):
                score_text += f"; left out: {p['excluded']}"
            key = "balanced_acc" if _balanced(cert) else "acc"
            ref = p.get("reference_balanced") if _balanced(cert) else p.get("reference")
            res = p["resolution"] + ("" if p["resolution"] == "native" else " px")
            lines.append(f"| {res}{' (headline)' if p['resolution'] == v.get('resolution') else ''} | {score_text} | "
                         f"{b.get('training')} / {b.get('defense')} | {_pct(b.get(key))} | {_pct(ref)} |")
        lines.append("")
    for warning in cert.get("warnings", []):
        lines += [f"**Warning:** {warning}.", ""]
    balanced = _balanced(cert)
    field = "balanced_acc" if balanced else "acc"
    what = "balanced accuracy" if balanced else "accuracy"
    ref = v.get("reference")
    if ref:
        lines += [f"**Reference:** plain training (ERM, no defense) on the clean images: {_pct(ref.get(field))}.", ""]
    b = v.get("best_attacker") or {}
    if b:
        lines += [f"**Best attacker:** {b['training']} / {b['defense']}: {_pct(b.get(field))} (effect "
                  f"{_score(b.get('effect'))}).", ""]
    w = v.get("smallest_effect")
    if w and w.get("effect") is not None:
        lines += [f"**Smallest effect:** {w['training']} / {w['defense']}: protected {_pct(w.get(field))}, effect "
                  f"{_score(w['effect'])} (against clean data under the same regime: the protection does least "
                  "there).", ""]
    oracle = (v.get("oracle") or {}).get("score")
    if oracle is not None:
        lines += [f"Oracle score (epochs chosen with the test labels, optimistic): {_score(oracle)}.", ""]
    lines += [
        (f"Each entry: clean-test {what} of a model trained on the **protected** data, at the epoch chosen on the "
         "validation images; the clean baseline under the same regime in brackets, and the cell's effect "
         "(clean - protected) / (clean - chance) (1 = chance, 0 = no protection). "
         f"{_chance_sentence(cert)}"),
        "",
        "| training \\ defense | " + " | ".join(defenses) + " |",
        "| --- | " + " | ".join("---" for _ in defenses) + " |",
    ]
    for t in trainings:
        row = [t]
        for d in defenses:
            c = cells.get((t, d))
            if c is None:
                row.append("")
                continue
            p = c["protected"]
            text = _pct(p.get(field), p.get(field + "_std"))
            if "clean" in c:
                text += f" (clean {_pct(c['clean'].get(field), c['clean'].get(field + '_std'))}) · {_score(c.get('effect'))}"
            row.append(text)
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Cells", "",
              ("| training | defense | learner | protected | chosen epoch | oracle peak | final | train acc (protected) "
               "| protected balanced | protected AUC | clean | clean balanced | clean AUC | effect | wall s |"),
              "| " + " | ".join(["---"] * 15) + " |"]
    for c in cert["cells"]:
        p, k = c["protected"], c.get("clean") or {}
        wall = p.get("wall_s") or 0.0
        epoch = p.get("selected_epoch")
        lines.append("| " + " | ".join([
            _row(c, _multi(cert)), c["defense"], (c.get("attacker") or {}).get("learner", ""),
            _pct(p.get("acc"), p.get("acc_std")),
            "" if epoch is None else (str(epoch) if isinstance(epoch, int) else "/".join(map(str, epoch))),
            _pct(p["peak_acc"], p.get("peak_acc_std")), _pct(p["final_acc"], p.get("final_acc_std")),
            _pct(p.get("train_acc")), _pct(p.get("balanced_acc"), p.get("balanced_acc_std")), _auc(p.get("auc")),
            _pct(k.get("acc")), _pct(k.get("balanced_acc")), _auc(k.get("auc")), _score(c.get("effect")),
            f"{wall:.0f}",
        ]) + " |")
        guard = p.get("overfitting_guard") or {}
        if guard.get("fired"):
            back = guard.get("restored_epochs")
            lines.append(f"|  | ↳ catastrophic overfitting guard fired by epoch(s) {guard['fired_epochs']}: "
                         + (f"back to epoch(s) {back}" if back and None not in back else "back to the last check")
                         + ", the rest trained with PGD-2 |" + " |" * 13)
        seeds = p.get("per_seed") or []
        kept = [e for e in seeds if e.get("read_score") is not None and e.get("own_score") is not None
                and e["read_score"] > e["own_score"]]
        if kept:  # the attacker's reading of the protected model's answers beat its own
            kinds = sorted({"a decision threshold" if e.get("threshold") is not None else
                            "per-class offsets" if e.get("offsets") is not None else "renamed answers" for e in kept})
            lines.append(f"|  | ↳ protected: {' and '.join(kinds)} read off the validation images scored higher "
                         f"than the model's own answers in {len(kept)} of {len(seeds) or 1} seed(s) |" + " |" * 13)
    lines += ["", ("Balanced accuracy: mean per-class recall over the classes in the test set. AUC: macro "
                   "one-vs-rest ROC AUC from the softmax scores (2 classes: the AUC of the second class), "
                   "over the classes with positives and negatives in the test set.")]
    lines += ["", "## Settings", ""]
    if cert.get("score_definition"):
        lines.append(f"- Score: {cert['score_definition']}.")
    if cert.get("effect_definition"):
        lines.append(f"- Effect: {cert['effect_definition']}.")
    if v.get("interval_definition"):
        lines.append(f"- Interval: {v['interval_definition']}.")
    if cert.get("imbalance_rule"):
        lines.append(f"- Score metric: {cert.get('score_metric', 'accuracy').replace('_', ' ')}; "
                     f"{cert['imbalance_rule']}.")
    if v.get("rule"):
        lines.append(f"- Verdict rule: {v['rule']}.")
    recipe = cert.get("recipe")
    if recipe:
        lines.append("- Recipe: " + ", ".join(f"{k}={val}" for k, val in recipe.items() if k != "description"))
    for t in cert.get("trainings", []):
        a = t.get("attack") or {}
        if a:
            lines.append(f"- {t['name']}: {t.get('description')}; {a.get('method')} {a.get('steps')} step(s) of "
                         f"{a.get('step_size'):.4g}, random start ({a.get('source')})")
    for d in cert.get("defenses", []):
        if d.get("source"):
            lines.append(f"- defense {d['name']}: {d['source']}")
        for diff in d.get("differences") or []:
            lines.append(f"- defense {d['name']} differs from its reference: {diff}")
    data = cert.get("data", {})
    for role in ("train", "test", "validation", "clean"):
        if role in data:
            dd = data[role]
            lines.append(f"- {role} data: {dd.get('root')} ({dd.get('count')} images, sha256 {str(dd.get('sha256'))[:16]}…)")
    if cert.get("device"):
        lines.append(f"- Device: {cert['device']} ({cert.get('threads')} CPU threads); total wall time "
                     f"{cert.get('wall_s', 0):.0f} s")
    if cert.get("batchnorm") and cert["batchnorm"] != "single process":
        lines.append(f"- BatchNorm: {cert['batchnorm']}")
    resume = cert.get("resume") or {}
    if resume.get("reused"):
        lines.append(f"- Resumed: {resume['reused']} cell(s) reused from an earlier run of the same settings "
                     f"({resume.get('cells_dir')}), {resume.get('trained', 0)} trained in this run")
    ref = cert.get("reference")
    if ref:
        lines.append(f"- Reference recipe: {ref.get('source')}; differences: "
                     + ("; ".join(ref.get("differences") or []) or "none"))
    versions = cert.get("versions")
    if versions:
        lines.append("- Versions: " + ", ".join(f"{k} {val}" for k, val in versions.items() if val))
    lines.append("")
    return "\n".join(lines)


def plot_curves(cert: dict, path: str | os.PathLike) -> Path:
    """``curves.png``: one panel per cell, the score metric per epoch (accuracy, or balanced accuracy
    when the certificate scores with it), clean (blue) vs protected (red), chance dotted."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    trainings, defenses, cells = _cell_lookup(cert)
    rows, cols = len(trainings), len(defenses)
    fig = Figure(figsize=(3.2 * cols + 0.5, 2.6 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    balanced = _balanced(cert)
    curve_key = "val_curve_balanced_acc" if balanced else "val_curve"
    chance = cert.get("score_chance") if balanced else cert.get("chance")
    for i, t in enumerate(trainings):
        for j, d in enumerate(defenses):
            ax = axes[i][j]
            c = cells.get((t, d))
            if c is None:
                ax.set_axis_off()
                continue
            for key, colour, name in (("clean", "tab:blue", "clean"), ("protected", "tab:red", "protected")):
                run = c.get(key) or {}
                curve = run.get(curve_key) or run.get("curve_balanced_acc" if balanced else "curve")
                if curve:
                    ax.plot(range(1, len(curve) + 1), [math.nan if a is None else 100 * a for a in curve],
                            color=colour, marker="o", markersize=2.5, linewidth=1.3, label=name)
                    chosen = run.get("selected_epoch")
                    if isinstance(chosen, int) and 1 <= chosen <= len(curve) and curve[chosen - 1] is not None:
                        ax.plot([chosen], [100 * curve[chosen - 1]], color=colour, marker="*", markersize=9)
            if chance:
                ax.axhline(100 * chance, color="grey", linestyle=":", linewidth=1, label="chance")
            title = f"{t} / {d}"
            if c.get("effect") is not None:
                title += f"  (effect {c['effect']:.2f})"
            ax.set_title(title, fontsize=9)
            ax.set_ylim(0, 100)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if i == rows - 1:
                ax.set_xlabel("epoch")
            if j == 0:
                ax.set_ylabel("validation balanced acc (%)" if balanced else "validation acc (%)")
    axes[0][0].legend(fontsize=7, loc="best", title="* = chosen epoch", title_fontsize=7)
    fig.suptitle(f"{cert['tier']} tier, {cert['model']}, {cert['epochs']} epochs", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def _match(clean: TensorSet, protected: TensorSet, n: int) -> list[tuple[int, int]]:
    """Index pairs (clean, protected) of up to ``n`` images with the same relative path (spread
    over classes), else the same index."""
    pairs: list[tuple[int, int]] = []
    if clean.rels and protected.rels:
        where = {rel: i for i, rel in enumerate(clean.rels)}
        common = [(where[rel], j) for j, rel in enumerate(protected.rels) if rel in where]
        if common:
            by_class: dict[int, list[tuple[int, int]]] = {}
            for ci, pj in common:
                by_class.setdefault(int(protected.y[pj]), []).append((ci, pj))
            k = 0
            while len(pairs) < min(n, len(common)):
                for lst in by_class.values():
                    if k < len(lst) and len(pairs) < n:
                        pairs.append(lst[k])
                k += 1
            return pairs
    m = min(n, len(clean), len(protected))
    step = max(1, min(len(clean), len(protected)) // max(1, m))
    return [(i * step, i * step) for i in range(m)]


def plot_samples(clean: TensorSet, protected: TensorSet, path: str | os.PathLike, n: int = 8) -> Path:
    """``samples.png``: rows clean / protected / amplified difference for ``n`` images matched by
    relative path (or by index). The difference is ``0.5 + gain * (protected - clean)`` with one gain
    for the whole grid (printed in the row label) so that the largest change reaches the full range."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pairs = [(i, j) for i, j in _match(clean, protected, n) if clean.x[i].shape == protected.x[j].shape]
    if not pairs:
        raise ValueError("no clean/protected image pairs of equal size to show")
    a = np.stack([clean.x[i].permute(1, 2, 0).numpy() for i, _ in pairs]).astype(np.float32) / 255
    b = np.stack([protected.x[j].permute(1, 2, 0).numpy() for _, j in pairs]).astype(np.float32) / 255
    diff = b - a
    peak = float(np.abs(diff).max())
    gain = 0.5 / peak if peak > 0 else 1.0
    amp = np.clip(0.5 + gain * diff, 0, 1)
    # One mosaic image (3 rows x n columns, 2-px white gaps) drawn by a single imshow: fast.
    cols, (h, w, c) = len(pairs), a.shape[1:]
    gap = 2
    mosaic = np.ones((3 * h + 2 * gap, cols * w + (cols - 1) * gap, 3), dtype=np.float32)
    for r, imgs in enumerate((a, b, amp)):
        for k in range(cols):
            tile = imgs[k] if c == 3 else np.repeat(imgs[k], 3, axis=2)
            y0, x0 = r * (h + gap), k * (w + gap)
            mosaic[y0:y0 + h, x0:x0 + w] = tile
    scale = max(1.0, 96 / max(h, w))  # small images drawn at ~1 inch per tile
    fig = Figure(figsize=(cols * w * scale / 96 + 1.3, 3 * h * scale / 96 + 0.6))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((1.1 / (cols * w * scale / 96 + 1.3), 0.02, 1 - 1.15 / (cols * w * scale / 96 + 1.3), 0.88))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([(k + 0.5) * w + k * gap - 0.5 for k in range(cols)])
    ax.set_xticklabels([protected.classes[int(protected.y[j])] for _, j in pairs], fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks([(r + 0.5) * h + r * gap - 0.5 for r in range(3)])
    ax.set_yticklabels(["clean", "protected", f"diff x{gain:.0f}"], fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.suptitle(f"max |protected - clean| = {peak * 255:.0f}/255", fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def write_report(
    cert: dict,
    out_dir: str | os.PathLike,
    clean: TensorSet | None = None,
    protected: TensorSet | None = None,
) -> dict[str, Path]:
    """Write ``report.md``, ``curves.png`` and (given both sets) ``samples.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"report": out / "report.md"}
    files["report"].write_text(report_markdown(cert), encoding="utf-8")
    files["curves"] = plot_curves(cert, out / "curves.png")
    if clean is not None and protected is not None:
        try:
            files["samples"] = plot_samples(clean, protected, out / "samples.png")
        except ValueError as exc:
            log.warning("samples.png not written: %s", exc)
    return files
