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


def test_every_import_of_the_python_api_section_resolves():
    import importlib
    import re

    api = README[README.index("## Python API"):README.index("## Methods")]
    imports = re.findall(r"^from ([\w.]+) import ([\w, ]+?)\s*(?:#.*)?$", api, flags=re.M)
    assert len(imports) >= 4
    for module, names in imports:
        mod = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(mod, name), f"README's Python API imports {name} from {module}, which has no such name"
