"""verify.run.verify_folder end to end on the bundled CIFAR-10 samples, with a class-wise shortcut
as the "protection", the clean-baseline cache, the report files, and one-line errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import verify.run as vrun
from perturbations.errors import ConfigError, InputError, ProtectError
from verify.certificate import load_certificate
from verify.recipes import get_recipe

SAMPLES = Path(__file__).parents[2] / "samples" / "cifar10"
CLASSES = ["airplane", "frog"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _copy(split: str, dst: Path, n: int, classes: list[str] = CLASSES) -> Path:
    for c in classes:
        (dst / c).mkdir(parents=True)
        for f in sorted((SAMPLES / split / c).glob("*.png"))[:n]:
            shutil.copy(f, dst / c / f.name)
    return dst


def _shortcut(clean: Path, dst: Path, amplitude: int = 48) -> Path:
    """A strong class-wise shortcut: class 0 gets horizontal stripes, class 1 vertical stripes
    (+-amplitude/255, 2 px period), which survive crops and flips and are absent from the test set."""
    stripes = (np.arange(32) // 1 % 2 * 2 - 1) * amplitude
    patterns = [np.repeat(stripes[:, None], 32, 1), np.repeat(stripes[None, :], 32, 0)]
    for k, c in enumerate(sorted(p.name for p in clean.iterdir())):
        (dst / c).mkdir(parents=True)
        for f in sorted((clean / c).glob("*.png")):
            img = np.asarray(Image.open(f).convert("RGB")).astype(np.int16)
            out = np.clip(img + patterns[k][:, :, None], 0, 255).astype(np.uint8)
            Image.fromarray(out).save(dst / c / f.name)
    return dst


class Counter:
    """Wraps verify.run.train_cell and records (role label, training, defense) of each real training."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.real = vrun.train_cell

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs.get("label", ""))
        return self.real(*args, **kwargs)


def test_shortcut_protection_scores_clearly_lower_than_clean(tmp_path: Path) -> None:
    clean = _copy("train", tmp_path / "clean", 60)
    test = _copy("test", tmp_path / "test", 20)
    protected = _shortcut(clean, tmp_path / "protected")
    # the wider quick net: it picks up this 1-px stripe shortcut within 3 epochs on 120 images
    recipe = get_recipe("quick", model="fastcnn_wide", epochs=3, batch_size=16)
    report = tmp_path / "report"
    cert = vrun.verify_folder(protected, test, clean, tier=recipe, trainings="erm", defenses="none",
                              device="cpu", report_dir=report, cache_dir=tmp_path / "cache", progress=False)
    (cell,) = cert["cells"]
    assert (cell["training"], cell["defense"]) == ("erm", "none")
    clean_peak, prot_peak = cell["clean"]["peak_acc"], cell["protected"]["peak_acc"]
    assert clean_peak >= 0.7, cell["clean"]["curve"]  # chance is 0.5
    assert prot_peak <= clean_peak - 0.15, (cell["protected"]["curve"], cell["clean"]["curve"])
    assert cell["score"] >= 0.4 and cert["verdict"]["score"] == cell["score"]
    # the model did learn the protected data: its training accuracy is high (the shortcut)
    assert cell["protected"]["train_acc"] > 0.9
    assert cert["data"]["train"]["count"] == 120 and cert["data"]["test"]["count"] == 40
    assert cert["data"]["clean"]["sha256"] != cert["data"]["train"]["sha256"]
    # files: the certificate round-trips, the report names the worst cell, the plots exist
    assert load_certificate(report / "certificate.json")["verdict"] == cert["verdict"]
    md = (report / "report.md").read_text()
    assert "**Worst cell:** erm / none" in md and "Tier **quick**" in md
    for png in ("curves.png", "samples.png"):
        assert (report / png).read_bytes()[:4] == b"\x89PNG"


