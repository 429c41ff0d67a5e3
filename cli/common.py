"""What the CLI commands share: logging through tqdm, the key options."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click


class _TqdmHandler(logging.Handler):
    """Log lines as ``warning: ...`` on stderr without breaking a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(f"{record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def setup_logging(quiet: bool) -> None:
    """Warnings (errors only with ``quiet``) as one ``level: message`` line on stderr, bar-safe."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _TqdmHandler):
            root.removeHandler(h)
    handler = _TqdmHandler()
    root.addHandler(handler)
    root.setLevel(logging.ERROR if quiet else logging.WARNING)
    logging.captureWarnings(True)  # library warnings (Pillow's, say) go through the same line format
    logging.getLogger("py.warnings").setLevel(logging.ERROR)  # per-file decoder chatter: the summary says what failed


key_options = [
    click.option("--key", "key", metavar="SECRET", help="The secret key (visible in shell history: prefer --key-file)."),
    click.option("--key-file", type=click.Path(dir_okay=False), help="File whose first line is the key."),
]


def with_key(fn: Any) -> Any:
    for option in reversed(key_options):
        fn = option(fn)
    return fn
