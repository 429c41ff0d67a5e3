"""protect images --preview N: a before/after sheet of N images, and nothing else anywhere."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from click.testing import CliRunner
from PIL import Image

from cli.main import cli
from protect.discover import discover
from protect.preview import THUMB, pick_preview

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_the_preview_spreads_over_the_folder_and_over_its_classes():
    ds = discover(SAMPLES / "cifar10" / "train")
    picked = pick_preview(ds, 10)
    assert len(picked) == 10 and picked == sorted(picked)
    assert len({ds.entries[i].label for i in picked}) == len(ds.classes)  # every class of the sorted list
    assert pick_preview(ds, 10 ** 6) == list(range(len(ds.entries)))


def test_preview_writes_one_sheet_and_nothing_else(tmp_path, test_key):
    inp = tmp_path / "in"
    for cls, name in (("a", "kodim05.png"), ("b", "kodim09.png")):
        (inp / cls).mkdir(parents=True)
        with Image.open(SAMPLES / "kodak" / name) as im:
            for i, box in enumerate([(0, 0, 256, 192), (100, 100, 356, 356)]):
                im.convert("RGB").crop(box).save(inp / cls / f"{i}.jpg", quality=90)
    before = tree_digest(inp)
    tmp_before = set(Path(tempfile.gettempdir()).glob("protect-preview-*"))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["images", "--key", test_key, "--method", "cuda", "--preview", "3", "--device",
                                      "cpu", "--workers", "1", "--json", str(inp), str(out)], env={"PROTECT_KEY": None})
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert len(shown["images"]) == 3 and shown["sheet"] == str(tmp_path / "out.preview.png")
    assert all(img["delta_e"] > 0 and img["psnr"] > 5 for img in shown["images"])
    with Image.open(shown["sheet"]) as sheet:
        assert sheet.width >= 2 * THUMB and sheet.height > 3 * 100  # three rows of panels
    # nothing else: no output folder, no record, no temporary folder left, the input untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out.preview.png"]
    assert set(Path(tempfile.gettempdir()).glob("protect-preview-*")) == tmp_before
    assert tree_digest(inp) == before
    text = CliRunner().invoke(cli, ["images", "--key", test_key, "--method", "cuda", "--preview", "2", "--device",
                                    "cpu", "--workers", "1", str(inp), str(out)], env={"PROTECT_KEY": None})
    assert text.exit_code == 0 and "nothing was written to" in text.output and "dE" in text.output
    assert not out.exists() and not os.path.exists(str(out) + ".protect")
