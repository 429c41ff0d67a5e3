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
from .metrics import balanced_accuracy_from_counts, macro_auc, softmax_log_odds

__all__ = ["EXACT_MAP_CLASSES", "REMAP_MARGIN", "EvalResult", "best_answer_map", "evaluate", "evaluate_metrics", "remapped"]

#: Up to this many classes :func:`best_answer_map` tries every permutation (8! = 40,320).
EXACT_MAP_CLASSES = 8
#: A renaming is used only where it beats the model's own answers on the validation images by more
#: than this (accuracy or balanced accuracy).
REMAP_MARGIN = 0.1


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


def _scored(pred: Tensor, scores: Tensor, yl: Tensor, k: int, answer_map: tuple[int, ...] | None = None) -> EvalResult:
    hit = pred == yl
    total = torch.bincount(yl, minlength=k)
    correct = torch.bincount(yl[hit], minlength=k)
    auc = macro_auc(scores, yl)
    return EvalResult(
        accuracy=int(hit.sum()) / max(1, yl.shape[0]),
        balanced_accuracy=balanced_accuracy_from_counts(correct, total),
        auc=None if math.isnan(auc) else auc,
        pred=pred, scores=scores, answer_map=answer_map,
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


def remapped(ev: EvalResult, y: Tensor, answer_map: tuple[int, ...] | None) -> EvalResult:
    """``ev`` with the model's answers renamed by ``answer_map`` (:func:`best_answer_map`; None:
    ``ev`` itself): the predictions mapped and the score columns moved with them."""
    if answer_map is None:
        return ev
    if ev.pred is None or ev.scores is None:
        raise ValueError("remapped needs the predictions and scores of the evaluation")
    m = torch.tensor(answer_map, device=ev.pred.device)
    scores = torch.empty_like(ev.scores)
    scores[:, m.to(ev.scores.device)] = ev.scores
    return _scored(m[ev.pred], scores, y.long().to(ev.pred.device), len(answer_map), tuple(answer_map))


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000, autocast=None) -> float:
    """Top-1 accuracy of ``model`` on uint8 images ``x`` with labels ``y`` (see :func:`evaluate_metrics`)."""
    return evaluate_metrics(model, x, y, batch_size, autocast).accuracy
