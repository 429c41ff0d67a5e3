"""protect tune: candidate parsing, the frontier and the choice, and a whole small run on the
bundled samples (subset, certificates, report, --apply, resume)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli.main import cli
from perturbations.errors import ConfigError
from verify.tune import DEFAULT_CANDIDATES, SUBSET_CAVEAT, choose, frontier, parse_candidate


def test_candidates_parse_methods_params_and_the_surrogate_placeholder():
    c = parse_candidate("cuda+uc:uc.eps=8/255,uc.surrogate={surrogate},uc.steps=5", surrogate="cifar-resnet32")
    assert c.method == "cuda+uc" and c.params == {"uc.eps": "8/255", "uc.surrogate": "cifar-resnet32", "uc.steps": 5}
    assert parse_candidate("cuda").params == {} and parse_candidate("cuda").label == "cuda"
    for bad in (":x=1", "cuda:blur"):
        with pytest.raises(ConfigError):
            parse_candidate(bad)


def test_every_built_in_candidate_builds_its_method():
    import perturbations
    from perturbations import Keyring

    for text in DEFAULT_CANDIDATES:
        c = parse_candidate(text, surrogate="cifar-resnet20")
        cls = perturbations.get(c.method)
        cls(Keyring.from_seed(0), **cls.resolve_params({**c.params}))  # raises ConfigError on a bad parameter


def rows(*points):
    return [{"psnr": p, "score": s} for p, s in points]


def test_the_frontier_keeps_only_unbeaten_points_and_is_monotone():
    r = rows((20, 0.9), (25, 0.7), (24, 0.6), (30, 0.2), (30, 0.1), (18, 0.5), (25, 0.7), (35, None))
    front = frontier(r)
    assert front == [0, 1, 3]  # (24, 0.6) and (30, 0.1) and (18, 0.5) are beaten; the equal (25, 0.7) once
    psnrs, scores = [r[i]["psnr"] for i in front], [r[i]["score"] for i in front]
    assert psnrs == sorted(psnrs) and scores == sorted(scores, reverse=True)
    assert frontier([]) == []


def test_the_choice_is_the_strongest_point_at_or_above_the_floor():
    r = rows((20, 0.9), (25, 0.7), (30, 0.2), (31, 0.2))
    assert choose(r, None) == 0
    assert choose(r, 24.0) == 1
    assert choose(r, 29.0) == 3  # equal scores: the higher PSNR
    assert choose(r, 40.0) is None


def stripes(root, per_class, seed):
    """Two easy classes (horizontal / vertical stripes, random phase, period and colour, noise):
    a small model learns them in a few epochs on any machine, so every certificate has a score."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32]
    for name, axis in (("horizontal", yy), ("vertical", xx)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            period, phase = rng.integers(4, 9), rng.uniform(0, 2 * np.pi)
            wave = 0.5 + 0.4 * np.sin(2 * np.pi * axis / period + phase)
            colour = rng.uniform(0.3, 1.0, 3)
            img = wave[..., None] * colour + rng.normal(0, 0.05, (32, 32, 3))
            Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def test_tune_reports_a_monotone_frontier_and_applies_the_choice(tmp_path, test_key):
    """Three CUDA candidates on two easy classes, 6 epochs: measured about 25 s on a 2-core CPU."""
    train, test = stripes(tmp_path / "train", 60, 0), stripes(tmp_path / "test", 30, 1)
    args = ["tune", str(train), "--test", str(test), "--key", test_key, "--per-class", "40", "--epochs", "6",
            "--workers", "1", "--candidate", "cuda", "--candidate", "cuda:blur=0.1", "--candidate",
            "cuda:filter_size=7", "--min-psnr", "15", "--report", str(tmp_path / "tune"),
            "--apply", str(tmp_path / "out"), "--json"]
    result = CliRunner().invoke(cli, args, env={"PROTECT_KEY": None})
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    cands = report["candidates"]
    assert [c["candidate"] for c in cands] == ["cuda", "cuda:blur=0.1", "cuda:filter_size=7"]
    assert all(c["psnr"] is not None and c["ssim"] is not None for c in cands)
    for c in cands:  # below the floor: not certified; above it: a score (the classes are easy)
        assert (c["status"] == "below floor") == (c["psnr"] < 15)
        assert (c.get("score") is not None) == (c["psnr"] >= 15), c
    front = report["frontier"]
    assert front and all(cands[i].get("score") is not None for i in front)
    assert [cands[i]["psnr"] for i in front] == sorted(cands[i]["psnr"] for i in front)
    scores = [cands[i]["score"] for i in front]
    assert all(a > b for a, b in zip(scores, scores[1:]))
    best = max(c["score"] for c in cands if c.get("score") is not None)
    chosen = cands[report["chosen"]]
    assert chosen["psnr"] >= 15 and chosen["score"] == best and report["chosen"] in front
    applied = report["applied"]
    assert applied["done"] == 120 and applied["failed"] == 0
    manifest = json.loads((tmp_path / "out.protect" / "manifest.json").read_text())
    assert manifest["method"] == chosen["method"]
    for name in ("tune.json", "tune.md", "frontier.png"):
        assert (tmp_path / "tune" / name).is_file()
    assert SUBSET_CAVEAT in (tmp_path / "tune" / "tune.md").read_text()
    assert len(list((tmp_path / "tune" / "subset").rglob("*.png"))) == 80

    # a rerun reuses the subset, the protected candidates and the trained cells
    start = time.monotonic()
    again = CliRunner().invoke(cli, args, env={"PROTECT_KEY": None})
    assert again.exit_code == 0, again.output
    rerun = json.loads(again.stdout)
    assert [c.get("score") for c in rerun["candidates"]] == [c.get("score") for c in cands]
    assert [c["protect_s_per_image"] for c in rerun["candidates"]] == [c["protect_s_per_image"] for c in cands]
    assert rerun["applied"]["skipped"] == 120
    assert time.monotonic() - start < 60


def test_tune_needs_labels_and_a_positive_floor(tmp_path, samples, test_key, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted((samples / "cifar10" / "train" / "airplane").glob("*.png"))[:3]:
        (flat / f.name).write_bytes(f.read_bytes())
    base = ["tune", "--test", str(samples / "cifar10" / "test"), "--key", test_key, "--report", str(tmp_path / "t")]
    from cli.main import main

    for extra, message in (([str(flat)], "no labels"), ([str(samples / "cifar10" / "train"), "--min-psnr", "-3"], "min-psnr")):
        with pytest.raises(SystemExit) as info:
            main([*base, *extra])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
