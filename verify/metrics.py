"""Test-set metrics beside accuracy, for imbalanced (e.g. medical) test sets, and the rule that
picks the metric the protection score uses.

* **Balanced accuracy**: the mean per-class recall over the classes present in the test set. A
  model that always answers one class scores exactly 1/K (K = classes present), whatever the class
  frequencies, so it is the floor of a model that learned nothing.
* **Macro AUC**: one-vs-rest ROC AUC per class, from the model's softmax scores, averaged over the
  classes that have both positives and negatives in the test set; with 2 classes it is the AUC of
  the positive class (class index 1). The AUC is the Mann-Whitney U statistic computed from ranks,
  ties counted as one half (average ranks), in float64; no sklearn. Scores are ranked as the
  log-odds of the softmax probabilities, ``log p_k - log(1 - p_k)`` (:func:`softmax_log_odds`): the
  same order as the probabilities, without their float32 saturation (softmax, and log-softmax,
  round to exactly 1 and 0 once a logit leads by about 17, which would turn confident answers into
  ties).
* **Score metric** (:func:`score_basis`): a test set is *imbalanced* when some class present in
  it holds a count more than :data:`IMBALANCE_TOLERANCE` (10 %) away from the mean count of the
  present classes (for 2 classes: the majority class exceeds 55 %). On an imbalanced test set the
  score uses balanced accuracy with chance 1/K; on a balanced one it uses accuracy with chance the
  majority-class rate (= 1/K), as before.

Everything here is pure tensor code (any device), no training and no files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "BALANCED_CHANCE_DEFINITION",
    "IMBALANCE_RULE",
    "IMBALANCE_TOLERANCE",
    "METRICS",
    "average_ranks",
    "balanced_accuracy",
    "balanced_accuracy_from_counts",
    "binary_auc",
    "is_imbalanced",
    "macro_auc",
    "score_basis",
    "softmax_log_odds",
]

#: The metric names a certificate may score with.
METRICS = ("accuracy", "balanced_accuracy")
#: Relative distance of a class count from the mean count beyond which a test set is imbalanced.
IMBALANCE_TOLERANCE = 0.10
IMBALANCE_RULE = (
    "a test set is imbalanced when some class present in it holds a count more than 10% away from the "
    "mean count of the present classes (2 classes: the majority class exceeds 55%); then the score uses "
    "balanced accuracy, else accuracy"
)
BALANCED_CHANCE_DEFINITION = (
    "chance for balanced accuracy = 1/K over the K classes present in the test set (the balanced accuracy "
    "of always answering one class, whatever the class frequencies)"
)


def balanced_accuracy_from_counts(correct: Sequence[float] | Tensor, total: Sequence[float] | Tensor) -> float:
    """Mean of ``correct[k] / total[k]`` over the classes with ``total[k] > 0`` (NaN when none)."""
    c = torch.as_tensor(correct, dtype=torch.float64).cpu()
    t = torch.as_tensor(total, dtype=torch.float64).cpu()
    present = t > 0
    if not bool(present.any()):
        return math.nan
    return float((c[present] / t[present]).mean())


def balanced_accuracy(pred: Tensor, target: Tensor, num_classes: int | None = None) -> float:
    """Balanced accuracy of predicted labels ``pred`` (N) against ``target`` (N): the mean recall
    over the classes present in ``target``."""
    k = int(num_classes if num_classes is not None else int(max(pred.max(), target.max())) + 1)
    target = target.long()
    total = torch.bincount(target, minlength=k)
    correct = torch.bincount(target[pred.long() == target], minlength=k)
    return balanced_accuracy_from_counts(correct, total)


def average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of the values of the 1-D tensor ``x`` in ascending order, tied values sharing
    the mean of their positions (float64, on ``x``'s device)."""
    values, order = torch.sort(x.reshape(-1))
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)  # 1-based position of each tie group's last member
    group_rank = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty(values.shape[0], dtype=torch.float64, device=x.device)
    ranks[order] = group_rank[inverse]
    return ranks


def softmax_log_odds(logits: Tensor) -> Tensor:
    """``log(p_k / (1 - p_k))`` of ``p = softmax(logits)`` (N x K, float32), computed without
    cancellation: for each row's top class as its logit minus the log-sum-exp of the other logits,
    for the others from ``log p_k`` (where ``p_k <= 1/2``, so ``log1p(-p_k)`` is accurate). A strictly
    increasing function of ``p_k`` per column, so it ranks like the softmax scores."""
    z = logits.float()
    if z.shape[1] == 1:
        return torch.zeros_like(z)
    log_p = torch.log_softmax(z, dim=1)
    odds = log_p - torch.log1p(-log_p.exp().clamp(max=0.5))  # exact where p_k <= 1/2
    top = z.argmax(1, keepdim=True)
    rest = z.scatter(1, top, float("-inf")).logsumexp(1, keepdim=True)
    return odds.scatter(1, top, z.gather(1, top) - rest)


def binary_auc(scores: Tensor, positive: Tensor) -> float:
    """ROC AUC of ``scores`` (N) for the boolean labels ``positive`` (N): the probability that a
    random positive outscores a random negative, ties counted as 1/2 (Mann-Whitney U from average
    ranks). NaN without positives or without negatives, or with a NaN score."""
    positive = positive.reshape(-1).bool()
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0 or bool(torch.isnan(scores).any()):
        return math.nan
    rank_sum = float(average_ranks(scores.reshape(-1))[positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def macro_auc(scores: Tensor, target: Tensor) -> float:
    """Macro one-vs-rest AUC of per-class scores ``scores`` (N x K, softmax probabilities or any
    monotone transform, e.g. log-softmax) for labels ``target`` (N): the mean over the classes with
    both positives and negatives; with K = 2 the AUC of class 1. NaN when no class qualifies."""
    if scores.dim() != 2 or scores.shape[0] != target.shape[0]:
        raise ValueError(f"scores must be N x K for N labels, got {tuple(scores.shape)} for {target.shape[0]} labels")
    k = scores.shape[1]
    if k == 2:
        return binary_auc(scores[:, 1], target == 1)
    aucs = [a for c in range(k) if not math.isnan(a := binary_auc(scores[:, c], target == c))]
    return sum(aucs) / len(aucs) if aucs else math.nan


def is_imbalanced(counts: Sequence[int]) -> bool:
    """True when some class present (count > 0) is more than :data:`IMBALANCE_TOLERANCE` of the
    mean count away from the mean count of the present classes (see module doc)."""
    present = [int(c) for c in counts if c > 0]
    if len(present) < 2:
        return False
    mean = sum(present) / len(present)
    return any(abs(c - mean) > IMBALANCE_TOLERANCE * mean + 1e-9 for c in present)


def score_basis(counts: Sequence[int]) -> tuple[str, float]:
    """``(metric, chance)`` the protection score uses for a test set with ``counts`` images per
    class: ``("balanced_accuracy", 1/K present)`` when it is imbalanced (:func:`is_imbalanced`),
    else ``("accuracy", majority-class rate)`` (1/K on a balanced set; 1/K for an empty one)."""
    present = [int(c) for c in counts if c > 0]
    total = sum(present)
    if not present:
        return "accuracy", 1.0 / max(1, len(counts))
    if is_imbalanced(counts):
        return "balanced_accuracy", 1.0 / len(present)
    return "accuracy", max(present) / total
