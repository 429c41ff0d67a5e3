"""`protect verify` as a user runs it, in a real subprocess: killed with SIGKILL half-way, then the
same command again, with stderr a pipe (a CI log): a line when a cell starts training and one when it
ends, the run's total after every cell (done / all, elapsed, time left), no progress bars.

The command is ``python -m cli.main`` from this checkout (what the ``protect`` console script runs),
so the test exercises the code under test wherever the package is installed from. About 15 s."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.clitools import call_main
from tests.tiny import copy_classes

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["airplane", "frog"]
CELL_LINE = re.compile(r"^\[(\d)/4\] (clean|protected) erm/(\w+) seed 0: (.*)$")


def _copy(split: str, dst: Path, n: int) -> Path:
    return copy_classes(split, dst, n, tuple(CLASSES))


def _command(tmp: Path) -> list[str]:
    # 4 cells: the clean erm/none baseline, then protected erm x {none, grayscale, cutout}; ~0.5 s each
    return [sys.executable, "-m", "cli.main", "verify", str(tmp / "train"), "--test", str(tmp / "test"),
            "--clean", str(tmp / "train"), "--training", "erm", "--defenses", "none,grayscale,cutout",
            "--epochs", "20", "--seeds", "1", "--device", "cpu", "--no-cache", "--report", str(tmp / "report")]


def test_kill_9_then_the_same_command_trains_only_the_missing_cells(tmp_path: Path) -> None:
    _copy("train", tmp_path / "train", 16)
    _copy("test", tmp_path / "test", 4)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PROTECT_CACHE": str(tmp_path / "cache")}
    cells = tmp_path / "report" / "cells"
    first = subprocess.Popen(_command(tmp_path), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(cells.glob("*.json")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if first.poll() is not None:
        _, err = first.communicate()
        pytest.fail(f"verify ended (code {first.returncode}) before the kill: {err.decode()[-2000:]}")
    first.send_signal(signal.SIGKILL)  # no chance to clean up: what a lost machine looks like
    first.communicate()
    assert first.returncode == -signal.SIGKILL
    saved = len(list(cells.glob("*.json")))
    if not 1 <= saved < 4:
        pytest.skip(f"the kill did not land between cells ({saved} of 4 saved); machine too slow or too fast")
    assert not (tmp_path / "report" / "certificate.json").exists()

    second = subprocess.run(_command(tmp_path), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    # stderr is a pipe: no tqdm bars (no carriage returns), one line per cell, reused ones first
    assert "\r" not in second.stderr and "it/s" not in second.stderr
    every = [m.groups() for m in map(CELL_LINE.match, second.stderr.splitlines()) if m]
    starts = [n for n, _, _, text in every if text == "training fastcnn (20 epochs on 32 images)"]
    lines = [g for g in every if g[0] not in starts or g[3] != "training fastcnn (20 epochs on 32 images)"]
    assert [int(n) for n, *_ in lines] == [1, 2, 3, 4], second.stderr
    reused = [n for n, _, _, text in lines if text.startswith("finished before, reused")]
    trained = [n for n, _, _, text in lines
               if re.match(r"accuracy [\d.]+% at epoch \d+ \(chosen on validation\), final [\d.]+%, train [\d.]+% "
                           r"\(\d+ s\)$", text)]
    assert reused == [str(i) for i in range(1, saved + 1)] and len(reused) + len(trained) == 4, second.stderr
    assert starts == trained, second.stderr  # every trained cell said when it started
    # the run's total after every cell: done of all, elapsed, the time left for the whole run
    totals = re.findall(r"^verify: (\d)/4 cells done(.*)$", second.stderr, re.M)
    assert [int(n) for n, _ in totals] == [1, 2, 3, 4], second.stderr
    assert all(re.fullmatch(r", \d+ s elapsed, (about \d+ s left if the rest train|estimate after the first "
                            r"trained cell)", rest) for _, rest in totals[:-1]), second.stderr
    assert re.fullmatch(r" in \d+ s", totals[-1][1]), second.stderr
    if trained and int(trained[0]) < 4:  # after the first trained cell, an estimate of the rest
        assert "left if the rest train" in totals[int(trained[0]) - 1][1], second.stderr
    for phase in ("verify: loaded the protected folder", "verify: loaded the test folder",
                  "verify: loaded the clean folder", "verify: 4 cells (1 clean baseline(s), 3 protected)",
                  "verify: writing the certificate and report to", "verify: finished in"):
        assert phase in second.stderr, second.stderr
    assert f"resumed: {saved} finished cell(s) reused, {4 - saved} trained" in second.stdout
    assert "chance 50.0 %: the majority-class rate of the test set" in second.stdout
    cert = json.loads((tmp_path / "report" / "certificate.json").read_text())
    assert cert["resume"]["reused"] == saved and cert["resume"]["trained"] == 4 - saved
    assert len(list(cells.glob("*.json"))) == 4


def _dicom(name: str) -> bytes:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)  # never a pattern: get_testdata_files hangs offline
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    return Path(path).read_bytes()


def test_verify_a_folder_of_dicom_files(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    """`protect verify` reads .dcm files as protect writes them (stored values scaled by their levels):
    class folders a/ and b/ of pydicom's 64 x 64 MR samples give a certificate; a 128 x 128 CT slice
    among them is refused in one line, as any image of another size is. The same files train and
    test here (three encodings of one scan), which verify refuses unless --allow-overlap: it finds
    the overlap by pixels, across encodings. In-process (the exit codes are the console script's;
    the subprocess is the kill test's business above): about 3 s."""
    names = ["MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm"]
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for name in names:
                (tmp_path / split / c / name).write_bytes(_dicom(name))
    monkeypatch.setenv("PROTECT_CACHE", str(tmp_path / "cache"))
    args = ["verify", tmp_path / "train", "--test", tmp_path / "test", "--training", "erm", "--defenses", "none",
            "--epochs", "2", "--seeds", "1", "--device", "cpu", "--no-cache", "--report", tmp_path / "report"]
    code, _, err = call_main(capsys, *args)
    assert code == 2 and "test image a/MR_small.dcm is also in the protected training folder" in err
    assert "--allow-overlap" in err and "Traceback" not in err
    args.append("--allow-overlap")
    code, out, err = call_main(capsys, *args)
    assert code == 0, err
    cert = json.loads((tmp_path / "report" / "certificate.json").read_text())
    assert cert["data"]["train"]["shape"] == [1, 64, 64] and cert["data"]["train"]["count"] == 6
    assert len(cert["cells"]) == 1 and len(cert["cells"][0]["protected"]["curve"]) == 2  # erm/none, 2 epochs
    assert cert["cells"][0]["attacker"]["learner"] == "fastcnn"
    assert "best attacker: erm + none (fastcnn), " in out, out  # who attacked, in the summary

    (tmp_path / "train" / "b" / "CT_small.dcm").write_bytes(_dicom("CT_small.dcm"))
    code, _, err = call_main(capsys, *args)
    assert code != 0
    assert "b/CT_small.dcm" in err and "128x128 grayscale" in err
    assert len(err.strip().splitlines()) == 1, err
