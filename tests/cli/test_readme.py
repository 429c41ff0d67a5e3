"""The README's CLI reference names every option of every command (it is the user's manual)."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from cli.main import cli

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
REFERENCE = README[README.index("## CLI reference"):README.index("## Python API")]


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_option_is_in_the_cli_reference(name):
    command = cli.commands[name]
    assert f"protect {name}" in REFERENCE, f"`protect {name}` is missing from README's CLI reference"
    missing = [opt for p in command.params if isinstance(p, click.Option) and not p.hidden
               for opt in p.opts if opt.startswith("--") and opt not in ("--help",) and opt not in REFERENCE]
    assert not missing, f"protect {name}: README's CLI reference lacks {missing}"
