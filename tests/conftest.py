"""Shared fixtures: the bundled samples (read-only), one keyring per session, tiny image folders."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

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
