"""verify.distributed: two CPU processes (Gloo) train one cell data-parallel, as under torchrun."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from verify import distributed
from verify.data import load_folder
from verify.evaluation import evaluate_metrics

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

    import verify.cells as vcells
    import verify.run as vrun
    from verify.recipes import get_recipe

    try:
        device = distributed.setup("cpu")
        classes = ["airplane", "frog"]
        train = load_folder(SAMPLES / "train", max_per_class=40).select_classes(classes)
        test = load_folder(SAMPLES / "test").select_classes(classes)
        # one evaluation of a fixed model, sharded over the two processes (compared with one process below)
        sharded = dataclasses.asdict(evaluate_metrics(_fixed_model(), test.x[:37], test.y[:37], batch_size=1))
        sharded["pred"] = sharded["pred"].tolist()  # every prediction, gathered from both shards
        sharded["scores"] = sharded["scores"].tolist()
        recipe = get_recipe("quick", epochs=3, batch_size=16)  # 5 steps per epoch, 15 per cell
        kw = {"tier": recipe, "trainings": "erm,linf", "defenses": "none,cutmix", "device": device,
              "report_dir": Path(out) / f"report{rank}", "cache_dir": Path(out) / "cache", "progress": False, "seeds": 1}
        cert = vrun.verify_sets(train, test, train, **kw)
        # the same call again: rank 0 finds every cell saved and tells rank 1 (whose own report folder
        # is empty), so both skip the same cells; a rank deciding alone would deadlock or crash DDP
        trained: list[str] = []
        real = vcells.train_cell

        def counting(*args, **kwargs):
            trained.append(kwargs.get("label", ""))
            return real(*args, **kwargs)

        vcells.train_cell = counting
        again = vrun.verify_sets(train, test, train, **kw)
        Path(out, f"rank{rank}.json").write_text(json.dumps(
            {"world": distributed.world(), "rank": distributed.rank(), "cells": cert["cells"], "device": cert["device"],
             "batchnorm": cert["batchnorm"], "again": again["cells"], "resume": again["resume"], "trained": trained,
             "sharded": sharded}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _fixed_model() -> torch.nn.Module:
    from verify.models import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_model("fastcnn", 2)


def _untimed(obj):
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if k not in ("wall_s", "epoch_s")}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def test_ddp_on_two_cpu_processes(tmp_path: Path) -> None:
    """DDP with Gloo: both processes hold the same model and numbers, only rank 0 writes, a rerun
    skips the same saved cells on every rank, and the model learns.

    "It learns": each of the 4 protected cells here trains on clean airplane/frog images (80, batch 16:
    5 steps per epoch, 3 epochs; 40 test images, chance 0.5). Measured over seeds 0-4 under
    default/AVX-512 (OMP_NUM_THREADS 1 and 2), ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 and
    ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 (1 and 2), the workers on one thread each as
    here, 25 runs: single cells peak 0.625-0.925; the mean of the 4 cells 0.806-0.875 (seed 0:
    0.844-0.850). The bound sits 0.15 under that; a model that learns nothing gives 0.5. The previous
    claim (erm/none peak > 0.6 after 2 epochs of one optimizer step each) held for seed 0 only: with
    seeds 1-4 that cell sat at 0.500 in every setting (0.500-0.750 over the 25 runs).
    """
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert (r0["world"], r0["rank"], r1["rank"]) == (2, 0, 1)
    assert "x 2 processes (DDP)" in r0["device"]
    assert r0["batchnorm"].startswith("per process")  # SyncBatchNorm needs GPUs; the certificate says so
    # Gradients are averaged and test counts summed: both processes hold the same model and numbers.
    assert _untimed(r0["cells"]) == _untimed(r1["cells"])
    for cell in r0["cells"]:
        assert len(cell["protected"]["curve"]) == 3 and 0 <= cell["protected"]["peak_acc"] <= 1
        assert len(cell["protected"]["curve_auc"]) == 3 and 0 <= cell["protected"]["peak_auc"] <= 1
    # accuracy, balanced accuracy and AUC of a sharded evaluation (37 images: shards of 19 and 18) are
    # those of one process scoring everything (one image per forward pass on both sides: the same kernels)
    torch.set_num_threads(1)
    test = load_folder(SAMPLES / "test").select_classes(["airplane", "frog"])
    whole = evaluate_metrics(_fixed_model(), test.x[:37], test.y[:37], batch_size=1)
    for r in (r0, r1):
        assert r["sharded"]["accuracy"] == whole.accuracy
        assert r["sharded"]["balanced_accuracy"] == pytest.approx(whole.balanced_accuracy, abs=1e-12)
        assert r["sharded"]["auc"] == pytest.approx(whole.auc, abs=1e-12)
        assert torch.allclose(torch.tensor(r["sharded"]["scores"]), whole.scores)  # what a renaming permutes
    mean_peak = sum(c["protected"]["peak_acc"] for c in r0["cells"]) / len(r0["cells"])
    assert mean_peak >= 0.65, [c["protected"]["curve"] for c in r0["cells"]]  # it really trained
    # Only rank 0 writes the report, the finished cells and the baseline cache.
    assert (tmp_path / "report0" / "certificate.json").is_file()
    assert len(list((tmp_path / "report0" / "cells").glob("*.json"))) == 6  # 2 baselines + 4 cells
    assert not (tmp_path / "report1").exists()
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2  # erm and linf baselines
    # The rerun: rank 0 decided, both reused all 6 cells and trained none, with the same numbers.
    for r in (r0, r1):
        assert r["trained"] == [] and r["resume"]["reused"] == 6 and r["resume"]["trained"] == 0
        assert _untimed(r["again"]) == _untimed(r0["cells"])


def test_single_process_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.setup("cpu") == "cpu"
    assert (distributed.world(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    t = torch.ones(3)
    assert distributed.all_reduce_sum(t) is t and distributed.broadcast_object({"a": 1}) == {"a": 1}
    monkeypatch.setenv("WORLD_SIZE", "junk")
    assert distributed.env_world_size() == 1


def test_batchnorm_is_synchronised_only_on_gpus_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    """SyncBatchNorm does not run on CPUs (PyTorch raises "SyncBatchNorm expected input tensor to be on
    GPU"), so CPU processes keep per-process BatchNorm and the certificate says which one was used."""
    from verify.models import create_model

    model = create_model("fastcnn", 2)
    assert distributed.convert_batchnorm(model, "cpu") is model  # one process: unchanged
    assert distributed.batchnorm_mode("cpu") == distributed.batchnorm_mode("cuda") == "single process"
    monkeypatch.setattr(distributed, "world", lambda: 4)
    assert distributed.convert_batchnorm(model, "cpu") is model
    assert distributed.batchnorm_mode("cpu").startswith("per process (each of 4 processes")
    synced = distributed.convert_batchnorm(create_model("fastcnn", 2), torch.device("cuda", 0))
    kinds = {type(m) for m in synced.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert kinds == {torch.nn.SyncBatchNorm}
    assert distributed.batchnorm_mode("cuda:1") == "synchronized (SyncBatchNorm over 4 processes)"
