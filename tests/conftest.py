"""Shared fixtures: the bundled samples (read-only), one keyring per session, tiny image folders."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs the suite in one pytest-xdist worker per core: each worker (and every process
    # it starts) gets one intra-op thread, so the workers never fight over the cores. The
    # statistical tests' thresholds hold with one thread and with two (their docstrings say so).
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
#: The key of the pipeline and CLI tests (long enough not to trigger the short-key warning).
TEST_KEY = "pipeline-tests-key-0123456789"


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI configures the root logger (level, a handler, captured warnings) as a program
    should; in-process CLI tests must not leak that into the tests after them."""
    import logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    warnings_level = logging.getLogger("py.warnings").level
    yield
    root.setLevel(level)
    root.handlers[:] = handlers
    logging.getLogger("py.warnings").setLevel(warnings_level)
    logging.captureWarnings(False)


@pytest.fixture
def one_thread():
    """Run a test with one intra-op torch thread: tiny tensors gain nothing from more, and the
    test machine's cores are shared (spinning OpenMP workers slow everything down)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def samples() -> Path:
    """The bundled ``samples/`` folder; never write to it."""
    return SAMPLES


@pytest.fixture(scope="session")
def test_key() -> str:
    return TEST_KEY


@pytest.fixture(scope="session")
def keyring():
    """The keyring of :data:`TEST_KEY`, stretched once (scrypt is slow on purpose)."""
    from protect.keys import derive_keyring

    return derive_keyring(TEST_KEY)


@pytest.fixture
def make_folder(tmp_path: Path) -> Callable[..., Path]:
    """``make_folder(name, classes=2, per_class=4, source="cifar10/train")``: copy the first
    ``per_class`` real images of the first ``classes`` class folders of ``samples/<source>`` into
    ``tmp_path/name/<class>/`` and return that folder."""

    def make(name: str = "in", classes: int = 2, per_class: int = 4, source: str = "cifar10/train") -> Path:
        root = tmp_path / name
        for class_dir in sorted(p for p in (SAMPLES / source).iterdir() if p.is_dir())[:classes]:
            (root / class_dir.name).mkdir(parents=True)
            for f in sorted(class_dir.glob("*.png"))[:per_class]:
                shutil.copyfile(f, root / class_dir.name / f.name)
        return root

    return make


@pytest.fixture(scope="session")
def ray_cluster():
    """One small local Ray cluster for the whole test session (2 CPUs, no dashboard, a 100 MB object
    store, quiet), shut down at the end; skips the test when Ray is not installed."""
    import logging
    import os

    try:
        import ray
    except ImportError:
        pytest.skip("ray is not installed (pip install 'protect[ray]')")
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2,
                 log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    if started:
        ray.shutdown()


#: The suite's longest modules, longest first (the sum of each module's ``pytest --durations=0``
#: times, one thread per worker; re-read 2026-12-07 after the UC and CUDA-verify cuts).
#: A parallel run (`make test`: one pytest-xdist worker per core, a module per worker at a time)
#: starts them first, so that no worker is left running one of them alone at the end.
LONG_MODULES = (
    "tests/perturbations/test_cuda_effect.py",
    "tests/perturbations/test_salm.py",
    "tests/verify/test_run.py",
    "tests/protect/test_ray_engine.py",
    "tests/cli/test_photo_quickstart.py",
    "tests/perturbations/test_uc.py",
    "tests/verify/test_verify_cuda.py",
    "tests/verify/test_distributed.py",
    "tests/protect/test_safety.py",
    "tests/verify/test_train.py",
    "tests/protect/test_resume.py",
    "tests/verify/test_verify_cli.py",
    "tests/protect/test_corpus.py",
    "tests/verify/test_verify_ray.py",
    "tests/protect/test_first_hour.py",
)


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # a serial run keeps the files' order
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))
