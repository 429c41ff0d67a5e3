"""The fidelity floor --max-delta-e: every image's low-frequency colour difference ends within it,
by scaling the method's own change back toward the original, and nothing else moves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from protect.fidelity import LIMIT_STEPS, delta_e, limit_delta_e

KODAK = Path(__file__).resolve().parents[2] / "samples" / "kodak"


def test_limit_scales_each_image_back_within_the_limit_and_keeps_the_methods_invariants() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 3, 64, 96), generator=g, dtype=torch.int32).to(torch.uint8)
    blotch = torch.zeros(3, 3, 64, 96, dtype=torch.int32)
    blotch[0, 1, 10:40, 20:70] = 40  # a strong green blotch: far above the limit
    blotch[1, :, :, :] = torch.randint(-1, 2, (3, 64, 96), generator=g)  # faint grain: within it
    blotch[2, 0, ::2, ::3] = -25  # sparse, strong
    q = (x.to(torch.int32) + blotch).clamp(0, 255).to(torch.uint8)
    before = delta_e(x, q, 255)
    out, scales, reported = limit_delta_e(x, q, 255, 1.0)
    after = delta_e(x, out, 255)
    assert reported == after  # the dE it returns is the returned images' own
    assert before[0] > 1.0 and before[1] <= 1.0 and before[2] > 1.0
    assert scales[1] == 1.0 and torch.equal(out[1], q[1])  # within the limit: untouched
    for i in (0, 2):
        assert after[i] <= 1.0 and 0 < scales[i] < 1 and (scales[i] * LIMIT_STEPS).is_integer()
        # one step more would break the limit: the largest scale that fits
        k = round(scales[i] * LIMIT_STEPS) + 1
        nxt = (x[i:i + 1].float() + (q[i:i + 1].float() - x[i:i + 1].float()) * k / LIMIT_STEPS).round().clamp(0, 255)
        assert delta_e(x[i:i + 1], nxt.to(torch.uint8), 255)[0] > 1.0
    d_old, d_new = q.to(torch.int32) - x.to(torch.int32), out.to(torch.int32) - x.to(torch.int32)
    assert torch.all(d_new.abs() <= d_old.abs()) and torch.all(d_new * d_old >= 0)  # never further, never across
    assert torch.all(d_new[d_old == 0] == 0)  # sparsity kept
    same, ones, des = limit_delta_e(x, q, 255, 100.0)
    assert same is q and ones == [1.0, 1.0, 1.0] and des == before


def test_protect_images_respects_max_delta_e_per_image(tmp_path: Path, test_key: str) -> None:
    from cli.main import cli

    src = tmp_path / "photos"
    src.mkdir()
    for f in sorted(KODAK.glob("*.png"))[:2]:
        Image.open(f).convert("RGB").resize((192, 128)).save(src / f.name)
    runner = CliRunner()
    base = ["images", "--key", test_key, "--json", "--quiet", "--method", "cuda", "--clusters", "2",
            "--surrogate", "random:tiny"]
    free = json.loads(runner.invoke(cli, [*base, str(src), str(tmp_path / "free")]).output)
    capped = runner.invoke(cli, [*base, "--max-delta-e", "1.5", str(src), str(tmp_path / "capped")])
    assert capped.exit_code == 0, capped.output
    summary = json.loads(capped.output)
    assert free["delta_e_mean"] > 1.5 and summary["delta_e_mean"] <= 1.5 + 1e-6
    journal = [json.loads(line) for line in (tmp_path / "capped.protect" / "journal.jsonl").read_text().splitlines()
               if line.strip().startswith("{") and '"path"' in line]
    assert journal and all(e["delta_e"] <= 1.5 + 1e-6 for e in journal)
    assert any("--max-delta-e" in n for e in journal for n in e["notes"])
    # the input is untouched, a rerun resumes, another limit is a changed setting
    again = runner.invoke(cli, [*base, "--max-delta-e", "1.5", str(src), str(tmp_path / "capped")])
    assert again.exit_code == 0 and json.loads(again.output)["skipped"] == 2
    other = runner.invoke(cli, [*base, "--max-delta-e", "3", str(src), str(tmp_path / "capped")])
    assert other.exit_code != 0 and "max_delta_e" in str(other.exception)  # one line at the console entry point
    bad = runner.invoke(cli, [*base, "--max-delta-e", "0", str(src), str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "--max-delta-e" in str(bad.exception) and not (tmp_path / "bad").exists()


def test_the_photo_default_floor_is_two_only_for_the_label_free_default_and_follows_the_record(
        tmp_path: Path, test_key: str) -> None:
    """No --method and no labels (the photographer's folder): floor 2, recorded; ``off`` removes it;
    a labelled folder or a chosen method has none; a rerun keeps what its record says."""
    from cli.main import cli

    flat = tmp_path / "photos"
    flat.mkdir()
    for f in sorted(KODAK.glob("*.png"))[:2]:
        Image.open(f).convert("RGB").resize((96, 64)).save(flat / f.name)
    runner = CliRunner()
    plain = ["images", "--key", test_key, "--json", "--quiet"]
    base = [*plain, "--surrogate", "random:tiny", "--param", "steps=10"]  # UC's fit kept short: the floor is tested

    def header(out: Path) -> dict:
        return json.loads((out.parent / f"{out.name}.protect" / "journal.jsonl").read_text().splitlines()[0])["header"]

    res = runner.invoke(cli, [*base, str(flat), str(tmp_path / "auto")])
    assert res.exit_code == 0, res.output
    assert header(tmp_path / "auto")["max_delta_e"] == 2.0
    assert json.loads(res.output)["delta_e_mean"] <= 2.0 + 1e-6
    off = runner.invoke(cli, [*base, "--max-delta-e", "off", str(flat), str(tmp_path / "off")])
    assert off.exit_code == 0, off.output
    assert header(tmp_path / "off")["max_delta_e"] is None
    assert json.loads(off.output)["delta_e_mean"] > 2.5, off.output  # without it the change shows: the floor worked
    # the run made without a floor resumes as it was: no setting changed, nothing redone
    again = runner.invoke(cli, [*base, str(flat), str(tmp_path / "off")])
    assert again.exit_code == 0 and json.loads(again.output)["skipped"] == 2, again.output
    named = runner.invoke(cli, [*base, "--method", "uc", str(flat), str(tmp_path / "auto")])  # same run, resumed
    assert named.exit_code == 0 and json.loads(named.output)["skipped"] == 2, named.output
    chosen = runner.invoke(cli, [*base, "--method", "uc", str(flat), str(tmp_path / "chosen")])
    assert chosen.exit_code == 0 and header(tmp_path / "chosen")["max_delta_e"] is None
    labelled = tmp_path / "labelled"
    for i, f in enumerate(sorted(flat.iterdir())):
        (labelled / f"c{i}").mkdir(parents=True)
        (labelled / f"c{i}" / f.name).write_bytes(f.read_bytes())
    lab = runner.invoke(cli, [*plain, str(labelled), str(tmp_path / "lab")])
    assert lab.exit_code == 0, lab.output
    assert header(tmp_path / "lab")["max_delta_e"] is None
    bad = runner.invoke(cli, [*base, "--max-delta-e", "lots", str(flat), str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--max-delta-e" in bad.output and not (tmp_path / "bad").exists()


def test_labelled_colour_photos_get_the_photo_default_and_small_or_grey_labelled_images_cuda(
        tmp_path: Path, test_key: str) -> None:
    """A labelled folder of colour photos (median shorter side above PHOTO_MIN_SIDE) gets the photo
    default, label-free UC under --max-delta-e 2, with the reason in the summary; labelled images
    at CIFAR's size, or grey ones (X-rays), keep class-wise CUDA without a floor; --method cuda on
    photos is CUDA; a rerun of the photo run resumes it with nothing redone."""
    from cli.main import cli
    from protect.pipeline import PHOTO_MIN_SIDE

    def folder(name: str, size: tuple[int, int], mode: str) -> Path:
        root = tmp_path / name
        for i, f in enumerate(sorted(KODAK.glob("*.png"))[:2]):
            (root / f"c{i}").mkdir(parents=True)
            for j, box in enumerate([(0, 0, 300, 300), (200, 100, 500, 400)]):
                Image.open(f).convert(mode).crop(box).resize(size).save(root / f"c{i}" / f"{j}.png")
        return root

    def header(out: Path) -> dict:
        return json.loads((out.parent / f"{out.name}.protect" / "journal.jsonl").read_text().splitlines()[0])["header"]

    runner = CliRunner()
    base = ["images", "--key", test_key, "--json", "--quiet"]
    short_uc = ["--surrogate", "random:tiny", "--param", "steps=10"]  # UC's fit kept short: the choice is tested
    photos = folder("photos", (PHOTO_MIN_SIDE + 32, PHOTO_MIN_SIDE + 8), "RGB")
    res = runner.invoke(cli, [*base, *short_uc, str(photos), str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert header(tmp_path / "p")["method"] == "uc" and header(tmp_path / "p")["max_delta_e"] == 2.0
    assert "labelled colour photos" in summary["method_note"] and summary["delta_e_mean"] <= 2.0 + 1e-6
    again = runner.invoke(cli, [*base, *short_uc, str(photos), str(tmp_path / "p")])
    assert again.exit_code == 0 and json.loads(again.output)["skipped"] == 4, again.output
    named = runner.invoke(cli, [*base, "--method", "cuda", str(photos), str(tmp_path / "named")])
    assert named.exit_code == 0 and header(tmp_path / "named")["max_delta_e"] is None
    assert header(tmp_path / "named")["method"] == "cuda"
    for name, size, mode in (("small", (PHOTO_MIN_SIDE, PHOTO_MIN_SIDE), "RGB"), ("grey", (160, 128), "L")):
        res = runner.invoke(cli, [*base, str(folder(name, size, mode)), str(tmp_path / f"{name}-out")])
        assert res.exit_code == 0, res.output
        h = header(tmp_path / f"{name}-out")
        assert h["method"] == "cuda" and h["max_delta_e"] is None, (name, h)


def test_the_floor_holds_in_the_written_jpeg_not_only_before_encoding(tmp_path: Path, test_key: str) -> None:
    """A lossy output adds the codec's error to the scaled change: a file measured above the floor
    is scaled back further and encoded again, so what is written is within it, and says so."""
    from cli.main import cli

    QUALITY, FLOOR = 75, 1.5  # noqa: N806 - both files need a second encode at this floor

    src = tmp_path / "photos"
    src.mkdir()
    for f in sorted(KODAK.glob("*.png"))[:2]:
        Image.open(f).convert("RGB").resize((192, 128)).save(src / f"{f.stem}.jpg", quality=QUALITY)
    runner = CliRunner()
    res = runner.invoke(cli, ["images", "--key", test_key, "--json", "--quiet", "--method", "cuda", "--clusters", "2",
                              "--surrogate", "random:tiny", "--max-delta-e", str(FLOOR), str(src), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    journal = [json.loads(line) for line in (tmp_path / "out.protect" / "journal.jsonl").read_text().splitlines()
               if line.strip().startswith("{") and '"path"' in line]
    assert len(journal) == 2 and all(e["delta_e"] <= FLOOR + 1e-6 for e in journal), journal
    assert any("as written" in n for e in journal for n in e["notes"]), journal
