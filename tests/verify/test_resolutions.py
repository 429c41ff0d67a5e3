"""The attacker's resolution as a dimension of the grid: parsing, the tier defaults from the file
headers, the headline over resolutions (the lowest score, only falling as resolutions are added),
its joint interval, and a real two-resolution certificate of a mixed-size folder."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from perturbations.errors import ConfigError, InputError
from verify.data import image_sizes
from verify.recipes import get_recipe
from verify.resolutions import combine_resolutions, default_resolutions, parse_resolutions
from verify.run import verify_folder
from verify.uncertainty import bootstrap_interval, bootstrap_min_interval


def test_parse_resolutions() -> None:
    assert parse_resolutions(None) is None
    assert parse_resolutions("64, 32,native,32") == [32, 64, None]
    assert parse_resolutions(48) == [48] and parse_resolutions("native") == [None]
    assert parse_resolutions([64, None]) == [64, None]
    for bad in ("tiny", "4", "32,", "", True):
        with pytest.raises(ConfigError) as exc:
            parse_resolutions(bad)
        assert "\n" not in str(exc.value)


def test_default_resolutions_never_upscale_and_keep_small_native_sizes() -> None:
    assert default_resolutions("quick", [(32, 32)] * 3) == [None]  # CIFAR-10: its own size only
    assert default_resolutions("quick", [(28, 28)]) == [None]  # MedMNIST
    assert default_resolutions("quick", [(128, 128)] * 2) == [32, 64]  # flowers128: native is above 64
    assert default_resolutions("quick", [(64, 64)]) == [32, None]
    assert default_resolutions("quick", [(768, 512), (512, 768)]) == [32, 64]  # a portfolio
    assert default_resolutions("quick", [(500, 60), (90, 400)]) == [32]  # 64 would upscale the 60-px side
    assert default_resolutions("quick", [(20, 30), (30, 20)]) == [20]  # nothing fits: the smallest side
    assert default_resolutions("standard", [(32, 32)]) == [None]
    assert default_resolutions("standard", [(4000, 3000), (3000, 4000)]) == [224]
    assert default_resolutions("quick", None) == [None]  # sizes unknown (DICOM): native, as before


def test_image_sizes_reads_headers_with_the_exif_rotation(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "a" / "0.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 x 30, shown 30 x 40
    Image.new("RGB", (40, 30)).save(tmp_path / "b" / "0.jpg", exif=exif.tobytes())
    Image.new("RGB", (50, 20)).save(tmp_path / "b" / "1.jpg")
    assert image_sizes(tmp_path) == [(40, 30), (30, 40), (50, 20)]
    assert image_sizes(tmp_path, max_per_class=1) == [(40, 30), (30, 40)]
    (tmp_path / "b" / "2.png").write_bytes(b"not an image")
    assert image_sizes(tmp_path) is None  # unknown: load_folder reports the file
    assert image_sizes(tmp_path / "missing") is None


def _cert(size: str, ref: float, best: float, chance: float = 0.1) -> dict:
    """A hand-built per-resolution certificate: the verdict fields combine_resolutions reads."""
    score = None if ref - chance <= 0 else round((ref - best) / (ref - chance), 4)
    cell = {"training": "erm", "defense": "none", "effect": score, "protected": {"acc": best, "balanced_acc": best},
            "attacker": {"learner": "fastcnn", "resolution": size}}
    return {"verdict": {"score": score, "interval": None if score is None else [score - 0.05, score + 0.05],
                        "conclusive": score is not None, "inconclusive_reason": None, "score_chance": chance,
                        "score_metric": "accuracy", "chance": chance, "oracle": {"score": score},
                        "reference": {"acc": ref, "balanced_acc": ref},
                        "best_attacker": {"training": "erm", "defense": "none", "acc": best, "balanced_acc": best,
                                          "effect": score, "attacker": cell["attacker"]}},
            "cells": [cell], "data": {"train": {"count": 10}}, "warnings": [], "resolution": {"size": size}}


def test_the_headline_is_the_lowest_resolution_and_only_falls_as_resolutions_are_added() -> None:
    a, b, weak = _cert("32", 0.6, 0.3), _cert("64", 0.7, 0.55), _cert("16", 0.15, 0.15)
    one = combine_resolutions([a], [32], None, 1.0)["verdict"]
    two = combine_resolutions([a, b], [32, 64], (0.2, 0.4), 1.0)["verdict"]
    three = combine_resolutions([weak, a, b], [16, 32, 64], (0.2, 0.4), 1.0)["verdict"]
    assert one["score"] == 0.6 and two["score"] == pytest.approx(0.25) and two["resolution"] == "64"
    assert three["score"] == two["score"] and three["per_resolution"][0]["excluded"]  # a weak reference shows nothing
    assert two["interval"] == [0.2, 0.4] and two["conclusive"]
    assert "at 64 px" in two["summary"] and "32 px 0.60" in two["summary"]
    assert combine_resolutions([a, b], [32, 64], (-0.1, 0.4), 1.0)["verdict"]["inconclusive_reason"]
    # adding cells or resolutions never raises it, in any order and subset
    rng = np.random.default_rng(0)
    for _ in range(50):
        certs = [_cert(str(8 * (i + 1)), float(r), float(r * f)) for i, (r, f) in
                 enumerate(zip(rng.uniform(0.3, 0.9, 4), rng.uniform(0, 1, 4)))]
        prev = None
        for k in range(1, 5):
            s = combine_resolutions(copy.deepcopy(certs[:k]), [8 * (i + 1) for i in range(k)], None, 1.0)["verdict"]["score"]
            assert prev is None or s <= prev + 1e-12
            prev = s


def test_the_joint_interval_is_of_the_minimum() -> None:
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(4), 60)

    def preds(acc: float) -> list[int]:
        return [int(t) if rng.random() < acc else int((t + 1) % 4) for t in y]

    strong = ([preds(0.8)], [[preds(0.3)]])  # score about 0.73
    weakish = ([preds(0.8)], [[preds(0.6)]])  # score about 0.36
    alone = [bootstrap_interval(*g, y.tolist(), "accuracy", 0.25) for g in (strong, weakish)]
    joint = bootstrap_min_interval([strong, weakish], y.tolist(), "accuracy", 0.25)
    assert joint is not None and joint[1] <= alone[0][0]  # the minimum is the weaker resolution's score
    assert abs(joint[0] - alone[1][0]) < 0.08 and abs(joint[1] - alone[1][1]) < 0.08
    assert bootstrap_min_interval([strong], y.tolist(), "accuracy", 0.25) == alone[0]
    assert bootstrap_min_interval([strong, ([preds(0.8)], [[[0, 1]]])], y.tolist(), "accuracy", 0.25) is None


def _colour_folder(root: Path, n: int = 12) -> Path:
    """Two learnable classes (reddish and bluish noise) in mixed sizes and orientations."""
    rng = np.random.default_rng(3)
    for c, cls in enumerate(("red", "blue")):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            h, w = (60 + 7 * i, 90 - 3 * i) if i % 2 else (90 - 2 * i, 50 + 5 * i)
            a = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
            a[:, :, 0 if c == 0 else 2] += 120
            Image.fromarray(a).save(root / cls / f"{i}.png")
    return root


def test_verify_at_two_resolutions_of_a_mixed_size_folder(tmp_path: Path) -> None:
    from cli.main import cli

    root = _colour_folder(tmp_path / "photos", n=20)
    kw = dict(tier=get_recipe("quick", epochs=3, batch_size=8), trainings="erm", defenses="none,grayscale",
              seeds=1, device="cpu", cache_dir=False, progress=False)
    with pytest.raises(InputError) as exc:  # native among several: refused from the headers, before training
        verify_folder(root, None, root, holdout=0.25, resolution="16,native", report_dir=False, **kw)
    assert "native" in str(exc.value) and "\n" not in str(exc.value)
    cert = verify_folder(root, None, root, holdout=0.25, resolution="16,24", report_dir=tmp_path / "rep", **kw)
    v = cert["verdict"]
    per = {p["resolution"]: p for p in v["per_resolution"]}
    assert set(per) == {"16", "24"} and len(cert["cells"]) == 4
    assert sorted(c["attacker"]["resolution"] for c in cert["cells"]) == ["16", "16", "24", "24"]
    usable = [p["score"] for p in per.values() if not p["excluded"]]
    assert usable and v["score"] == min(usable) and per[v["resolution"]]["score"] == v["score"]
    assert [r["size"] for r in cert["resolutions"]] == [16, 24]
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "| attacker resolution |" in report and "erm @ 24 px" in report
    assert v["interval"] is not None and v["interval"][0] <= v["score"] <= v["interval"][1]
    # the CLI prints each resolution; the same command again reuses every cell
    args = ["verify", str(root), "--clean", str(root), "--holdout", "0.25", "--resolution", "16,24", "--epochs", "1",
            "--training", "erm", "--defenses", "none,grayscale", "--seeds", "1", "--device", "cpu", "--no-cache",
            "--report", str(tmp_path / "cli")]
    for run in range(2):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        assert "at 16 px: score" in result.output and "at 24 px: score" in result.output
    assert "resumed: 6 finished cell(s) reused, 0 trained" in result.output


def test_a_mixed_size_folder_defaults_to_the_tiers_resolutions(tmp_path: Path) -> None:
    root = _colour_folder(tmp_path / "photos", n=6)
    cert = verify_folder(root, None, root, holdout=0.34, tier=get_recipe("quick", epochs=1, batch_size=8),
                         trainings="erm", defenses="none", seeds=1, device="cpu", report_dir=False, cache_dir=False,
                         progress=False)
    assert [r["size"] for r in cert["resolutions"]] == [32]  # 64 would upscale the 50-px sides
