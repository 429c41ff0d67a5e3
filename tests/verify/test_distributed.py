"""verify.distributed: two CPU processes (Gloo) train one cell data-parallel, as under torchrun."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from verify import distributed

SAMPLES = Path(__file__).parents[2] / "samples" / "cifar10"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from verify.data import load_folder
    from verify.run import verify_sets

    try:
        device = distributed.setup("cpu")
        classes = ["airplane", "frog"]
        train = load_folder(SAMPLES / "train", max_per_class=40).select_classes(classes)
        test = load_folder(SAMPLES / "test").select_classes(classes)
        cert = verify_sets(
            train, test, train, tier="quick", trainings="erm,linf", defenses="none,cutmix", epochs=2,
            device=device, report_dir=Path(out) / f"report{rank}", cache_dir=Path(out) / "cache", progress=False,
        )
        Path(out, f"rank{rank}.json").write_text(json.dumps(
            {"world": distributed.world(), "rank": distributed.rank(), "cells": cert["cells"], "device": cert["device"]}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _untimed(obj):
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if k not in ("wall_s", "epoch_s")}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def test_ddp_on_two_cpu_processes(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert (r0["world"], r0["rank"], r1["rank"]) == (2, 0, 1)
    assert "x 2 processes (DDP)" in r0["device"]
    # Gradients are averaged and test counts summed: both processes hold the same model and numbers.
    assert _untimed(r0["cells"]) == _untimed(r1["cells"])
    for cell in r0["cells"]:
        assert len(cell["protected"]["curve"]) == 2 and 0 <= cell["protected"]["peak_acc"] <= 1
    erm = next(c for c in r0["cells"] if c["training"] == "erm" and c["defense"] == "none")
    assert erm["protected"]["peak_acc"] > 0.6, erm  # it really trained (chance is 0.5)
    # Only rank 0 writes the report and the baseline cache.
    assert (tmp_path / "report0" / "certificate.json").is_file()
    assert not (tmp_path / "report1").exists()
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2  # erm and linf baselines


def test_single_process_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.setup("cpu") == "cpu"
    assert (distributed.world(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    t = torch.ones(3)
    assert distributed.all_reduce_sum(t) is t and distributed.broadcast_object({"a": 1}) == {"a": 1}
    monkeypatch.setenv("WORLD_SIZE", "junk")
    assert distributed.env_world_size() == 1
