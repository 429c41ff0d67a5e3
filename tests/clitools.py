"""Running the ``protect`` console entry point in-process from tests."""

from __future__ import annotations

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
