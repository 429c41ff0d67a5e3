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


def _classes(root, counts, split="train", samples=None):
    """``counts`` images of each CIFAR-10 sample class copied into ``root/<class>/``."""
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for f in sorted((samples / "cifar10" / split / cls).glob("*.png"))[:n]:
            (root / cls / f.name).write_bytes(f.read_bytes())
    return root


def test_a_refused_tune_leaves_no_new_folder(tmp_path, samples, test_key, capsys):
    """Every cheap refusal comes before anything is written: no IN_DIR.tune, no --report folder."""
    from cli.main import main

    train = _classes(tmp_path / "train", {"airplane": 3, "frog": 3}, samples=samples)
    test = _classes(tmp_path / "test", {"airplane": 2, "frog": 2}, "test", samples)
    other = _classes(tmp_path / "other", {"airplane": 2, "ship": 2}, "test", samples)
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted(test.rglob("*.png")):
        (flat / f.name).write_bytes(f.read_bytes())
    small = tmp_path / "small"
    for f in sorted(test.rglob("*.png")):
        (small / f.parent.name).mkdir(parents=True, exist_ok=True)
        Image.open(f).resize((16, 16)).save(small / f.parent.name / f.name)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "note.txt").write_text("not a protect output")
    base = [str(train), "--key", test_key, "--epochs", "1", "--candidate", "cuda"]
    cases = [
        (["--test", str(flat)], "no labels"),
        (["--test", str(other)], "class folders differ"),
        (["--test", str(small)], "16x16"),
        (["--test", str(tmp_path / "missing")], "missing"),
        (["--test", str(flat), "--test-labels", str(tmp_path / "none.csv")], "none.csv"),
        (["--test", str(test), "--training", "bogus"], "bogus"),
        (["--test", str(test), "--tier", "nosuch"], "nosuch"),
        (["--test", str(test), "--candidate", "nosuch"], "nosuch"),
        (["--test", str(test), "--candidate", "cuda:nosuch=1"], "nosuch"),
        (["--test", str(test), "--apply", str(train / "out")], "input folder"),
        (["--test", str(test), "--apply", str(tmp_path / "busy")], "not empty"),
        (["--test", str(test), "--report", str(tmp_path / "report"), "--defenses", "nosuch"], "nosuch"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as info:
            main(["tune", *base, *extra])
        assert info.value.code == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not (tmp_path / "train.tune").exists() and not (tmp_path / "report").exists(), extra
    assert not (tmp_path / "out").exists() and not (train / "out").exists()


def test_a_tune_that_fails_after_staging_removes_what_it_made_and_keeps_an_earlier_report(
        tmp_path, samples, test_key, monkeypatch):
    """A refusal at the first certification (after the subset and a candidate were written): a new
    tune folder is removed whole; an earlier one keeps everything it held, and only the new run's
    folders go."""
    import verify.tune as vtune
    from perturbations import Keyring
    from perturbations.errors import InputError

    train = _classes(tmp_path / "train", {"airplane": 3, "frog": 3}, samples=samples)
    test = _classes(tmp_path / "test", {"airplane": 2, "frog": 2}, "test", samples)

    def refuse(*args, **kwargs):
        assert (tmp_path / "train.tune" / "subset" / ".complete").is_file() or kwargs["report_dir"].parent.is_dir()
        raise InputError("refused at the first certification")

    monkeypatch.setattr(vtune, "verify_folder", refuse)
    keyring = Keyring.from_seed(0)
    with pytest.raises(InputError):
        vtune.tune_folder(train, test, keyring, ["cuda"], epochs=1, device="cpu", workers=1)
    assert not (tmp_path / "train.tune").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test", "train"]

    earlier = tmp_path / "earlier"
    (earlier / "candidate-old").mkdir(parents=True)
    (earlier / "tune.json").write_text('{"candidates": []}')
    (earlier / "candidate-old" / "x.png").write_bytes(b"kept")
    with pytest.raises(InputError):
        vtune.tune_folder(train, test, keyring, ["cuda"], epochs=1, device="cpu", workers=1, report_dir=earlier)
    assert sorted(p.name for p in earlier.iterdir()) == ["candidate-old", "tune.json"]
    assert (earlier / "candidate-old" / "x.png").read_bytes() == b"kept"
    nested = tmp_path / "a" / "b" / "tune"  # parents made for --report go too
    with pytest.raises(InputError):
        vtune.tune_folder(train, test, keyring, ["cuda"], epochs=1, device="cpu", workers=1, report_dir=nested)
    assert not (tmp_path / "a").exists()


def _cert_at_chance(*args, **kwargs):
    """A certificate whose clean baseline did not learn: no score. At its validation-chosen epoch it
    is at chance; its oracle peak (chosen with the test labels) is above it, which does not count."""
    kwargs["report_dir"].mkdir(parents=True, exist_ok=True)
    clean = {"acc": 0.5, "balanced_acc": 0.5, "peak_acc": 0.6, "peak_balanced_acc": 0.6}
    return {"epochs": 40, "score_metric": "accuracy", "score_chance": 0.5, "warnings": ["weak baseline"],
            "cells": [{"training": "erm", "defense": "none", "clean": clean, "protected": {"acc": 0.5, "peak_acc": 0.5},
                       "effect": None}],
            "verdict": {"score": None, "score_chance": 0.5, "reference": {"training": "erm", "defense": "none", **clean},
                        "best_attacker": {"training": "erm", "defense": "none", "acc": 0.5, "peak_acc": 0.5}}}


def test_every_candidate_without_a_score_says_why_and_the_real_counts_are_reported(
        tmp_path, samples, test_key, monkeypatch):
    """A clean baseline at chance: the first candidate's reason names it (and the cure); the later
    ones are protected but not certified (the baselines are shared); candidates below the floor say
    so too. The header gives the images actually staged, not --per-class."""
    import verify.tune as vtune
    from perturbations import Keyring

    train = _classes(tmp_path / "train", {"airplane": 5, "frog": 2}, samples=samples)
    test = _classes(tmp_path / "test", {"airplane": 2, "frog": 2}, "test", samples)
    calls = []
    monkeypatch.setattr(vtune, "verify_folder", lambda *a, **k: calls.append(k) or _cert_at_chance(*a, **k))
    result = vtune.tune_folder(train, test, Keyring.from_seed(0),
                               ["cuda:blur=0.05", "cuda:blur=0.1", "cuda"], epochs=1, device="cpu", workers=1)
    rows = result["candidates"]
    assert len(calls) == 1 and result["chosen"] is None
    assert rows[0]["status"] == "no score" and rows[0]["warnings"] == ["weak baseline"]
    assert rows[0]["reason"].startswith("clean baseline at 50.0% accuracy, +0.0 points from chance 50.0% (not above it)")
    assert "too few images (2-5 per class) or epochs (40)" in rows[0]["reason"]
    assert [r["status"] for r in rows[1:]] == ["not certified"] * 2
    assert all(r["reason"].startswith("the clean baselines are not above chance (see cuda:blur=0.05)") for r in rows[1:])
    assert result["subset_counts"] == {"per_class": {"airplane": 5, "frog": 2}, "min": 2, "max": 5, "total": 7}
    assert result["test_counts"] == {"per_class": {"airplane": 2, "frog": 2}, "total": 4}
    md = (tmp_path / "train.tune" / "tune.md").read_text()
    assert "Subset: 7 images, 2-5 per class (--per-class 100: some classes have fewer); test set 4 images" in md
    assert "100 images per class" not in md
    assert all(r["reason"] in md for r in rows)
    assert json.loads((tmp_path / "train.tune" / "tune.json").read_text())["subset_counts"]["total"] == 7
    floor = vtune.tune_folder(train, test, Keyring.from_seed(0), ["cuda"], min_psnr=99, epochs=1, device="cpu",
                              workers=1)  # resumed: the candidate is there
    (row,) = floor["candidates"]
    assert row["status"] == "below floor" and row["reason"].endswith("is below the floor 99 dB: not certified")
    assert row["reason"] in (tmp_path / "train.tune" / "tune.md").read_text() and len(calls) == 1


def test_tune_scores_on_a_test_folder_labelled_by_a_csv(tmp_path, samples, test_key):
    """--test-labels as in protect verify: a flat test folder and a 'path,label' CSV (a tiny real run)."""
    train = stripes(tmp_path / "train", 12, 0)
    test = stripes(tmp_path / "test_classes", 6, 1)
    flat = tmp_path / "test"
    flat.mkdir()
    rows = ["path,label"]
    for f in sorted(test.rglob("*.png")):
        (flat / f"{f.parent.name}-{f.name}").write_bytes(f.read_bytes())
        rows.append(f"{f.parent.name}-{f.name},{f.parent.name}")
    (tmp_path / "test.csv").write_text("\n".join(rows) + "\n")
    args = ["tune", str(train), "--test", str(flat), "--test-labels", str(tmp_path / "test.csv"), "--key", test_key,
            "--epochs", "2", "--workers", "1", "--device", "cpu", "--candidate", "cuda", "--json"]
    result = CliRunner().invoke(cli, args, env={"PROTECT_KEY": None})
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["test_counts"] == {"per_class": {"horizontal": 6, "vertical": 6}, "total": 12}
    assert report["test_labels"] == str((tmp_path / "test.csv").resolve())
    (row,) = report["candidates"]
    assert row["status"] in ("ok", "no score") and (row.get("score") is not None or row["reason"]), row
    cert = json.loads(next((tmp_path / "train.tune").glob("verify-*/certificate.json")).read_text())
    assert cert["data"]["test"]["count"] + cert["data"]["validation"]["count"] == 12  # 2 of them choose the epoch
    assert cert["data"]["validation"]["per_class"] == [1, 1]


def test_tune_with_holdout_certifies_on_held_out_originals(tmp_path, test_key):
    """--holdout F and no --test: each candidate is certified on a keyed share of the subset's
    originals, whose protected copies do not train; --holdout with --test is refused in one line."""
    train = stripes(tmp_path / "train", 12, 0)
    args = ["tune", str(train), "--holdout", "0.25", "--resolution", "24", "--key", test_key, "--epochs", "2",
            "--workers", "1", "--device", "cpu", "--candidate", "cuda", "--json"]
    result = CliRunner().invoke(cli, args, env={"PROTECT_KEY": None})
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["test_dir"] is None and report["holdout"] == 0.25
    assert report["test_counts"]["per_class"] == {"horizontal": 3, "vertical": 3}
    cert = json.loads(next((tmp_path / "train.tune").glob("verify-*/certificate.json")).read_text())
    held = cert["data"]["holdout"]
    assert cert["resolution"]["size"] == 24 and cert["data"]["train"]["shape"][1:] == [24, 24]
    assert held["test_images"] == 6 and held["protected_removed"] == 6 and cert["data"]["train"]["count"] == 18
    refused = CliRunner().invoke(cli, args[:-1] + ["--test", str(train)], env={"PROTECT_KEY": None})
    assert refused.exit_code != 0 and "leave out --test" in str(refused.exception)


def test_tune_under_a_de_floor_protects_every_candidate_and_the_applied_folder_within_it(tmp_path, test_key):
    """--max-delta-e DE: each candidate (and --apply) is protected as protect images --max-delta-e
    would, its mean dE in the row and the table; the same candidate without the floor is another
    folder, never reused, and measures above it (so the floor did something)."""
    train = stripes(tmp_path / "train", 30, 0)
    base = ["tune", str(train), "--holdout", "0.25", "--key", test_key, "--epochs", "5", "--workers", "1",
            "--device", "cpu", "--candidate", "cuda", "--report", str(tmp_path / "tune")]
    plain = CliRunner().invoke(cli, [*base, "--json"], env={"PROTECT_KEY": None})
    assert plain.exit_code == 0, plain.output
    free = json.loads(plain.stdout)
    assert free["max_delta_e"] is None and free["candidates"][0]["delta_e"] > 1.0
    floored = CliRunner().invoke(cli, [*base, "--max-delta-e", "1", "--apply", str(tmp_path / "out")],
                                 env={"PROTECT_KEY": None})
    assert floored.exit_code == 0, floored.output
    report = json.loads((tmp_path / "tune" / "tune.json").read_text())
    row = report["candidates"][0]
    assert report["max_delta_e"] == 1.0 and row["delta_e"] <= 1.0 + 1e-6 and row["psnr"] > free["candidates"][0]["psnr"]
    assert len(list((tmp_path / "tune").glob("candidate-*.protect"))) == 2  # not the floor-free candidate's folder
    assert report["applied"]["done"] == 60 and report["applied"]["delta_e"] <= 1.0 + 1e-6
    header = json.loads((tmp_path / "out.protect" / "journal.jsonl").read_text().splitlines()[0])["header"]
    assert header["max_delta_e"] == 1.0
    assert "dE floor: 1." in (tmp_path / "tune" / "tune.md").read_text()
    assert "--max-delta-e 1" in floored.stdout.splitlines()[-1]  # the command to protect with says it too
    bad = CliRunner().invoke(cli, [*base, "--max-delta-e", "-1"], env={"PROTECT_KEY": None})
    assert bad.exit_code != 0 and "--max-delta-e" in str(bad.exception)
