"""Nothing the user gave is ever modified or lost: links inside the output and record folders,
concurrent runs, resumes after edits (labels, removed or broken inputs), restored state, memory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import perturbations
from tests.methods import every_method, params
from cli.main import cli
from protect import InputError, ProtectOptions, RecordError, inspect_run, protect_folder
from protect.engine import parse_size
from protect.record import deps_digest
from protect.work import Budget

ROOT = Path(__file__).resolve().parents[2]


def run(in_dir, out_dir, keyring, **options):
    return protect_folder(in_dir, out_dir, keyring, ProtectOptions(progress=False, **options))


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` without following links: file hashes, link targets, folders."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


# -- links inside the output and record folders ------------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_linked_output_folder_never_writes_into_the_input(tmp_path, keyring, make_folder, overwrite):
    """OUT/airplane -> IN/airplane and OUT/automobile/0000.png -> IN/automobile/0000.png: a resumed
    or --overwrite run writes nothing through either link."""
    inp, out = make_folder(classes=2, per_class=3), tmp_path / "out"
    run(inp, out, keyring)
    shutil.rmtree(out / "airplane")
    (out / "airplane").symlink_to(inp / "airplane", target_is_directory=True)
    (out / "automobile" / "0000.png").unlink()
    (out / "automobile" / "0000.png").symlink_to(inp / "automobile" / "0000.png")
    before = snapshot(inp)
    summary = run(inp, out, keyring, overwrite=overwrite)
    assert snapshot(inp) == before
    failed = dict(summary.failures)
    assert sorted(failed) == ["airplane/0000.png", "airplane/0001.png", "airplane/0002.png"]
    assert all("symbolic link" in why for why in failed.values())
    # the linked file was replaced by a real output, its target untouched
    assert not (out / "automobile" / "0000.png").is_symlink()
    assert (out / "automobile" / "0000.png").read_bytes() != (inp / "automobile" / "0000.png").read_bytes()


def test_links_in_the_record_folder_are_never_followed(tmp_path, keyring, make_folder):
    inp, out = make_folder(classes=2, per_class=2), tmp_path / "out"
    run(inp, out, keyring)
    record = tmp_path / "out.protect"
    victim = tmp_path / "precious.bin"
    victim.write_bytes(b"keep me")
    for name in ("state.pt", "manifest.json"):
        (record / name).unlink()
        (record / name).symlink_to(victim)
    summary = run(inp, out, keyring)
    assert summary.failed == 0
    assert victim.read_bytes() == b"keep me"
    assert not (record / "state.pt").is_symlink() and not (record / "manifest.json").is_symlink()


# -- concurrent runs ---------------------------------------------------------------------------
def test_a_second_run_on_the_same_folder_is_refused_with_the_holders_pid(tmp_path, keyring, make_folder, test_key):
    inp, out = make_folder(classes=2, per_class=40), tmp_path / "out"
    mark = tmp_path / "paused"
    env = {k: v for k, v in os.environ.items() if k not in ("PROTECT_KEY", "PROTECT_DEBUG")}
    env.update(PYTHONPATH=str(ROOT), PROTECT_TEST_PAUSE_AFTER="5", PROTECT_TEST_PAUSE_MARK=str(mark))
    holder = subprocess.Popen([sys.executable, "-m", "tests.paused_cli", "images", str(inp), str(out), "--key",
                               test_key, "--workers", "1", "--batch-size", "4"], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not mark.exists():
            assert holder.poll() is None, holder.stderr.read() if holder.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        before = snapshot(out)
        with pytest.raises(RecordError, match=f"pid {holder.pid}"):
            run(inp, out, keyring)
        with pytest.raises(RecordError, match="another protect run"):
            run(inp, out, keyring, overwrite=True)
        assert snapshot(out) == before  # the refused runs touched nothing (not even temporaries)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=60)
    summary = run(inp, out, keyring)  # the lock died with its holder
    assert summary.failed == 0 and summary.done + summary.skipped == 80


# -- resumes after edits -----------------------------------------------------------------------
def test_a_changed_label_redoes_that_image(tmp_path, keyring, make_folder):
    inp = make_folder(classes=2, per_class=3)
    rels = sorted(str(p.relative_to(inp)) for p in inp.rglob("*.png"))
    labels = tmp_path / "labels.csv"

    def write_labels(flip: str | None) -> None:
        rows = [f"{r},{('cat' if r.startswith('airplane') else 'dog') if r != flip else 'dog'}" for r in rels]
        labels.write_text("path,label\n" + "\n".join(rows) + "\n", encoding="utf-8")

    write_labels(None)
    run(inp, tmp_path / "out", keyring, labels_csv=labels)
    first = snapshot(tmp_path / "out")
    write_labels(rels[0])  # an airplane relabelled dog: both classes still exist
    summary = run(inp, tmp_path / "out", keyring, labels_csv=labels)
    assert (summary.done, summary.skipped) == (1, 5)
    again = snapshot(tmp_path / "out")
    assert again[rels[0]] != first[rels[0]]
    run(inp, tmp_path / "fresh", keyring, labels_csv=labels)
    assert snapshot(tmp_path / "fresh") == again


@pytest.mark.parametrize("name", every_method())
def test_resumed_run_restores_the_fitted_parameters(tmp_path, keyring, make_folder, name):
    inp, out = make_folder(classes=2, per_class=3), tmp_path / "out"
    first = run(inp, out, keyring, method=name, params=params(name))
    again = run(inp, out, keyring, method=name, params=params(name))
    assert again.skipped == 6 and again.params == first.params
    assert inspect_run(out)["params"] == first.params


def test_removed_and_broken_inputs_are_orphans_until_pruned(tmp_path, keyring, make_folder):
    inp, out = make_folder(classes=2, per_class=3), tmp_path / "out"
    run(inp, out, keyring)
    (inp / "airplane" / "0000.png").unlink()
    (inp / "airplane" / "0001.png").write_bytes(b"now broken")
    summary = run(inp, out, keyring)
    assert summary.failed == 1
    assert {(o["path"], o["reason"]) for o in summary.orphans} == {
        ("airplane/0000.png", "input was removed"), ("airplane/0001.png", "input now fails")}
    info = inspect_run(out, check_files=True)
    assert {o["path"] for o in info["orphans"]} == {"airplane/0000.png", "airplane/0001.png"}
    assert info["files"] == 4 and info["check"]["ok"]
    assert (out / "airplane" / "0000.png").exists()  # kept until asked
    (out / "airplane" / "0002.png").unlink()  # also redo one
    pruned = run(inp, out, keyring, prune=True)
    assert pruned.pruned == 2 and pruned.orphans == [] and pruned.done == 1
    assert not (out / "airplane" / "0000.png").exists() and not (out / "airplane" / "0001.png").exists()
    info = inspect_run(out, check_files=True)
    assert info["orphans"] == [] and info["files"] == 4 and info["check"]["ok"]
    journal = (tmp_path / "out.protect" / "journal.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(journal) == 1 + 4


def test_prune_never_deletes_an_output_that_changed(tmp_path, keyring, make_folder):
    inp, out = make_folder(classes=2, per_class=2), tmp_path / "out"
    run(inp, out, keyring)
    (inp / "airplane" / "0000.png").unlink()
    (out / "airplane" / "0000.png").write_bytes(b"the user's own file now")
    summary = run(inp, out, keyring, prune=True)
    assert summary.pruned == 0 and (out / "airplane" / "0000.png").read_bytes() == b"the user's own file now"
    assert any("changed since it was written" in w for w in summary.warnings)


def test_output_dependencies_name_the_device_only_for_inexact_methods():
    base = {"method": "m", "params": {}, "state": "s", "out_format": "keep", "jpeg_quality": 95}
    assert deps_digest({**base, "compute": "exact"}) == deps_digest({**base, "compute": "exact"})
    assert deps_digest({**base, "compute": "cpu"}) != deps_digest({**base, "compute": "cuda"})
    assert perturbations.get("cuda").exact  # its outputs are the same bytes on every device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_and_cpu_give_the_same_bytes(tmp_path, keyring, make_folder):
    inp = make_folder(classes=3, per_class=5)
    run(inp, tmp_path / "cpu", keyring, device="cpu")
    run(inp, tmp_path / "gpu", keyring, device="cuda")
    assert snapshot(tmp_path / "cpu") == snapshot(tmp_path / "gpu")


# -- the record --------------------------------------------------------------------------------
def test_a_damaged_manifest_is_one_line_exit_2(tmp_path, keyring, make_folder):
    inp, out = make_folder(classes=2, per_class=2), tmp_path / "out"
    run(inp, out, keyring)
    (tmp_path / "out.protect" / "manifest.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(RecordError, match="manifest.json"):
        inspect_run(out)
    result = CliRunner().invoke(cli, ["inspect", str(out)])
    assert result.exit_code != 0  # CliRunner: the exception; the real CLI prints one line (test_cli)


def test_the_state_is_streamed_and_pinned(tmp_path, keyring, make_folder):
    inp, out = make_folder(classes=2, per_class=2), tmp_path / "out"
    run(inp, out, keyring)
    state = tmp_path / "out.protect" / "state.pt"
    loaded = torch.load(state, weights_only=True)
    assert {"filters", "blur", "bits"} <= set(loaded)
    lines = (tmp_path / "out.protect" / "journal.jsonl").read_text(encoding="utf-8").splitlines()[1:]
    deps = {json.loads(line)["deps"] for line in lines}
    assert len(deps) == 1 and len(next(iter(deps))) == 16


# -- memory ------------------------------------------------------------------------------------
def test_memory_sizes_parse():
    assert parse_size("2GB") == 2 << 30 and parse_size("1.5g") == 3 << 29 and parse_size("800MiB") == 800 << 20
    assert parse_size(64 << 20) == 64 << 20
    for bad in ("lots", "2XB", "1MB"):
        with pytest.raises(Exception, match="memory"):
            parse_size(bad)


def test_budget_admits_one_oversized_item_alone_and_never_overcommits():
    b = Budget(100)
    assert b.try_acquire(60) and not b.try_acquire(50) and b.try_acquire(40)
    b.release(100)
    assert b.try_acquire(500)  # alone: admitted, so a huge photo still gets protected
    assert not b.try_acquire(1)
    b.release(500)


def test_a_tiny_memory_budget_changes_nothing_but_speed(tmp_path, keyring):
    """Photos larger than the whole budget run one at a time, in strips, with the same bytes."""
    inp = tmp_path / "in"
    (inp / "a").mkdir(parents=True)
    (inp / "b").mkdir()
    from PIL import Image

    g = np.random.default_rng(0)
    for i in range(4):
        arr = g.integers(0, 256, (700 + 10 * i, 900, 3), dtype=np.uint8)
        Image.fromarray(arr).save(inp / "ab"[i % 2] / f"p{i}.png")
    short = {"steps": 5}  # the photo default (UC under the floor), its fit kept short: the strips are tested
    run(inp, tmp_path / "small", keyring, memory=16 << 20, workers=2, params=short)
    run(inp, tmp_path / "big", keyring, memory=4 << 30, workers=1, batch_size=4, params=short)
    assert snapshot(tmp_path / "small") == snapshot(tmp_path / "big")


def test_workers_and_in_process_runs_give_the_same_bytes(tmp_path, keyring, make_folder):
    inp = make_folder(classes=3, per_class=6)
    run(inp, tmp_path / "one", keyring, workers=1)
    run(inp, tmp_path / "two", keyring, workers=2, batch_size=5)
    assert snapshot(tmp_path / "one") == snapshot(tmp_path / "two")


def test_spawned_workers_give_the_same_bytes(tmp_path, keyring, make_folder, monkeypatch):
    """The start method used with a GPU (and on macOS/Windows): workers import everything anew."""
    import protect.engine as engine

    inp = make_folder(classes=2, per_class=4)
    run(inp, tmp_path / "fork", keyring, workers=2)
    real = engine.LocalEngine.__init__

    def spawning(self, spec, workers, start_method=None):
        real(self, spec, workers, "spawn")

    monkeypatch.setattr(engine.LocalEngine, "__init__", spawning)
    run(inp, tmp_path / "spawn", keyring, workers=2)
    assert snapshot(tmp_path / "fork") == snapshot(tmp_path / "spawn")


def test_strict_stops_with_workers_too(tmp_path, keyring, make_folder):
    inp = make_folder(classes=2, per_class=30)
    (inp / "airplane" / "0000.png").write_bytes(b"broken")
    with pytest.raises(InputError, match="stopped by --strict"):
        run(inp, tmp_path / "out", keyring, strict=True, workers=2)
    info = inspect_run(tmp_path / "out", check_files=True)
    assert info["complete"] is False and info["check"]["ok"]

