"""Honest uncertainty: the validation split that chooses each cell's epoch, and intervals.

**Validation split** (:func:`split_validation`). Choosing a cell's epoch with the test labels (the
*peak*) is optimistic: a model that learned nothing still peaks above chance on a small test set
by luck (a simulation of 75 epochs on a 156-image test set: a mean peak balanced accuracy of 0.61
for a chance-level model). So a keyed, stratified fraction of the test images (20 %, at least one
per class that has two) chooses the epoch and the rest is what every number is measured on. The
split depends only on the test set's labels and a fixed label, so every cell and every run of the
same test set uses the same split; ``--val DIR`` gives a separate validation folder instead.

**Intervals** (:func:`bootstrap_interval`). The headline score is a function of the test images
and of the training seeds. Its 95 % interval is a percentile bootstrap: each replicate draws the
test images again with replacement within each class (class counts kept, so balanced accuracy and
chance stay defined) and, with several seeds, the seeds with replacement; it recomputes every
cell's score metric from the stored predictions of the selected epoch, the best protected cell,
the clean reference and the score. The best attacker is re-chosen in every replicate, so the
interval includes the luck of which cell came out best.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from .data import TensorSet

__all__ = ["BOOTSTRAP_REPLICATES", "VAL_FRACTION", "bootstrap_interval", "bootstrap_min_interval", "split_holdout",
           "split_validation"]

#: Fraction of the test images that chooses the epoch when no validation folder is given.
VAL_FRACTION = 0.2
#: Bootstrap replicates for the 95 % interval of the headline score.
BOOTSTRAP_REPLICATES = 1000
INTERVAL_DEFINITION = (
    "95 % percentile bootstrap interval of the headline score: {n} replicates, each drawing the test images "
    "again with replacement within each class (and the seeds with replacement when there are several), "
    "re-choosing the best protected cell and recomputing the score"
)


def _seed(label: str) -> int:
    return int.from_bytes(hashlib.sha256(f"protect.verify/{label}".encode()).digest()[:8], "little") >> 1


def split_validation(test: TensorSet, fraction: float = VAL_FRACTION) -> tuple[TensorSet, TensorSet]:
    """``(validation, test part)``: a keyed, stratified ``fraction`` of each class of ``test`` (rounded,
    at least 1 of a class with 2 or more images, never all of a class) and the rest. The same test
    set always gives the same split."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must lie in (0, 1), got {fraction}")
    g = torch.Generator().manual_seed(_seed(f"val-split/{test.content_id}"))  # the same at every resolution
    val_idx: list[int] = []
    for k in range(test.num_classes):
        members = (test.y == k).nonzero().flatten()
        m = members.numel()
        if m < 2:
            continue
        take = min(m - 1, max(1, round(fraction * m)))
        val_idx += members[torch.randperm(m, generator=g)[:take]].tolist()
    chosen = torch.zeros(len(test), dtype=torch.bool)
    chosen[torch.tensor(val_idx, dtype=torch.int64)] = True
    return test.subset(chosen.nonzero().flatten()), test.subset((~chosen).nonzero().flatten())


def _stem(rel: str) -> str:
    """``"cat/img1.jpg"`` -> ``"cat/img1"``: an image's path without its extension."""
    head, _, name = rel.rpartition("/")
    base = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    return f"{head}/{base}" if head else base


def split_holdout(clean: TensorSet, protected: TensorSet, fraction: float) -> tuple[TensorSet, TensorSet, TensorSet, dict]:
    """``(clean training, protected training, test, info)``: a keyed, stratified ``fraction`` of
    each class of ``clean`` (rounded, at least 1 of a class with 2 or more images, never all of it)
    becomes the test set, and those images (matched by path without extension) leave both training
    sets. ``info``: what the certificate records. ValueError for a fraction outside (0, 1)."""
    if not 0 < fraction < 1:
        raise ValueError(f"--holdout must lie in (0, 1), e.g. 0.2; got {fraction}")
    if not clean.rels or not protected.rels:
        raise ValueError("--holdout needs the images' paths (folders loaded with load_folder)")
    test_idx: list[int] = []
    for k in range(clean.num_classes):
        members = (clean.y == k).nonzero().flatten().tolist()
        m = len(members)
        if m < 2:
            continue
        take = min(m - 1, max(1, round(fraction * m)))
        ranked = sorted(members, key=lambda i: hashlib.sha256(f"protect.holdout/{_stem(clean.rels[i])}".encode()).digest())
        test_idx += ranked[:take]
    held = {_stem(clean.rels[i]) for i in test_idx}
    chosen = torch.zeros(len(clean), dtype=torch.bool)
    chosen[torch.tensor(sorted(test_idx), dtype=torch.int64)] = True
    keep_p = [i for i, r in enumerate(protected.rels) if _stem(r) not in held]
    info = {"fraction": fraction, "test_images": len(test_idx), "clean_training": len(clean) - len(test_idx),
            "protected_removed": len(protected) - len(keep_p), "protected_training": len(keep_p),
            "matched_by": "path without extension"}
    return (clean.subset((~chosen).nonzero().flatten()), protected.subset(keep_p),
            clean.subset(chosen.nonzero().flatten()), info)


