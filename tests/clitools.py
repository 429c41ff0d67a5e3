"""Running the ``protect`` console entry point from tests: in-process, or as a child that pauses at
a known point (tests/paused_cli.py) and is killed there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli.main import main


def call_main(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    """The console entry point in-process: (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


ROOT = Path(__file__).resolve().parents[1]
#: How the lines that ``protect images`` prints on stderr as each phase starts begin (not errors).
PHASE_PREFIXES = ("found ", "method: ", "fit: ", "protect: ")


def without_phase_lines(err: str) -> list[str]:
    """The non-empty stderr lines that are not phase lines (errors, warnings, the interrupt line)."""
    return [line for line in err.splitlines() if line.strip() and not line.startswith(PHASE_PREFIXES)]


def kill_when_paused(args: list[str], cwd: Path, **pause: str) -> None:
    """Run ``protect ARGS`` in a child that pauses at ``pause`` (``PROTECT_TEST_PAUSE_AFTER="4"`` or
    ``PROTECT_TEST_PAUSE_FIT="optimise:2"``, see tests/paused_cli.py), then kill -9 it there."""
    mark = cwd / "paused.mark"
    env = {k: v for k, v in os.environ.items() if k not in ("PROTECT_KEY", "PROTECT_DEBUG")}
    env.update(PYTHONPATH=str(ROOT), PROTECT_TEST_PAUSE_MARK=str(mark), **pause)
    proc = subprocess.Popen([sys.executable, "-m", "tests.paused_cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not mark.exists():
        proc.kill()
        pytest.fail(f"the run did not pause: {proc.communicate(timeout=5)}")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
