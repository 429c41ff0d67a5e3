"""``protect images --engine ray``: the per-file work in Ray actors gives the same files as a local run.

One local Ray cluster serves the session (``ray_cluster`` in tests/conftest.py); every Ray run
here starts its actors afresh (a few seconds each: a new process imports torch)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from cli.main import main
from protect import InputError, ProtectOptions, protect_folder
from tests.tiny import tree

#: Quick, offline parameters (as in tests/protect/test_fit_pass.py, SALM smaller still).
UC = {"surrogate": "cifar-resnet20", "clusters": 3, "steps": 3}
SALM = {"mask_ratio": 0.05, "rounds": 1, "steps": 2, "train_steps": 2, "surrogate": "tiny"}


def journal(record: Path) -> list[dict]:
    """The journal's file lines, in input order (the order they arrived in may differ)."""
    lines = [json.loads(line) for line in (record / "journal.jsonl").read_text().splitlines()[1:]]
    return sorted((line for line in lines if "path" in line), key=lambda line: line["path"])


def both(inp: Path, tmp: Path, keyring, **options):
    """A local run (one worker) and a Ray run (two actors) of the same folder with the same key."""
    local = protect_folder(inp, tmp / "local", keyring, ProtectOptions(progress=False, workers=1, **options))
    on_ray = protect_folder(inp, tmp / "ray", keyring,
                            ProtectOptions(progress=False, workers=2, engine="ray", **options))
    return local, on_ray


@pytest.mark.parametrize("method, params, source", [
    ("cuda", {}, "cifar10/train"),
    ("uc", UC, "cifar10/train"),
    ("salm", SALM, "breastmnist/train"),
], ids=["cuda-cifar", "uc-cifar", "salm-breastmnist"])
def test_ray_outputs_are_byte_identical_to_local(ray_cluster, make_folder, tmp_path, keyring, method, params,
                                                 source):
    inp = make_folder("in", classes=2, per_class=6, source=source)
    if method == "cuda":  # a broken file is reported the same way
        (inp / sorted(p.name for p in inp.iterdir())[0] / "0003-broken.png").write_bytes(b"not an image")
    local, on_ray = both(inp, tmp_path, keyring, method=method, params=dict(params))
    assert on_ray.workers == 2 and on_ray.done == local.done == 12
    assert tree(tmp_path / "ray") == tree(tmp_path / "local")
    assert journal(tmp_path / "ray.protect") == journal(tmp_path / "local.protect")
    assert on_ray.failures == local.failures and on_ray.failed == (1 if method == "cuda" else 0)
    assert on_ray.psnr_mean == local.psnr_mean and on_ray.ssim_mean == local.ssim_mean


def test_strict_stops_at_the_same_file_and_a_rerun_resumes(ray_cluster, make_folder, tmp_path, keyring):
    inp = make_folder("in", classes=2, per_class=6, source="breastmnist/train")
    (inp / "malignant" / "0000-broken.png").write_bytes(b"not an image")
    errors = []
    for engine in ("local", "ray"):
        with pytest.raises(InputError) as err:
            protect_folder(inp, tmp_path / engine, keyring,
                           ProtectOptions(progress=False, workers=2, engine=engine, strict=True))
        errors.append(str(err.value))
    assert errors[0] == errors[1] and "0000-broken.png" in errors[1] and "--strict" in errors[1]
    (inp / "malignant" / "0000-broken.png").unlink()
    protect_folder(inp, tmp_path / "ray", keyring, ProtectOptions(progress=False, workers=2, engine="ray"))
    protect_folder(inp, tmp_path / "local", keyring, ProtectOptions(progress=False, workers=1))
    assert tree(tmp_path / "ray") == tree(tmp_path / "local") and len(tree(tmp_path / "ray")) == 12


def test_engine_ray_without_ray_is_one_line_with_the_install_command(monkeypatch, tmp_path, capsys, samples):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    inp = tmp_path / "in"
    shutil.copytree(samples / "cifar10" / "train" / "airplane", inp / "airplane")
    for argv in (["images", str(inp), str(tmp_path / "out"), "--key", "k" * 24, "--engine", "ray"],
                 ["verify", str(inp), "--test", str(inp), "--engine", "ray", "--report", str(tmp_path / "r")]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "pip install 'protect[ray]'" in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "r").exists()
