"""CUDA's effect on a real model: a tiny CNN trained on protected images learns the class-wise
filters instead of the content (4 CIFAR-10 classes of the bundled samples at 16 px, 30 epochs).

Paper reference (CIFAR-10, ResNet-18): clean 94.66 %, CUDA 18.48 %, one shared filter 90.47 %:
the class-wise structure is what matters, and these tests check exactly that.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import perturbations
from perturbations import Keyring
from tests.tiny import accuracy, load_split, quantise, train_tiny

CLASSES = [0, 1, 6, 8]  # airplane, automobile, frog, ship
EPOCHS = 30


def _subset(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _ = load_split("cifar10", split)
    keep = torch.isin(y, torch.tensor(CLASSES))
    remap = torch.tensor([CLASSES.index(int(v)) for v in y[keep]])
    return F.avg_pool2d(x[keep], 2), remap


@pytest.fixture(scope="module")
def results() -> dict[str, float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    try:
        xtr, ytr = _subset("train")
        xte, yte = _subset("test")
        out = {"clean": accuracy(train_tiny(xtr, ytr, 4, EPOCHS), xte, yte)}
        key = Keyring.from_seed(3)
        for name, universal in (("classwise", False), ("universal", True)):
            method = perturbations.get("cuda")(key, num_classes=4, universal=universal)
            model = train_tiny(quantise(method.apply(xtr, ytr)), ytr, 4, EPOCHS)
            out[name] = accuracy(model, xte, yte)
            out[name + "_protected_test"] = accuracy(model, quantise(method.apply(xte, yte)), yte)
        return out
    finally:
        torch.set_num_threads(threads)


def test_protected_model_learns_the_filters_not_the_content(results: dict[str, float]) -> None:
    # high on held-out images protected with the same key, much lower on clean ones
    assert results["classwise_protected_test"] >= results["classwise"] + 0.25, results


def test_protection_takes_accuracy_away(results: dict[str, float]) -> None:
    assert results["clean"] >= 0.65, results  # the tiny model does learn clean data
    assert results["classwise"] <= results["clean"] - 0.25, results


def test_one_shared_filter_is_far_weaker_than_classwise(results: dict[str, float]) -> None:
    assert results["universal"] >= results["classwise"] + 0.2, results
