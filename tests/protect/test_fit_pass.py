"""The fit pass in the pipeline: label-agnostic methods (Unlearnable Clusters, clustered CUDA) on
folders without labels, the fitted state in the record, --state reuse, resume during the fit."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cli.main import cli
from protect import ProtectOptions, protect_folder
from protect.discover import discover
from protect.fitpass import fit_data
from tests.clitools import kill_when_paused
from tests.tiny import tree

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "cifar10" / "train"
UC = {"surrogate": "cifar-resnet20", "clusters": 3, "steps": 4, "batch": 4}


def flat_folder(root: Path, per_class: int = 4, classes: int = 4, prefix: str = "") -> Path:
    """Real CIFAR images without class folders (an unlabelled archive)."""
    root.mkdir(parents=True, exist_ok=True)
    for d in sorted(p for p in SAMPLES.iterdir() if p.is_dir())[:classes]:
        for f in sorted(d.glob("*.png"))[:per_class]:
            shutil.copyfile(f, root / f"{prefix}{d.name}_{f.name}")
    return root


def run(in_dir, out_dir, keyring, **options):
    return protect_folder(in_dir, out_dir, keyring, ProtectOptions(progress=False, workers=1, **options))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int32)


@pytest.fixture(scope="module")
def uc_run(tmp_path_factory):
    from protect.keys import derive_keyring

    keyring = derive_keyring("fit-pass-tests-key-0123456789")
    root = tmp_path_factory.mktemp("uc")
    inp = flat_folder(root / "in")
    summary = run(inp, root / "out", keyring, method="uc", params=dict(UC))
    return keyring, root, inp, summary


def test_uc_protects_an_unlabelled_folder_within_eps(uc_run):
    keyring, root, inp, summary = uc_run
    assert summary.done == 16 and summary.failed == 0
    diffs = [np.abs(pixels(root / "out" / f.name) - pixels(f)).max() for f in sorted(inp.iterdir())]
    assert max(diffs) <= 16 and max(diffs) >= 8  # within 16/255, and really perturbed
    header = json.loads((root / "out.protect" / "journal.jsonl").read_text().splitlines()[0])["header"]
    assert header["method"] == "uc" and header["resolved_params"]["surrogate_sha256"]
    state = torch.load(root / "out.protect" / "state.pt", weights_only=True)
    assert state["deltas"].shape == (3, 3, 32, 32)


def test_rerun_skips_everything_and_a_new_image_joins_without_refit(uc_run, tmp_path):
    keyring, root, inp, _ = uc_run
    work = tmp_path / "w"
    shutil.copytree(inp, work / "in")
    shutil.copytree(root / "out", work / "out")
    shutil.copytree(root / "out.protect", work / "out.protect")
    before = torch.load(work / "out.protect" / "state.pt", weights_only=True)
    again = run(work / "in", work / "out", keyring, method="uc", params=dict(UC))
    assert again.skipped == 16 and again.done == 0
    extra = sorted(SAMPLES.glob("truck/*.png"))[0]
    shutil.copyfile(extra, work / "in" / "new_truck.png")
    third = run(work / "in", work / "out", keyring, method="uc", params=dict(UC))
    assert third.done == 1 and third.skipped == 16
    after = torch.load(work / "out.protect" / "state.pt", weights_only=True)
    assert torch.equal(after["deltas"], before["deltas"])  # never refitted
    assert after["table_hashes"].numel() == 17


def test_state_reuse_gives_the_same_output_for_an_image_already_protected(uc_run, tmp_path):
    keyring, root, inp, _ = uc_run
    new = tmp_path / "more"
    new.mkdir()
    names = sorted(p.name for p in inp.iterdir())[::3]
    for n in names:
        shutil.copyfile(inp / n, new / f"again_{n}")
    for f in sorted(SAMPLES.glob("ship/*.png"))[:3]:
        shutil.copyfile(f, new / f"ship_{f.name}")
    summary = run(new, tmp_path / "more-out", keyring, state_from=root / "out.protect")
    assert summary.done == len(names) + 3 and summary.method == "uc"
    same = sum((tmp_path / "more-out" / f"again_{n}").read_bytes() == (root / "out" / n).read_bytes() for n in names)
    assert same >= len(names) - 1  # nearest centre = the cluster K-means gave (a near-tie may flip)


def test_state_reuse_needs_the_same_key(uc_run, tmp_path):
    from protect.errors import RecordError
    from protect.keys import derive_keyring

    _, root, inp, _ = uc_run
    with pytest.raises(RecordError, match="different key"):
        run(inp, tmp_path / "o", derive_keyring("another-key-0123456789abc"), state_from=root / "out.protect")


def test_label_agnostic_cuda_on_a_flat_folder(tmp_path, keyring):
    inp = flat_folder(tmp_path / "in", per_class=3)
    summary = run(inp, tmp_path / "out", keyring, method="cuda",
                  params={"clusters": 3, "surrogate": "cifar-resnet20"})
    assert summary.done == 12 and summary.failed == 0
    assert summary.params["clusters"] == 3 and summary.params["num_classes"] == 3
    state = torch.load(tmp_path / "out.protect" / "state.pt", weights_only=True)
    assert state["filters"].shape[0] == 3 and state["table_clusters"].numel() == 12


def test_class_wise_cuda_without_labels_points_to_the_label_free_options(tmp_path, keyring):
    from protect.errors import InputError

    inp = flat_folder(tmp_path / "in", per_class=1)
    with pytest.raises(InputError, match="--clusters"):
        run(inp, tmp_path / "out", keyring, method="cuda")


def test_fit_batches_resize_mixed_images_and_skip_unreadable_ones(tmp_path):
    inp = tmp_path / "mixed"
    inp.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(inp / "a.png")
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(inp / "b.png")  # grey
    Image.fromarray(rng.integers(0, 65536, (33, 17), dtype=np.uint16)).save(inp / "c.png")  # 16-bit grey
    (inp / "d.png").write_bytes(b"not a png")
    data = fit_data(discover(inp), max_pixels=10**8, threads=2)
    got = list(data.batches((32, 32), channels=3, batch_size=2))
    assert [idx for _, idx in got] == [[0, 1], [2]]
    for images, _ in got:
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
        assert float(images.min()) >= 0 and float(images.max()) <= 1
    only = list(data.batches((8, 8), channels=1, only=[2]))
    assert only[0][0].shape == (1, 1, 8, 8) and only[0][1] == [2]


def test_missing_clip_weights_offline_is_one_line_within_seconds(tmp_path, capsys, monkeypatch):
    from cli.main import main

    inp = flat_folder(tmp_path / "in", per_class=1)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        main(["images", str(inp), str(tmp_path / "out"), "--key", "k" * 24, "--method", "uc",
              "--surrogate", "clip:RN50/openai", "-q"])
    assert time.monotonic() - start < 20
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "weights" in lines[0], err


def test_kill_9_during_the_fit_then_rerun_is_byte_identical(uc_run, tmp_path):
    """The run is paused inside the optimisation, killed, and rerun: same bytes as the reference."""
    _, root, inp, _ = uc_run
    key = "fit-pass-tests-key-0123456789"
    out = tmp_path / "out"
    args = ["images", str(inp), str(out), "--key", key, "--method", "uc", "--workers", "1",
            "--surrogate", "cifar-resnet20", "--clusters", "3", "--param", "steps=4", "--param", "batch=4"]
    kill_when_paused(args, tmp_path, PROTECT_TEST_PAUSE_FIT="optimise:2")
    assert not any(out.iterdir()) if out.exists() else True  # nothing written before the fit ends
    result = CliRunner().invoke(cli, [*args, "-q"], env={"PROTECT_KEY": None})
    assert result.exit_code == 0, result.output
    assert tree(out) == tree(root / "out")


def test_salm_protects_a_grey_medical_folder_sparsely(tmp_path, keyring, make_folder):
    inp = make_folder("breast", classes=2, per_class=8, source="breastmnist/train")
    summary = run(inp, tmp_path / "out", keyring, method="salm",
                  params={"mask_ratio": 0.05, "rounds": 2, "steps": 3, "train_steps": 3, "surrogate": "tiny"})
    assert summary.done == 16 and summary.failed == 0
    k = int(np.ceil(0.05 * 28 * 28))
    for f in sorted(inp.rglob("*.png")):
        out = Image.open(tmp_path / "out" / f.relative_to(inp))
        assert out.mode == "L"  # grey stays grey
        d = np.abs(np.asarray(out).astype(int) - pixels(f))
        assert d.max() <= 8 and (d > 0).sum() <= k
