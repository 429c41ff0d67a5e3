"""``protect verify --engine ray``: every cell a Ray task, the same certificate as a local run.

Tiny settings as in tests/verify/test_verify_cli.py (2 CIFAR classes, 16 training and 4 test images
per class): the clean erm/none baseline and protected erm x {none, grayscale}."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from verify import run as vrun
from tests.tiny import copy_classes

CLASSES = ["airplane", "frog"]
#: What legitimately differs between two runs: timings, folders, resume counts, and the engine's name.
PER_RUN = {"wall_s", "epoch_s", "created", "resume", "report_dir", "dir", "engine"}


def _copy(split: str, dst: Path, n: int) -> Path:
    return copy_classes(split, dst, n, tuple(CLASSES))


def untimed(obj):
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if k not in PER_RUN}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


def test_a_ray_certificate_equals_the_local_one(ray_cluster, tmp_path, one_thread):
    """Each Ray task trains with one CPU thread: the local run does too (``one_thread``), so every
    cell is computed in the same order, and the numbers are equal, not close."""
    train = _copy("train", tmp_path / "train", 16)
    test = _copy("test", tmp_path / "test", 4)
    kw = {"clean_dir": train, "trainings": "erm", "defenses": "none,grayscale", "epochs": 6, "device": "cpu",
          "cache_dir": tmp_path / "cache", "progress": False, "seeds": 1}
    local = vrun.verify_folder(train, test, report_dir=tmp_path / "local", **kw)
    on_ray = vrun.verify_folder(train, test, report_dir=tmp_path / "ray", engine="ray",
                                **{**kw, "cache_dir": tmp_path / "cache-ray"})
    assert on_ray["engine"] == "ray" and local["engine"] == "local"
    assert on_ray["resume"]["trained"] == 3 and len(list((tmp_path / "ray" / "cells").glob("*.json"))) == 3
    assert untimed(on_ray) == untimed(local)
    saved = json.loads((tmp_path / "ray" / "certificate.json").read_text())
    assert untimed(saved) == untimed(json.loads(json.dumps(local, default=str)))
    assert torch.get_num_threads() == 1

    again = vrun.verify_folder(train, test, report_dir=tmp_path / "ray", engine="ray",
                               **{**kw, "cache_dir": tmp_path / "cache-ray"})
    assert again["resume"]["reused"] == 3 and untimed(again) == untimed(local)  # nothing left to train
