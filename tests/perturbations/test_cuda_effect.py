"""CUDA's effect on a real model: a tiny CNN trained on protected images learns the class-wise
filters instead of the content (4 CIFAR-10 classes of the bundled samples at 16 px).

Paper reference (CIFAR-10, ResNet-18): clean 94.66 %, CUDA 18.48 %, one shared filter 90.47 %:
the class-wise structure is what matters, and these tests check exactly that.

A training this small ends somewhere else on every CPU (AVX-512, AVX2 and SSE kernels round
differently, and so do 1 and 2 threads), and one test image is 1.25 points. So every claim is a
difference of means over three trainings (seeds 0-2, keys 3-5), never an absolute accuracy, and its
threshold sits far below the smallest difference measured.

Measured (25 epochs, 2026-12-07; means of seeds 0-2 and of seeds 3-5, each under: default kernels
with 1 and with 2 threads, ``ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41`` and
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` with 1 thread; 8 three-run means; at 30 epochs,
the test's length before, in brackets):

=========================================  ==========================================  ========
difference of three-run means              measured min .. max (mean) [at 30 epochs]   asserted
=========================================  ==========================================  ========
clean - class-wise                         0.162 .. 0.254 (0.23) [0.175 .. 0.384]      >= 0.06
class-wise: protected test - clean test    0.413 .. 0.467 (0.44) [0.363 .. 0.484]      >= 0.25
one shared filter - class-wise             0.167 .. 0.229 (0.20) [0.071 .. 0.184]      >= 0.03
=========================================  ==========================================  ========

20 epochs was measured and rejected (one shared filter - class-wise down to 0.033; the
epoch count is noisy, not monotone, so each length is measured, never interpolated).

Single runs are far noisier (one SSE41 run at 20 epochs collapsed to chance), which is why
nothing here rests on one training. With one shared filter for all classes (the paper's ablation)
the model must learn content: on CIFAR-10 with ResNet-18 the paper has it at 90.47 %; this tiny
model loses some accuracy to the blur itself, so only the direction is asserted.
"""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F

import perturbations
from perturbations import Keyring
from tests.tiny import accuracy, load_split, quantise, train_tiny

CLASSES = [0, 1, 6, 8]  # airplane, automobile, frog, ship
EPOCHS = 25
SEEDS = (0, 1, 2)


def _subset(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _ = load_split("cifar10", split)
    keep = torch.isin(y, torch.tensor(CLASSES))
    remap = torch.tensor([CLASSES.index(int(v)) for v in y[keep]])
    return F.avg_pool2d(x[keep], 2), remap


def measure(seed: int) -> dict[str, float]:
    """One seed: a clean model, a class-wise CUDA model and a one-shared-filter model (key 3 + seed)."""
    xtr, ytr = _subset("train")
    xte, yte = _subset("test")
    out = {"clean": accuracy(train_tiny(xtr, ytr, 4, EPOCHS, seed=seed), xte, yte)}
    key = Keyring.from_seed(3 + seed)
    for name, universal in (("classwise", False), ("universal", True)):
        method = perturbations.get("cuda")(key, num_classes=4, universal=universal)
        model = train_tiny(quantise(method.apply(xtr, ytr)), ytr, 4, EPOCHS, seed=seed)
        out[name] = accuracy(model, xte, yte)
        out[name + "_protected_test"] = accuracy(model, quantise(method.apply(xte, yte)), yte)
    return out


@pytest.fixture(scope="module")
def results() -> dict[str, float]:
    """Means over :data:`SEEDS` of every quantity of :func:`measure`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    try:
        runs = [measure(seed) for seed in SEEDS]
    finally:
        torch.set_num_threads(threads)
    return {k: statistics.mean(r[k] for r in runs) for k in runs[0]}


def test_protected_model_learns_the_filters_not_the_content(results: dict[str, float]) -> None:
    # high on held-out images protected with the same key, much lower on clean ones
    assert results["classwise_protected_test"] >= results["classwise"] + 0.25, results


def test_protection_takes_accuracy_away(results: dict[str, float]) -> None:
    assert results["classwise"] <= results["clean"] - 0.06, results


def test_one_shared_filter_protects_less_than_classwise(results: dict[str, float]) -> None:
    assert results["universal"] >= results["classwise"] + 0.03, results
