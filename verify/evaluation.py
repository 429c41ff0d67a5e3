"""Scoring a model on the test set: accuracy, balanced accuracy and macro AUC in one pass.

One forward pass over the test images (eval mode, batched, under the caller's autocast) gives the
predicted labels (argmax of the logits, for accuracy and per-class recall) and the float32
log-odds of the softmax scores (for the AUC, :func:`verify.metrics.softmax_log_odds`). Under
``torchrun`` each process scores its shard and the results are summed, so every process returns the
numbers of the whole set.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import distributed
from .metrics import balanced_accuracy_from_counts, macro_auc, softmax_log_odds

__all__ = ["EvalResult", "evaluate", "evaluate_metrics"]


@dataclass(frozen=True)
class EvalResult:
    """One evaluation: accuracy, balanced accuracy and macro AUC (None when no class of the test
    labels has both positives and negatives), all fractions in [0, 1]."""

    accuracy: float
    balanced_accuracy: float
    auc: float | None
    #: the predicted class of every image (int64, on the model's device), for bootstrap intervals
    pred: Tensor | None = None

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
    yl = y_all.long()
    hit = pred == yl
    total = torch.bincount(yl, minlength=k)
    correct = torch.bincount(yl[hit], minlength=k)
    auc = macro_auc(scores, yl)
    return EvalResult(
        accuracy=int(hit.sum()) / max(1, yl.shape[0]),
        balanced_accuracy=balanced_accuracy_from_counts(correct, total),
        auc=None if math.isnan(auc) else auc,
        pred=pred,
    )


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000, autocast=None) -> float:
    """Top-1 accuracy of ``model`` on uint8 images ``x`` with labels ``y`` (see :func:`evaluate_metrics`)."""
    return evaluate_metrics(model, x, y, batch_size, autocast).accuracy