def test_clean_baseline_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean = _copy("train", tmp_path / "clean", 8)
    test = _copy("test", tmp_path / "test", 4)
    protected = _shortcut(clean, tmp_path / "protected")
    monkeypatch.setenv("PROTECT_CACHE", str(tmp_path / "cache"))  # the default cache_dir
    counter = Counter()
    monkeypatch.setattr(vrun, "train_cell", counter)
    recipe = get_recipe("quick", epochs=1, batch_size=8)
    kw = {"tier": recipe, "trainings": "erm", "defenses": "none,grayscale", "device": "cpu",
          "report_dir": False, "progress": False}

    first = vrun.verify_folder(protected, test, clean, **kw)
    assert len(counter.calls) == 3 and sum("clean" in c for c in counter.calls) == 1  # 1 baseline + 2 cells
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    assert not first["cells"][0]["clean"]["per_seed"][0]["cached"]

    counter.calls.clear()
    second = vrun.verify_folder(protected, test, clean, **kw)
    assert len(counter.calls) == 2 and not any("clean" in c for c in counter.calls)  # no retraining
    assert second["cells"][0]["clean"]["per_seed"][0]["cached"] is True
    assert second["cells"][0]["clean"]["curve"] == first["cells"][0]["clean"]["curve"]
    assert second["baseline_cache"]["hits"] == 1

    counter.calls.clear()  # another seed, or baselines per defense, are different keys
    vrun.verify_folder(protected, test, clean, **{**kw, "defenses": "none", "seeds": [1]})
    assert sum("clean" in c for c in counter.calls) == 1
    counter.calls.clear()
    third = vrun.verify_folder(protected, test, clean, **{**kw, "baseline_per_defense": True})
    assert sum("clean" in c for c in counter.calls) == 1  # 'none' is cached, 'grayscale' is new
    assert [c["clean"]["defense"] for c in third["cells"]] == ["none", "grayscale"]

    counter.calls.clear()  # without --clean: no baselines, no score
    nobase = vrun.verify_folder(protected, test, None, **{**kw, "defenses": "none"})
    assert len(counter.calls) == 1 and "clean" not in nobase["cells"][0] and nobase["verdict"]["score"] is None


def test_errors_are_one_line_and_early(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean = _copy("train", tmp_path / "clean", 2)
    test = _copy("test", tmp_path / "test", 2)
    other = _copy("test", tmp_path / "other", 2, classes=["airplane", "ship"])
    (tmp_path / "empty").mkdir()

    def no_training(*a, **k):
        raise AssertionError("training started before the inputs were checked")

    monkeypatch.setattr(vrun, "train_cell", no_training)
    cases = [
        ({"defenses": "none,sharpen"}, ConfigError, "unknown defense 'sharpen'"),
        ({"trainings": "erm,pgd"}, ConfigError, "unknown training regime 'pgd'"),
        ({"tier": "slow"}, ConfigError, "unknown tier 'slow'"),
        ({"model": "resnet9000"}, ConfigError, "unknown model 'resnet9000'"),
        ({"seeds": 0}, ConfigError, "seeds must be at least 1"),
        ({"test_dir": other}, InputError, r"class folders differ: protected has \['airplane', 'frog'\], test has \['airplane', 'ship'\]"),
        ({"clean_dir": other}, InputError, "class folders differ"),
        ({"test_dir": tmp_path / "empty"}, InputError, "no images"),
        ({"protected_dir": tmp_path / "missing"}, InputError, "not found"),
    ]
    for override, error, message in cases:
        args = {"protected_dir": clean, "test_dir": test, "clean_dir": None, "report_dir": False,
                "progress": False, "device": "cpu", **override}
        with pytest.raises(error, match=message) as info:
            vrun.verify_folder(**args)
        assert isinstance(info.value, ProtectError) and "\n" not in str(info.value)


def test_small_sets_train_for_min_steps_and_the_certificate_says_so(tmp_path: Path) -> None:
    from verify.data import load_folder

    train = load_folder(SAMPLES / "train", max_per_class=20).select_classes(CLASSES)  # 40 images
    test = load_folder(SAMPLES / "test", max_per_class=5).select_classes(CLASSES)
    recipe = get_recipe("quick", min_steps=30)  # 40 images -> batch 16, 2 steps per epoch -> 15 epochs
    cert = vrun.verify_sets(train, test, tier=recipe, trainings="erm", defenses="none", device="cpu",
                            cache_dir=False, progress=False)
    assert cert["epochs"] == 15 and cert["recipe"]["batch_size"] == 16
    assert "adapted to 40 training images" in cert["recipe"]["description"]
    assert len(cert["cells"][0]["protected"]["curve"]) == 15
