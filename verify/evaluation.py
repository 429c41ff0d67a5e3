"""Scoring a model on the test set: accuracy, balanced accuracy and macro AUC in one pass.

One forward pass over the test images (eval mode, batched, under the caller's autocast) gives the
predicted labels (argmax of the logits, for accuracy and per-class recall) and the float32
log-odds of the softmax scores (for the AUC, :func:`verify.metrics.softmax_log_odds`). Under
``torchrun`` each process scores its shard and the results are summed, so every process returns the
numbers of the whole set.

**Remapped answers.** A model trained on a poison can learn the classes under each other's names:
class-targeted adversarial poisoning (Fowl et al., NeurIPS 2021) teaches the features of class
``y + 1`` under the label ``y``, so on clean images the model answers the wrong class consistently.
That is not protection: an attacker who holds a few labelled clean images sees it and renames the
answers. :func:`best_answer_map` is that attacker: the permutation of the model's answers that
scores best on labelled images (exhaustive up to :data:`EXACT_MAP_CLASSES` classes, greedy with
pairwise swaps above), used where the model's own answers are below chance and the renaming wins
by more than :data:`REMAP_MARGIN`, and :func:`remapped`
the result with the answers renamed (predictions and score columns permuted, so accuracy, balanced
accuracy and AUC all follow).

**Decision thresholds.** A two-class poison can also leave a model that answers one class for
everything, or ranks the classes the wrong way round, while its scores still order the images
(measured: chest X-rays under a class-targeted poison, balanced accuracy 0.50 at AUC 0.14). An
attacker with labelled images reads a threshold off them: :func:`best_threshold`, used where the
own answers are near chance, the AUC is far from 1/2 (more than :data:`REMAP_MARGIN` and
:data:`THRESHOLD_Z` null standard deviations) and the cut, scored on images it was not fitted
to (cross-fitting), wins by more than the margin. :func:`read_answers` reads a model's validation
answers either way; :func:`remapped` applies the rule to other images.

**Per-class offsets.** With more classes a poison can leave a model that answers a few classes for
most images while its scores still order the rest; :func:`best_offsets` adds to each class's
log-probability the offset that scores best on the labelled images (coordinate ascent), used where
their cross-fitted answers beat the model's own by more than :data:`REMAP_MARGIN`.

All of these are choices on the
validation images, which can cost on the test set; :func:`verify.train.train_cell` therefore
scores a protected run both ways and keeps the better (:class:`verify.train.CellResult`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import distributed
from .metrics import balanced_accuracy_from_counts, binary_auc, macro_auc, softmax_log_odds

__all__ = ["EXACT_MAP_CLASSES", "REMAP_MARGIN", "EvalResult", "auc_null_std", "best_answer_map", "best_offsets",
           "best_threshold",
           "evaluate", "evaluate_metrics", "read_answers", "remapped"]

#: Up to this many classes :func:`best_answer_map` tries every permutation (8! = 40,320).
EXACT_MAP_CLASSES = 8
#: A renaming is used only where it beats the model's own answers on the validation images by more
#: than this (accuracy or balanced accuracy).
REMAP_MARGIN = 0.1
#: A binary decision threshold is chosen only where the validation AUC is this many null standard
#: deviations (:func:`auc_null_std`) from 1/2, besides :data:`REMAP_MARGIN`.
THRESHOLD_Z = 2.0
#: The threshold's validation score comes from this many folds of cross-fitting (fewer where a
#: class has fewer images).
THRESHOLD_FOLDS = 10


@dataclass(frozen=True)
class EvalResult:
    """One evaluation: accuracy, balanced accuracy and macro AUC (None when no class of the test
    labels has both positives and negatives), all fractions in [0, 1]."""

    accuracy: float
    balanced_accuracy: float
    auc: float | None
    #: the predicted class of every image (int64, on the model's device), for bootstrap intervals
    pred: Tensor | None = None
    #: the per-class scores (N x K float32 softmax log-odds) the AUC ranks
    scores: Tensor | None = None
    #: the renaming of answers applied (``answer_map[j]``: the class answered for the model's class
    #: ``j``; :func:`remapped`), None when the model's own answers are scored
    answer_map: tuple[int, ...] | None = None
    #: two classes: the decision threshold on the (renamed) class-1 log-odds the predictions use
    #: (:func:`best_threshold`); None: the model's own argmax (threshold 0)
    threshold: float | None = None
    #: more classes: the per-class offsets added to the log-probabilities before the argmax
    #: (:func:`best_offsets`); None: the model's own argmax
    offsets: tuple[float, ...] | None = None

    def get(self, metric: str) -> float:
        """The value of ``"accuracy"`` or ``"balanced_accuracy"``."""
        return self.balanced_accuracy if metric == "balanced_accuracy" else self.accuracy


@torch.inference_mode()
def evaluate_metrics(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000, autocast=None) -> EvalResult:
    """Accuracy, balanced accuracy and macro AUC (:mod:`verify.metrics`) of ``model`` (eval mode,
    restored afterwards) on uint8 images ``x`` (on the model's device) with labels ``y``; the AUC
    ranks the float32 log-odds of the softmax scores.

    Under ``torchrun`` every process scores its shard ``x[rank::world]``; the predictions and scores
    (zeros outside the shard) are summed, so every process returns the metrics of the whole
    of ``x`` (call it on every process)."""
    was_training = model.training
    model.eval()
    r, w = distributed.rank(), distributed.world()
    y_all = y
    xs = x[r::w] if w > 1 else x
    ctx = autocast or contextlib.nullcontext
    outs: list[Tensor] = []
    preds: list[Tensor] = []
    for i in range(0, xs.shape[0], batch_size):
        xb = xs[i:i + batch_size].float().div_(255)
        with ctx():
            out = model(xb)
        preds.append(out.argmax(1))  # on the logits themselves, as before
        outs.append(softmax_log_odds(out))
    model.train(was_training)
    k = outs[0].shape[1] if outs else int(y_all.max()) + 1
    shard = torch.cat(outs) if outs else torch.zeros(0, k, device=y.device)
    pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64, device=y.device)
    if w > 1:  # each process fills its rows; the sum of zeros and one value is exact
        scores = torch.zeros(y_all.shape[0], k, device=shard.device)
        scores[r::w] = shard
        scores = distributed.all_reduce_sum(scores)
        full = torch.zeros(y_all.shape[0], dtype=torch.int64, device=pred.device)
        full[r::w] = pred
        pred = distributed.all_reduce_sum(full)
    else:
        scores = shard
    return _scored(pred, scores, y_all.long(), k)


def _scored(pred: Tensor, scores: Tensor, yl: Tensor, k: int, answer_map: tuple[int, ...] | None = None,
            threshold: float | None = None, offsets: tuple[float, ...] | None = None) -> EvalResult:
    hit = pred == yl
    total = torch.bincount(yl, minlength=k)
    correct = torch.bincount(yl[hit], minlength=k)
    auc = macro_auc(scores, yl)
    return EvalResult(
        accuracy=int(hit.sum()) / max(1, yl.shape[0]),
        balanced_accuracy=balanced_accuracy_from_counts(correct, total),
        auc=None if math.isnan(auc) else auc,
        pred=pred, scores=scores, answer_map=answer_map, threshold=threshold, offsets=offsets,
    )


def _map_value(gain: Tensor, perm: Sequence[int]) -> float:
    return float(sum(gain[perm[j], j] for j in range(len(perm))))


def best_answer_map(pred: Tensor, y: Tensor, num_classes: int, metric: str = "accuracy",
                    margin: float = REMAP_MARGIN) -> tuple[int, ...] | None:
    """The renaming of a model's answers that a holder of the labelled images ``y`` (with the
    model's predictions ``pred``) would choose: the permutation ``m`` (answer ``m[j]`` where the
    model says ``j``) with the highest ``metric`` (``"accuracy"`` or ``"balanced_accuracy"``, both
    linear in the confusion matrix) on them. None unless the model's own answers are below chance
    there (the majority-class rate for accuracy, 1/K for balanced accuracy) and the renaming beats
    them by more than ``margin`` (in units of the metric). A model that learned the classes under
    each other's names is below chance; one that learned a little is above it, and a renaming
    that wins a few validation images from it is noise, which would cost the attacker on the test
    set and so make a protection look stronger than it is (measured: CUDA-protected CIFAR-10
    samples, 40 validation images, a 0.1 margin alone renamed 2 of 5 seeds and raised the effect
    from 0.39 to 0.55)."""
    k = int(num_classes)
    if k < 2 or pred.numel() == 0:
        return None
    yl, pl = y.long().cpu(), pred.long().cpu()
    conf = torch.zeros(k, k, dtype=torch.float64)  # rows: true class, columns: the model's answer
    conf.index_put_((yl, pl), torch.ones(yl.shape[0], dtype=torch.float64), accumulate=True)
    gain = conf / conf.sum(1, keepdim=True).clamp_min(1) if metric == "balanced_accuracy" else conf
    own = float(gain.diagonal().sum())
    present = float((conf.sum(1) > 0).sum())
    unit = present if metric == "balanced_accuracy" else float(yl.shape[0])
    chance = 1.0 / present if metric == "balanced_accuracy" else float(conf.sum(1).max()) / unit
    if own / unit >= chance - 1e-12:
        return None
    if k <= EXACT_MAP_CLASSES:
        perms = torch.tensor(list(itertools.permutations(range(k))))  # P x K: perms[p, j] = answer for j
        values = gain[perms, torch.arange(k)].sum(1)
        perm = tuple(int(v) for v in perms[int(values.argmax())])
    else:  # greedy on the largest entries, then pairwise swaps while one helps
        free_rows, perm_l = set(range(k)), [-1] * k
        for flat in torch.argsort(gain.flatten(), descending=True, stable=True).tolist():
            c, j = divmod(flat, k)
            if perm_l[j] < 0 and c in free_rows:
                perm_l[j] = c
                free_rows.discard(c)
        better = True
        while better:
            better = False
            for a, b in itertools.combinations(range(k), 2):
                if gain[perm_l[b], a] + gain[perm_l[a], b] > gain[perm_l[a], a] + gain[perm_l[b], b] + 1e-12:
                    perm_l[a], perm_l[b] = perm_l[b], perm_l[a]
                    better = True
        perm = tuple(perm_l)
    if (_map_value(gain, perm) - own) / unit <= margin + 1e-12 or perm == tuple(range(k)):
        return None
    return perm


def auc_null_std(n_pos: int, n_neg: int) -> float:
    """The standard deviation of the AUC of scores that know nothing, with ``n_pos`` positives and
    ``n_neg`` negatives (the Mann-Whitney U null, without ties): ``sqrt((n_pos + n_neg + 1) / (12
    n_pos n_neg))``; 0.12 for 12 and 12 images, 0.029 for 200 and 200."""
    if n_pos <= 0 or n_neg <= 0:
        return math.inf
    return math.sqrt((n_pos + n_neg + 1) / (12.0 * n_pos * n_neg))


def _cut(v: Tensor, pos: Tensor, value) -> float:
    """The threshold on ``v`` whose answers (class 1 above it) score the highest ``value(tp, tn)``
    for the labels ``pos``; of equal ones the nearest 0 (the model's own)."""
    values, order = torch.sort(v)
    uniq, counts = torch.unique_consecutive(values, return_counts=True)
    ends = counts.cumsum(0)
    p_sorted = pos[order].double()
    cum_pos = torch.cat([torch.zeros(1, dtype=torch.float64), p_sorted.cumsum(0)[ends - 1]])
    cum_neg = torch.cat([torch.zeros(1, dtype=torch.float64), ends.double()]) - cum_pos
    # cut c answers class 1 for the images above the c lowest distinct values
    vals = value(pos.sum().double() - cum_pos, cum_neg, pos)
    cuts = torch.cat([uniq[:1] - 1.0, (uniq[:-1] + uniq[1:]) / 2, uniq[-1:] + 1.0])
    best = torch.nonzero(vals >= vals.max() - 1e-12).flatten()
    # cut c holds for every threshold in [uniq[c - 1], uniq[c]): the model's own (0) where it is one
    lo = torch.cat([torch.full((1,), -math.inf, dtype=uniq.dtype), uniq])
    hi = torch.cat([uniq, torch.full((1,), math.inf, dtype=uniq.dtype)])
    if bool(((lo[best] <= 0) & (0 < hi[best])).any()):
        return 0.0
    return float(cuts[best[int(cuts[best].abs().argmin())]])


def _decide(scores: Tensor, pos: Tensor, value) -> tuple[bool, float]:
    """``(renamed, threshold)`` fitted on ``scores`` (N x 2 log-odds) and labels ``pos``: renamed
    where the AUC is below 1/2, then the best cut of the renamed class-1 log-odds (:func:`_cut`)."""
    flip = binary_auc(scores[:, 1], pos) < 0.5
    return flip, _cut(scores[:, 0 if flip else 1], pos, value)


def best_threshold(scores: Tensor, y: Tensor, metric: str = "accuracy", margin: float = REMAP_MARGIN,
                   z: float = THRESHOLD_Z, folds: int = THRESHOLD_FOLDS) -> tuple[tuple[int, ...] | None, float, Tensor] | None:
    """The decision a holder of the labelled images ``y`` would take from a two-class model's
    ``scores`` (N x 2 softmax log-odds, :func:`evaluate_metrics`): ``(answer_map, threshold,
    held_out)``: answer class 1 where the class-1 log-odds (after renaming by ``answer_map``: None
    or ``(1, 0)``, where the model ranks the classes the wrong way round) exceed ``threshold``, the
    cut with the highest ``metric`` on them (ties: the threshold nearest 0, the model's own).

    ``held_out``: every image's answer from a rule fitted without it (stratified ``folds``-fold
    cross-fitting, at most one image of a class per fold and fold). Those answers, not the fitted
    ones, are what the rule scores on ``y``: a cut fitted to the same images scores above what it
    will do elsewhere, and an epoch chosen by that optimism would cost the attacker on the test set
    and so flatter the protection.

    None unless all of these hold: the model's own answers are within ``margin`` of chance (a model
    that learned to decide is left alone), its AUC is more than ``margin`` and ``z`` null standard
    deviations (:func:`auc_null_std`) from 1/2 (its scores rank the classes, either way round), and
    the held-out answers beat its own by more than ``margin``.

    This is the attacker of a poison that moves a model's decision but not its ranking: a binary
    model trained on class-targeted adversarial poison answers one class for everything, or ranks
    the classes the wrong way round (measured on chest X-rays: balanced accuracy 0.50 at AUC 0.14),
    and a threshold read off a few labelled images turns that ranking into answers."""
    if scores is None or scores.dim() != 2 or scores.shape[1] != 2 or scores.shape[0] == 0:
        return None
    yl = y.long().cpu()
    pos = yl == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    k = min(int(folds), n_pos, n_neg)
    if k < 2:
        return None
    balanced = metric == "balanced_accuracy"

    def value(tp: Tensor, tn: Tensor, p: Tensor) -> Tensor:
        np_, nn_ = p.sum().double(), (~p).sum().double()
        return (tp / np_ + tn / nn_) / 2 if balanced else (tp + tn) / p.numel()

    def scored(pred: Tensor) -> float:
        return float(value((pos & (pred == 1)).sum().double(), (~pos & (pred == 0)).sum().double(), pos))

    sc = scores.double().cpu()
    own = scored((sc[:, 1] > 0).long())
    chance = 0.5 if balanced else max(n_pos, n_neg) / (n_pos + n_neg)
    if own >= chance + margin - 1e-12:
        return None
    auc = binary_auc(sc[:, 1], pos)
    if math.isnan(auc) or abs(auc - 0.5) <= max(margin, z * auc_null_std(n_pos, n_neg)) + 1e-12:
        return None
    fold = torch.empty(yl.shape[0], dtype=torch.int64)
    for c in (False, True):  # each class dealt round the folds in order
        idx = torch.nonzero(pos == c).flatten()
        fold[idx] = torch.arange(idx.numel()) % k
    held_out = torch.empty(yl.shape[0], dtype=torch.int64)
    for f in range(k):
        fit, out = fold != f, fold == f
        flip_f, t_f = _decide(sc[fit], pos[fit], value)
        held_out[out] = (sc[out][:, 0 if flip_f else 1] > t_f).long()
    if scored(held_out) - own <= margin + 1e-12:
        return None
    flip, t = _decide(sc, pos, value)
    return ((1, 0) if flip else None), t, held_out


def _log_probs(scores: Tensor) -> Tensor:
    """The per-class log-probabilities (float64) that :func:`best_offsets` fits its offsets to and
    :func:`remapped` applies them to: ``log p`` from the softmax log-odds ``log(p / (1 - p))``."""
    return torch.nn.functional.logsigmoid(scores.double())


def _image_weights(y: Tensor, k: int, balanced: bool) -> Tensor:
    """Each image's share of the metric (float64): 1/N for accuracy; for balanced accuracy 1 over
    its class's count times the number of classes present."""
    counts = torch.bincount(y, minlength=k).double()
    if balanced:
        return 1.0 / (counts[y] * float((counts > 0).sum()))
    return torch.full((y.shape[0],), 1.0 / y.shape[0], dtype=torch.float64)


def _fit_offsets(logp: Tensor, y: Tensor, k: int, balanced: bool, sweeps: int = 3) -> Tensor:
    """Per-class offsets ``b`` (float64, K) for the answers ``argmax(logp + b)``, fitted to labels
    ``y`` by coordinate ascent: each class's offset in turn takes the value between two images' break
    points that scores best (accuracy, or balanced accuracy), ties nearest 0, ``sweeps`` times over."""
    n = y.shape[0]
    w = _image_weights(y, k, balanced)
    b = torch.zeros(k, dtype=torch.float64)
    for _ in range(sweeps):
        moved = False
        for c in range(k):
            others = logp + b
            others[:, c] = -math.inf
            m, top = others.max(1)
            t = m - logp[:, c]  # image i answers c where b[c] > t[i]
            gain_c, gain_o = w * (y == c), w * (y == top)
            ts, order = torch.sort(t)
            zero = torch.zeros(1, dtype=torch.float64)
            vals = torch.cat([zero, gain_c[order].cumsum(0)]) + gain_o.sum() - torch.cat([zero, gain_o[order].cumsum(0)])
            cands = torch.cat([ts[:1] - 1.0, (ts[:-1] + ts[1:]) / 2, ts[-1:] + 1.0])
            ok = torch.ones(n + 1, dtype=torch.bool)
            ok[1:n] = ts[1:] > ts[:-1]  # a cut between equal break points does not exist
            vals = torch.where(ok, vals, torch.full_like(vals, -math.inf))
            now = float((w * ((logp + b).argmax(1) == y)).sum())
            best = torch.nonzero(vals >= vals.max() - 1e-12).flatten()
            pick = best[int(cands[best].abs().argmin())]
            if float(vals[pick]) > now + 1e-12:
                b[c] = cands[pick]
                moved = True
        if not moved:
            break
    return b


def best_offsets(scores: Tensor, y: Tensor, metric: str = "accuracy", margin: float = REMAP_MARGIN,
                 folds: int = THRESHOLD_FOLDS) -> tuple[tuple[float, ...], Tensor] | None:
    """The per-class offsets a holder of the labelled images ``y`` would add to a model's
    log-probabilities (from ``scores``, N x K softmax log-odds) before taking its answer:
    ``(offsets, held_out)``, fitted on all of them (:func:`_fit_offsets`), with ``held_out`` every
    image's answer from offsets fitted without it (stratified ``folds``-fold cross-fitting). None
    unless the held-out answers beat the model's own by more than ``margin`` (``metric``).

    This is the attacker of a poison that leaves a many-class model answering a few classes for
    most clean images (measured: CUDA-protected CIFAR-10 samples, a third of the test images
    answered as one or two classes, against a sixth for a clean model) while its scores still order
    the others: the prior correction a practitioner applies to a miscalibrated model."""
    if scores is None or scores.dim() != 2 or scores.shape[1] < 3 or scores.shape[0] < 4:
        return None
    k = scores.shape[1]
    yl = y.long().cpu()
    logp = _log_probs(scores.cpu())
    balanced = metric == "balanced_accuracy"
    w = _image_weights(yl, k, balanced)

    def value(pred: Tensor) -> float:
        return float((w * (pred == yl)).sum())

    own = value(logp.argmax(1))
    n_folds = max(2, min(int(folds), yl.shape[0] // 2))
    fold = torch.empty(yl.shape[0], dtype=torch.int64)
    dealt = 0
    for c in range(k):  # each class dealt round the folds in order, continuing from the last class
        idx = torch.nonzero(yl == c).flatten()
        fold[idx] = (torch.arange(idx.numel()) + dealt) % n_folds
        dealt += idx.numel()
    held_out = torch.empty(yl.shape[0], dtype=torch.int64)
    for f in range(n_folds):
        fit, out = fold != f, fold == f
        b_f = _fit_offsets(logp[fit], yl[fit], k, balanced)
        held_out[out] = (logp[out] + b_f).argmax(1)
    if value(held_out) - own <= margin + 1e-12:
        return None
    return tuple(float(v) for v in _fit_offsets(logp, yl, k, balanced)), held_out


def read_answers(ev: EvalResult, y: Tensor, num_classes: int, metric: str = "accuracy") -> EvalResult:
    """``ev`` (a model's evaluation on labelled images ``y``) as the attacker reads it: two
    classes, decided at :func:`best_threshold`'s cut where that holds (scored by its held-out
    answers; ``answer_map`` and ``threshold`` carry the rule for the test images); more classes,
    renamed by :func:`best_answer_map` where that holds, else shifted by :func:`best_offsets` where
    that holds (scored by its held-out answers); else ``ev`` itself."""
    if int(num_classes) == 2 and ev.scores is not None and ev.scores.shape[1] == 2:
        rule = best_threshold(ev.scores, y, metric)
        if rule is not None:
            amap, t, held_out = rule
            read = remapped(ev, y, amap, t)
            return _scored(held_out.to(read.pred.device), read.scores, y.long().to(read.pred.device), 2, amap, t)
        return remapped(ev, y, best_answer_map(ev.pred, y, num_classes, metric))
    amap = best_answer_map(ev.pred, y, num_classes, metric)
    if amap is None and ev.scores is not None:
        shift = best_offsets(ev.scores, y, metric)
        if shift is not None:
            offsets, held_out = shift
            dev = ev.pred.device
            return _scored(held_out.to(dev), ev.scores, y.long().to(dev), ev.scores.shape[1], offsets=offsets)
    return remapped(ev, y, amap)


def remapped(ev: EvalResult, y: Tensor, answer_map: tuple[int, ...] | None,
             threshold: float | None = None, offsets: Sequence[float] | None = None) -> EvalResult:
    """``ev`` with the model's answers renamed by ``answer_map`` (:func:`best_answer_map`; None:
    unchanged) and, for two classes, decided at ``threshold`` on the renamed class-1 log-odds
    (:func:`best_threshold`; None: the argmax): the predictions mapped and the score columns moved
    with them; ``offsets`` (:func:`best_offsets`) shift the log-probabilities before the argmax.
    All None: ``ev`` itself."""
    if answer_map is None and threshold is None and offsets is None:
        return ev
    if ev.pred is None or ev.scores is None:
        raise ValueError("remapped needs the predictions and scores of the evaluation")
    k = ev.scores.shape[1]
    amap = tuple(answer_map) if answer_map is not None else tuple(range(k))
    m = torch.tensor(amap, device=ev.pred.device)
    scores = torch.empty_like(ev.scores)
    scores[:, m.to(ev.scores.device)] = ev.scores
    pred = m[ev.pred]
    if threshold is not None:
        if k != 2:
            raise ValueError(f"a decision threshold needs two classes, not {k}")
        pred = (scores[:, 1].double() > threshold).long().to(ev.pred.device)  # the float64 rule as fitted
    if offsets is not None:
        b = torch.tensor(list(offsets), dtype=torch.float64, device=scores.device)
        pred = (_log_probs(scores) + b).argmax(1).to(ev.pred.device)
    return _scored(pred, scores, y.long().to(ev.pred.device), k,
                   None if answer_map is None else tuple(answer_map), threshold,
                   None if offsets is None else tuple(float(v) for v in offsets))


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000, autocast=None) -> float:
    """Top-1 accuracy of ``model`` on uint8 images ``x`` with labels ``y`` (see :func:`evaluate_metrics`)."""
    return evaluate_metrics(model, x, y, batch_size, autocast).accuracy
