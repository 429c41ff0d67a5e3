"""--holdout: one folder and its originals certify themselves; the held-out images never train."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli.main import main
from verify.data import load_folder
from verify.recipes import get_recipe
from verify.run import verify_folder
from verify.uncertainty import split_holdout

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples" / "cifar10" / "train"


def folders(root: Path, per_class: int = 10) -> tuple[Path, Path]:
    """Originals as JPEG (quality 95) and 'protected' copies as PNG (each value +3, wrapped), three
    classes of ``per_class`` sample images: the same images under other extensions."""
    clean, prot = root / "clean", root / "prot"
    for cls in ("airplane", "cat", "ship"):
        (clean / cls).mkdir(parents=True)
        (prot / cls).mkdir(parents=True)
        for f in sorted((SAMPLES / cls).glob("*.png"))[:per_class]:
            a = np.asarray(Image.open(f).convert("RGB"))
            Image.fromarray(a).save(clean / cls / (f.stem + ".jpg"), quality=95)
            Image.fromarray(((a.astype(np.int16) + 3) % 256).astype(np.uint8)).save(prot / cls / (f.stem + ".png"))
    return clean, prot


def test_the_split_is_keyed_stratified_and_matched_by_path(tmp_path: Path) -> None:
    clean_dir, prot_dir = folders(tmp_path)
    clean, prot = load_folder(clean_dir), load_folder(prot_dir)
    c_train, p_train, test, info = split_holdout(clean, prot, 0.3)
    assert test.counts() == [3, 3, 3] and c_train.counts() == [7, 7, 7] and p_train.counts() == [7, 7, 7]
    stems = lambda s: {r.rsplit(".", 1)[0] for r in s.rels}  # noqa: E731
    assert not stems(test) & stems(p_train) and not stems(test) & stems(c_train)  # held-out images never train
    assert info["protected_removed"] == 9 and info["test_images"] == 9
    again = split_holdout(clean, prot, 0.3)[2]
    assert again.rels == test.rels  # the same folders give the same test set
    # the path alone ranks the images: of the first 6 per class, those held out among all 10 are
    # also held out when the other 4 are not there (3 of 6 and 3 of 10 per class)
    fewer = split_holdout(load_folder(clean_dir, max_per_class=6), load_folder(prot_dir, max_per_class=6), 0.5)[2]
    first6 = set(load_folder(clean_dir, max_per_class=6).rels)
    assert set(test.rels) & first6 <= set(fewer.rels) and len(fewer) == 9
    with pytest.raises(ValueError):
        split_holdout(clean, prot, 1.0)


def test_verify_with_holdout_records_it_and_refuses_bad_combinations(tmp_path: Path, capsys) -> None:
    clean_dir, prot_dir = folders(tmp_path)
    cert = verify_folder(prot_dir, None, clean_dir, tier=get_recipe("quick", epochs=1, batch_size=8),
                         trainings="erm", defenses="none", seeds=1, device="cpu", report_dir=False,
                         cache_dir=False, progress=False, holdout=0.3)
    held = cert["data"]["holdout"]
    assert held["test_images"] == 9 and held["protected_training"] == 21 and cert["data"]["train"]["count"] == 21
    assert cert["data"]["test"]["count"] + cert["data"]["validation"]["count"] == 9
    base = ["verify", str(prot_dir), "--no-cache", "-q"]
    for extra, words in ((["--clean", str(clean_dir), "--holdout", "0.3", "--test", str(clean_dir)], "leave out --test"),
                         (["--holdout", "0.3"], "--holdout needs the clean originals"),
                         (["--clean", str(clean_dir), "--holdout", "1.5"], "between 0 and 1"),
                         (["--clean", str(clean_dir)], "--holdout F")):
        with pytest.raises(SystemExit) as exit_:
            main(base + extra)  # the console entry point: one line, a non-zero status, before any loading
        err = capsys.readouterr().err
        assert exit_.value.code != 0 and words in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_holdout_too_small_to_choose_epochs_is_one_line_before_training(tmp_path: Path, capsys) -> None:
    """Two images per class and --holdout 0.2: one test image per class, none left to choose each
    cell's epoch on; a one-line error before any training, not an internal error after it."""
    clean_dir, prot_dir = folders(tmp_path, per_class=2)
    with pytest.raises(SystemExit) as exit_:
        main(["verify", str(prot_dir), "--clean", str(clean_dir), "--holdout", "0.2", "--no-cache", "-q",
              "--training", "erm", "--defenses", "none", "--report", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert exit_.value.code != 0 and "fewer than 2 of every class" in err and "--val" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "report").exists()  # no debris
