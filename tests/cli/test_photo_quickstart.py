"""README's photo Quickstart, run exactly as written on a photographer's flat folder, offline:
mixed-size JPEGs (one with EXIF rotation), a PNG, an iPhone HEIC, a camera RAW and the junk a real
folder holds (issue 17)."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.clitools import call_main

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def quickstart_commands() -> list[list[str]]:
    """The commands of the block after the ``photo-quickstart`` marker, comments dropped."""
    block = README.split("<!-- photo-quickstart", 1)[1].split("```", 2)[1]
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith("protect ")]


def photo(size: tuple[int, int], seed: int) -> Image.Image:
    """A smooth photo-like picture (gradients and a few discs), so JPEG behaves as on photos."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([np.sin(xx * 3 + rng.uniform(0, 6)), np.cos(yy * 4 + rng.uniform(0, 6)),
                     np.sin((xx + yy) * 2 + rng.uniform(0, 6))], -1)
    img = (base * 0.35 + 0.5) * 255 + rng.normal(0, 4, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_portfolio(root: Path) -> dict[str, str]:
    """The folder of the issue, smaller: {photo file: kind}."""
    root.mkdir()
    photo((192, 128), 0).save(root / "beach.jpg", quality=90)
    photo((128, 192), 1).save(root / "portrait.jpg", quality=90)
    photo((160, 120), 2).save(root / "wide.JPG", quality=90)
    rotated = photo((240, 180), 3)
    exif = rotated.getexif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    rotated.save(root / "camera.jpg", quality=92, exif=exif.tobytes())
    photo((100, 100), 4).save(root / "logo.png")
    kinds = {"beach.jpg": "jpeg", "portrait.jpg": "jpeg", "wide.JPG": "jpeg", "camera.jpg": "exif", "logo.png": "png"}
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
        photo((128, 96), 5).save(root / "IMG_0001.HEIC", quality=90)
        kinds["IMG_0001.HEIC"] = "heic"
    except (ImportError, OSError, KeyError, ValueError):  # no HEIF encoder here: the rest still runs
        pass
    (root / "DSC_0002.NEF").write_bytes(b"II*\x00 not really a raw file")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "._beach.jpg").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (root / "notes.txt").write_text("shot list\n")
    return kinds


def upright(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB")).astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a / 255 - b / 255) ** 2)
    return 100.0 if mse == 0 else min(100.0, -10 * np.log10(mse))


def test_the_readme_photo_quickstart_works_offline_as_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PROTECT_KEY", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    kinds = make_portfolio(tmp_path / "photos")
    before = {p.name: p.read_bytes() for p in (tmp_path / "photos").iterdir()}
    commands = quickstart_commands()
    assert [c[:2] for c in commands] == [["protect", "keygen"], ["protect", "images"], ["protect", "inspect"]]

    outputs = {}
    for cmd in commands:
        code, out, err = call_main(capsys, *cmd[1:])
        outputs[cmd[1]] = (out, err)
        assert code == 0, (cmd, out, err)

    # the key is private; every photo was written, in its own format and (for the EXIF one) upright
    if os.name == "posix":
        assert stat.S_IMODE(os.stat(tmp_path / "owner.key").st_mode) == 0o600
    out_dir = tmp_path / "photos-protected"
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(kinds)
    for name in kinds:
        assert upright(out_dir / name).shape == upright(tmp_path / "photos" / name).shape
    assert upright(out_dir / "camera.jpg").shape[:2] == (240, 180)
    assert {p.name: p.read_bytes() for p in (tmp_path / "photos").iterdir()} == before  # input untouched

    text, err = outputs["images"]
    # one line says what was used and why; the RAW is listed with its reason and counted
    assert re.search(r"method: uc \(no labels found.*cifar-resnet20", text), text
    assert "DSC_0002.NEF" in text and "camera RAW (.nef) is not read: export it to JPEG or TIFF" in text
    assert "1 file(s) not read" in text
    assert "notes.txt" not in text + err and ".DS_Store" not in text + err
    # the photo default is invisible: the fidelity floor dE 2 holds for every photo, and says so
    assert "photo default --max-delta-e 2" in text, text
    journal = [json.loads(line) for line in
               (tmp_path / "photos-protected.protect" / "journal.jsonl").read_text().splitlines()
               if line.strip().startswith("{") and '"path"' in line]
    assert journal and all(e["delta_e"] <= 2.0 + 1e-6 for e in journal if e.get("delta_e") is not None)
    # a non-terminal run is not silent: one line per phase on stderr
    for phase in ("found ", "method: uc", "fit: uc", "protect: "):
        assert phase in err, err

    # the record is private
    record = tmp_path / "photos-protected.protect"
    if os.name == "posix":
        assert stat.S_IMODE(os.stat(record).st_mode) == 0o700
        assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o600 for p in record.iterdir())

    # the printed PSNR is that of the written files
    printed = float(re.search(r"mean PSNR ([0-9.]+) dB", text).group(1))
    measured = np.mean([psnr(upright(tmp_path / "photos" / n), upright(out_dir / n)) for n in sorted(kinds)])
    assert printed == pytest.approx(measured, abs=0.05)

    # protecting the output again is refused with the way out named, and nothing is created
    code, out, err = call_main(capsys, "images", "--key-file", "owner.key", "photos-protected/", "twice/")
    assert code == 2 and "--allow-reprotect" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "twice").exists() and not (tmp_path / "twice.protect").exists()

    # a rerun of the same command resumes: nothing redone
    code, out, err = call_main(capsys, *commands[1][1:])
    assert code == 0 and f"done 0, skipped {len(kinds)}" in out
