"""Resume: an interrupted run, rerun with the same command, ends byte-identical to an
uninterrupted one, with no temporary file left behind (simulated, kill -9 and Ctrl-C)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from protect import ProtectOptions, inspect_run, protect_folder
from protect.safefs import TMP_MARK
from tests.clitools import without_phase_lines
from tests.tiny import tree

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples"


def temporaries(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("*") if TMP_MARK in p.name]


def run(in_dir, out_dir, keyring, **options):
    return protect_folder(in_dir, out_dir, keyring, ProtectOptions(progress=False, **options))


# -- simulated interruption (in-process) -----------------------------------------------------
def test_resume_after_lost_outputs_and_journal_lines(tmp_path, keyring, make_folder):
    inp, out = make_folder(classes=2, per_class=8), tmp_path / "out"
    journal = tmp_path / "out.protect" / "journal.jsonl"
    first = run(inp, out, keyring, batch_size=4)
    assert (first.done, first.skipped) == (16, 0)
    complete = tree(out)

    lines = journal.read_text(encoding="utf-8").splitlines(keepends=True)
    entries = [json.loads(line) for line in lines[1:]]
    assert len(entries) == 16
    dropped = {e["output"] for e in entries[-4:]}  # journal lines lost in the crash
    deleted = {e["output"] for e in entries[:3]}  # outputs lost
    damaged = entries[5]["output"]  # an output changed since
    journal.write_text("".join(lines[:-4]) + lines[-4][: len(lines[-4]) // 2], encoding="utf-8")  # torn line
    for rel in deleted:
        (out / rel).unlink()
    (out / damaged).write_bytes(b"not the protected image")
    stale = out / "airplane" / f".0000.png{TMP_MARK}99999-1"
    stale.write_bytes(b"partial")

    again = run(inp, out, keyring, batch_size=4)
    redone = dropped | deleted | {damaged}
    assert (again.done, again.skipped, again.failed) == (len(redone), 16 - len(redone), 0)
    assert tree(out) == complete
    assert temporaries(out, tmp_path / "out.protect") == []
    manifest = json.loads((tmp_path / "out.protect" / "manifest.json").read_text(encoding="utf-8"))
    assert sorted(f["output"] for f in manifest["files"]) == sorted(complete)

    third = run(inp, out, keyring)
    assert (third.done, third.skipped) == (0, 16)


def test_changed_input_is_redone_and_overwrite_redoes_all(tmp_path, keyring, make_folder):
    inp, out = make_folder(classes=2, per_class=3), tmp_path / "out"
    run(inp, out, keyring)
    before = tree(out)
    shutil.copyfile(SAMPLES / "cifar10" / "train" / "airplane" / "0050.png", inp / "airplane" / "0001.png")
    again = run(inp, out, keyring)
    assert (again.done, again.skipped) == (1, 5)
    after = tree(out)
    assert after["airplane/0001.png"] != before["airplane/0001.png"]
    assert {k: v for k, v in after.items() if k != "airplane/0001.png"} == {
        k: v for k, v in before.items() if k != "airplane/0001.png"}
    redo = run(inp, out, keyring, overwrite=True)
    assert (redo.done, redo.skipped) == (6, 0) and tree(out) == after


# -- real interruptions (a subprocess) -------------------------------------------------------
@pytest.fixture(scope="module")
def big(tmp_path_factory, keyring):
    """300 real images in 3 class folders, and the outputs of an uninterrupted run."""
    root = tmp_path_factory.mktemp("big")
    inp = root / "in"
    for class_dir in sorted((SAMPLES / "cifar10" / "train").iterdir())[:3]:
        (inp / class_dir.name).mkdir(parents=True)
        for f in sorted(class_dir.glob("*.png"))[:100]:
            shutil.copyfile(f, inp / class_dir.name / f.name)
    assert len(list(inp.rglob("*.png"))) == 300
    summary = run(inp, root / "reference", keyring, batch_size=8)
    assert summary.done == 300
    return inp, tree(root / "reference")


def _start(in_dir: Path, out_dir: Path, key: str, cwd: Path, pause_after: int = 0,
           mark: Path | None = None) -> tuple[subprocess.Popen, list[str]]:
    args = ["images", str(in_dir), str(out_dir), "--key", key, "--batch-size", "8", "--workers", "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("PROTECT_KEY", "PROTECT_DEBUG")}
    env["PYTHONPATH"] = str(ROOT)
    if pause_after:
        env.update(PROTECT_TEST_PAUSE_AFTER=str(pause_after), PROTECT_TEST_PAUSE_MARK=str(mark))
    # A test runner started as a background job inherits SIGINT ignored, and Python keeps it
    # ignored; restore the default so the child installs its KeyboardInterrupt handler.
    proc = subprocess.Popen([sys.executable, "-m", "tests.paused_cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return proc, args


def _journalled(record: Path) -> int:
    try:
        return max(0, (record / "journal.jsonl").read_bytes().count(b"\n") - 1)  # minus the header
    except FileNotFoundError:
        return 0


@dataclass
class Interrupted:
    args: list[str]  # the command, to rerun it
    out: Path
    returncode: int
    stderr: str
    landed: dict[str, str]  # outputs right after the interruption
    journalled: int  # files in the journal at the interruption
    temporaries: list[Path]


@pytest.fixture(scope="module")
def interrupted(big, tmp_path_factory, test_key) -> dict[str, Interrupted]:
    """Two real runs (two worker processes each) started together; each pauses its journal after
    10 files (tests/paused_cli.py), then one gets kill -9 and the other Ctrl-C (SIGINT). The
    workers keep writing until their queue is full, so outputs land that the journal lacks."""
    inp, _ = big
    root = tmp_path_factory.mktemp("interrupted")
    runs = {name: (*_start(inp, root / name, test_key, root, 10, root / f"{name}.paused"), sig)
            for name, sig in (("kill", signal.SIGKILL), ("ctrl-c", signal.SIGINT))}
    pending = dict(runs)
    deadline = time.monotonic() + 180
    while pending and time.monotonic() < deadline:
        for name, (proc, args, sig) in list(pending.items()):
            if proc.poll() is not None:
                for p, _, _ in runs.values():
                    p.kill()
                pytest.fail(f"run '{name}' ended (rc {proc.returncode}) before it paused: {proc.stderr.read()}")
            if (root / f"{name}.paused").exists():
                time.sleep(0.3)  # let the workers fill their queue: outputs land unjournalled
                proc.send_signal(sig)
                del pending[name]
        time.sleep(0.02)
    for proc, _, _ in pending.values():
        proc.kill()
    assert not pending, f"no run paused in time: {sorted(pending)}"
    results = {}
    for name, (proc, args, _) in runs.items():
        _, stderr = proc.communicate(timeout=120)
        out = root / name
        landed = {k: v for k, v in tree(out).items() if TMP_MARK not in k}
        results[name] = Interrupted(args, out, proc.returncode, stderr, landed, _journalled(root / f"{name}.protect"),
                                    temporaries(out, root / f"{name}.protect"))
    return results


def _resume_in_process(args: list[str]) -> dict:
    result = CliRunner().invoke(cli, [*args, "--json"], env={"PROTECT_KEY": None})
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_kill_9_then_rerun_is_byte_identical(big, interrupted):
    _, reference = big
    run = interrupted["kill"]
    assert run.returncode == -signal.SIGKILL
    assert run.journalled >= 10 and 10 <= len(run.landed) < 300
    # whatever landed is complete: exactly the bytes of the uninterrupted run
    assert all(reference[k] == v for k, v in run.landed.items())

    summary = _resume_in_process(run.args)
    assert summary["skipped"] > 0 and summary["failed"] == 0
    assert summary["done"] + summary["skipped"] == 300
    assert tree(run.out) == reference
    assert temporaries(run.out, Path(summary["record_dir"])) == []


def test_ctrl_c_exits_130_with_one_line_and_resumes(big, interrupted):
    _, reference = big
    run = interrupted["ctrl-c"]
    assert run.returncode == 130, run.stderr
    assert "Traceback" not in run.stderr
    lines = without_phase_lines(run.stderr)  # the phase lines before the interrupt are progress, not errors
    assert len(lines) == 1 and lines[0].startswith("interrupted"), run.stderr
    assert "rerun the same command" in lines[0]
    assert run.temporaries == []
    assert 10 <= len(run.landed) < 300 and all(reference[k] == v for k, v in run.landed.items())
    assert inspect_run(run.out)["complete"] is False

    summary = _resume_in_process(run.args)
    assert summary["skipped"] >= run.journalled >= 10 and summary["failed"] == 0
    assert tree(run.out) == reference
    assert inspect_run(run.out, check_files=True)["check"]["ok"] and inspect_run(run.out)["complete"]


# -- kill -9 at random moments ---------------------------------------------------------------
def _kill_at_random_moments(big, tmp_path: Path, test_key: str, kills: int, seed: int) -> None:
    """Start the same command again and again, kill -9 it after a random delay (spread over start-up,
    fitting, writing and the manifest), then let it finish: the outputs equal an uninterrupted
    run's, byte for byte, and no temporary file is left."""
    import random

    inp, reference = big
    rng = random.Random(seed)
    out = tmp_path / "out"
    for _ in range(kills):
        proc, args = _start(inp, out, test_key, tmp_path)
        time.sleep(rng.uniform(0.5, 6.0))
        proc.kill()
        proc.communicate(timeout=60)
    summary = _resume_in_process(args)
    assert summary["failed"] == 0 and summary["done"] + summary["skipped"] == 300
    assert tree(out) == reference
    assert temporaries(out, tmp_path / "out.protect") == []
    assert inspect_run(out, check_files=True)["check"]["ok"]


def test_kill_9_at_three_random_moments(big, tmp_path, test_key):
    _kill_at_random_moments(big, tmp_path, test_key, kills=3, seed=1)


@pytest.mark.slow
def test_kill_9_at_twenty_random_moments(big, tmp_path, test_key):
    _kill_at_random_moments(big, tmp_path, test_key, kills=20, seed=2)