def _metric_values(pred: np.ndarray, y: np.ndarray, weights: np.ndarray, metric: str, k: int) -> np.ndarray:
    """The metric for each replicate: ``pred`` (n,) predictions, ``weights`` (B, n) multiplicities."""
    hit = (pred == y).astype(np.float64)
    if metric == "accuracy":
        return weights @ hit / weights.sum(1)
    recalls = []
    for c in range(k):
        members = y == c
        if not members.any():
            continue
        w = weights[:, members]
        recalls.append(w @ hit[members] / w.sum(1))
    return np.mean(recalls, axis=0)


def bootstrap_interval(
    reference: Sequence[Sequence[int]],
    cells: Sequence[Sequence[Sequence[int]]],
    y: Sequence[int],
    metric: str,
    chance: float,
    replicates: int = BOOTSTRAP_REPLICATES,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """95 % interval of ``(reference - best cell) / (reference - chance)``.

    ``reference``: the clean reference's test predictions, one list per seed; ``cells``: per
    protected cell, its predictions per seed (the same seeds, same order); ``y``: the test labels;
    ``metric``: ``"accuracy"`` or ``"balanced_accuracy"``. Replicates where the reference is not
    above chance count as a score of 0 (no protection can be shown). None when any predictions are
    missing (results of older versions) or have the wrong length."""
    return bootstrap_min_interval([(reference, cells)], y, metric, chance, replicates, level)


def bootstrap_min_interval(
    groups: Sequence[tuple[Sequence[Sequence[int]], Sequence[Sequence[Sequence[int]]]]],
    y: Sequence[int],
    metric: str,
    chance: float,
    replicates: int = BOOTSTRAP_REPLICATES,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """95 % interval of the lowest of several scores measured on the same test images: ``groups``
    holds one ``(reference, cells)`` pair per attacker resolution (as :func:`bootstrap_interval`'s
    arguments, every prediction list in the order of ``y``). Every replicate draws one resample of
    the test images (and of the seeds) and applies it to every group, so the interval is of the
    headline itself, the minimum over groups, not a minimum of separate intervals. None when any
    predictions are missing or have the wrong length."""
    labels = np.asarray(y, dtype=np.int64)
    n = labels.shape[0]
    if n == 0 or not groups:
        return None
    seeds = len(groups[0][0])
    for reference, cells in groups:
        runs = [reference, *cells]
        if not reference or not cells or any(len(r) != seeds for r in runs) or any(len(p) != n for r in runs for p in r):
            return None
    k = int(labels.max()) + 1
    label = f"bootstrap/{n}/{len(groups[0][1])}/{seeds}" if len(groups) == 1 else \
        f"bootstrap/{n}/{'+'.join(str(len(c)) for _, c in groups)}/{seeds}"
    rng = np.random.default_rng(_seed(label))
    # multiplicities of a stratified resample: per class, multinomial over its members
    weights = np.zeros((replicates, n), dtype=np.float32)
    for c in range(k):
        members = np.flatnonzero(labels == c)
        if members.size:
            weights[:, members] = rng.multinomial(members.size, np.full(members.size, 1 / members.size), size=replicates)
    pick = rng.integers(0, seeds, size=(replicates, seeds)) if seeds > 1 else np.zeros((replicates, 1), dtype=np.int64)

    def value(per_seed: Sequence[Sequence[int]]) -> np.ndarray:
        by_seed = np.stack([_metric_values(np.asarray(p), labels, weights, metric, k) for p in per_seed])  # S x B
        return by_seed[pick, np.arange(replicates)[:, None]].mean(1)

    per_group = []
    for reference, cells in groups:
        ref = value(reference)
        best = np.max(np.stack([value(c) for c in cells]), axis=0)
        margin = ref - chance
        per_group.append(np.where(margin > 1e-9, (ref - best) / np.where(margin > 1e-9, margin, 1.0), 0.0))
    scores = np.min(np.stack(per_group), axis=0)
    lo, hi = np.quantile(scores, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)
