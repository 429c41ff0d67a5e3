"""The ``protect`` CLI with its journal paused after N protected files, for interruption tests.

``PROTECT_TEST_PAUSE_AFTER=N`` (or ``PROTECT_TEST_PAUSE_FIT=STAGE:N``, see below) and ``PROTECT_TEST_PAUSE_MARK=FILE``: once N files are journalled the
run writes FILE and sleeps until it is killed or interrupted, so a test can interrupt it at a known
point instead of racing a timer. Test-only: it patches the pipeline from outside.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import protect.pipeline as pipeline
from cli.main import main

_N = int(os.environ.get("PROTECT_TEST_PAUSE_AFTER", "0"))
_MARK = Path(os.environ.get("PROTECT_TEST_PAUSE_MARK", os.devnull))
_on_results = pipeline._Run.on_results


def _paused(self, results):  # type: ignore[no-untyped-def]
    _on_results(self, results)
    if _N and self.summary.done >= _N and not _MARK.exists():  # pause once
        self.record.flush()
        _MARK.write_text(str(self.summary.done), encoding="utf-8")
        while True:
            time.sleep(0.5)


pipeline._Run.on_results = _paused

# PROTECT_TEST_PAUSE_FIT=STAGE:N pauses the same way once a method's fit reports N done in STAGE
# (e.g. "optimise:3"), to interrupt a run while it fits.
_FIT = os.environ.get("PROTECT_TEST_PAUSE_FIT", "")
_fit_data = pipeline.fit_data


def _paused_fit_data(*args, **kwargs):  # type: ignore[no-untyped-def]
    data = _fit_data(*args, **kwargs)
    stage, _, count = _FIT.partition(":")
    report = data.progress

    def progress(name: str, done: int, total: int) -> None:
        if report is not None:
            report(name, done, total)
        if name == stage and done >= int(count or 1) and not _MARK.exists():
            _MARK.write_text(f"{name}:{done}", encoding="utf-8")
            while True:
                time.sleep(0.5)

    data.progress = progress
    return data


if _FIT:
    pipeline.fit_data = _paused_fit_data

if __name__ == "__main__":
    main(sys.argv[1:])
