"""``protect methods`` (cli/methods_cmd.py): budgets as fractions of 255, what each method needs,
what the docs measured; ``--json`` keeps the raw values."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli.methods_cmd import methods


@pytest.fixture
def no_clip(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _blocks(text: str) -> dict[str, str]:
    blocks: dict[str, list[str]] = {}
    name = ""
    for line in text.splitlines():
        if not line.startswith(" ") and ": " in line and not line.startswith("compose"):
            name = line.split(":", 1)[0]
        blocks.setdefault(name, []).append(line)
    return {k: "\n".join(v) for k, v in blocks.items()}


def test_text_prints_budgets_as_fractions_and_what_each_method_needs(no_clip):
    result = CliRunner().invoke(methods, [])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("cuda: ") and "filter_size=auto" in out
    assert "0.0627" not in out and "0.0313" not in out and "0.00313" not in out  # no raw budget floats
    blocks = _blocks(out)
    assert "eps=16/255" in blocks["uc"] and "eps=8/255" in blocks["salm"] and "step_size=0.8/255" in blocks["salm"]
    assert "needs labels: no" in blocks["uc"] and "needs labels: yes" in blocks["salm"]
    assert "needs labels: yes (not with --clusters K" in blocks["cuda"]
    assert "surrogate=auto (here: cifar-resnet20)" in blocks["uc"]
    assert "weights: a surrogate: clip:RN50/openai" in blocks["uc"] and "bundled cifar-resnet20" in blocks["uc"]
    assert "weights: none" in blocks["cuda"] and "weights: none" in blocks["salm"]
    for name in ("cuda", "salm", "uc"):
        assert "GPU: optional" in blocks[name]
        assert "measured: PSNR" in blocks[name] and "per image" in blocks[name]
        assert "[docs/BENCHMARKS.md: " in blocks[name]
    assert "fewest images: 2 " in blocks["uc"] and "fewest images: 1 " in blocks["cuda"]
    assert "PSNR 26.4 dB, 2.8 ms per image (355 images/s)" in blocks["uc"]
    assert out.rstrip().splitlines()[-1].startswith("compose methods with '+'")


def test_json_keeps_machine_values_and_adds_the_new_fields(no_clip):
    result = CliRunner().invoke(methods, ["--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    uc, cuda = rows["uc"], rows["cuda"]
    assert uc["defaults"]["eps"] == pytest.approx(16 / 255) and uc["defaults"]["surrogate"] is None
    assert uc["resolved_defaults"]["surrogate"] == "cifar-resnet20"
    assert uc["needs_labels"] is False and cuda["needs_labels"] is True and cuda["defaults"]["padding"] == "zero"
    assert uc["weights"]["spec"] == "cifar-resnet20" and uc["weights"]["bundled"] is True
    assert uc["weights"]["present"] is True
    assert uc["gpu"] == "optional" and uc["min_images"] == 2
    first = uc["measured"][0]
    assert first["psnr_db"] == 26.4 and first["images_per_second"] == 355.0
    assert first["source"].startswith("docs/BENCHMARKS.md: ")
    assert "Sadasivan" in cuda["paper"]
