"""``import_npz`` / ``protect import-npz``: exact PNGs, naming, class names, atomicity, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli.main import main
from protect.discover import discover
from protect.errors import InputError
from protect.npz import import_npz

BREAST = Path("/work/shared/data/medmnist/breastmnist.npz")


def arrays(colour: bool = False, n: tuple[int, int, int] = (12, 3, 5), classes: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for split, count in zip(("train", "val", "test"), n):
        shape = (count, 7, 9, 3) if colour else (count, 7, 9)
        out[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        out[f"{split}_labels"] = (np.arange(count) % classes).astype(np.uint8)[:, None]
    return out


def save(tmp_path: Path, data: dict, name: str = "d.npz") -> Path:
    path = tmp_path / name
    np.savez(path, **data)
    return path


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).copy()


@pytest.mark.parametrize("colour", [False, True])
def test_round_trip_is_exact(tmp_path, colour):
    data = arrays(colour)
    counts = import_npz(save(tmp_path, data), tmp_path / "out")
    assert counts == {"train": 12, "val": 3, "test": 5}
    for split in ("train", "val", "test"):
        images, labels = data[f"{split}_images"], data[f"{split}_labels"][:, 0]
        for i, (img, label) in enumerate(zip(images, labels)):
            got = read_png(tmp_path / "out" / split / str(label) / f"{split}_{i:04d}.png")
            assert got.dtype == np.uint8 and np.array_equal(got, img)
        assert len(list((tmp_path / "out" / split).rglob("*.png"))) == len(images)


def test_class_names_name_the_folders_and_discovery_reads_them(tmp_path):
    import_npz(save(tmp_path, arrays()), tmp_path / "out", ["benign", "malignant", "normal"])
    assert sorted(p.name for p in (tmp_path / "out/train").iterdir()) == ["benign", "malignant", "normal"]
    assert (tmp_path / "out/train/malignant/train_0001.png").is_file()
    ds = discover(tmp_path / "out/train")
    assert ds.classes == ["benign", "malignant", "normal"] and len(ds) == 12


def test_index_width_follows_the_split(tmp_path, monkeypatch):
    monkeypatch.setattr("protect.npz.MIN_DIGITS", 2)  # 4 by default; 101 images need 3 digits
    data = arrays(n=(101, 1, 1), classes=1)
    import_npz(save(tmp_path, data), tmp_path / "out")
    assert (tmp_path / "out/train/0/train_000.png").is_file()
    assert (tmp_path / "out/train/0/train_100.png").is_file()
    assert (tmp_path / "out/val/0/val_00.png").is_file()


def test_flat_labels_and_single_channel_images(tmp_path):
    data = arrays()
    data["train_labels"] = data["train_labels"][:, 0]
    data["val_images"] = data["val_images"][..., None]
    import_npz(save(tmp_path, data), tmp_path / "out")
    assert np.array_equal(read_png(tmp_path / "out/val/1/val_0001.png"), data["val_images"][1, :, :, 0])


def broken(change):
    def make(tmp_path):
        data = arrays()
        change(data)
        return save(tmp_path, data)
    return make


@pytest.mark.parametrize("make, names, reason", [
    (broken(lambda d: d.pop("val_labels")), None, "lacks val_labels"),
    (broken(lambda d: d.update(test_labels=d["test_labels"][:-1])), None,
     "test_images has 5 images but test_labels has 4"),
    (broken(lambda d: d.update(train_images=d["train_images"].astype(np.float32))), None, "float32 values; only uint8"),
    (broken(lambda d: d.update(train_images=d["train_images"][:, :, :, None].repeat(4, 3))), None, "has shape"),
    (broken(lambda d: d.update(train_labels=np.zeros((12, 4), np.uint8))), None, "multi-label"),
    (broken(lambda d: None), ["a", "b"], "2 class name\\(s\\) given for labels 0..2"),
    (broken(lambda d: None), ["a", "a", "b"], "given twice"),
    (broken(lambda d: None), ["a", ".b", "c"], "cannot be a folder name"),
    (lambda tmp_path: tmp_path / "absent.npz", None, "not found"),
    (lambda tmp_path: (tmp_path / "bad.npz").write_bytes(b"not a zip") and tmp_path / "bad.npz", None, "cannot read"),
])
def test_errors_are_one_line_and_write_nothing(tmp_path, make, names, reason):
    path = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(InputError, match=reason) as info:
        import_npz(path, tmp_path / "out", names)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_non_empty_output_is_refused_and_an_empty_one_is_used(tmp_path):
    path = save(tmp_path, arrays())
    (tmp_path / "full").mkdir()
    (tmp_path / "full/keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        import_npz(path, tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    import_npz(path, tmp_path / "empty")
    assert (tmp_path / "empty/test/0/test_0000.png").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    path = save(tmp_path, arrays())

    def fail(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", fail)
    with pytest.raises(InputError, match="No space left"):
        import_npz(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz"]


def test_cli(tmp_path, capsys):
    path = save(tmp_path, arrays())
    main(["import-npz", str(path), str(tmp_path / "out"), "--class-names", "x,y,z"])
    assert "wrote 20 image(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["import-npz", str(path), str(tmp_path / "out2"), "--class-names", "x,y"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "class name" in err


@pytest.mark.skipif(not BREAST.is_file(), reason=f"{BREAST} is not present")
def test_breastmnist_counts(tmp_path):
    counts = import_npz(BREAST, tmp_path / "breast", ["malignant", "benign"])
    with np.load(BREAST) as z:
        assert counts == {s: len(z[f"{s}_images"]) for s in ("train", "val", "test")}
        labels = z["train_labels"][:, 0]
    assert len(list((tmp_path / "breast/train/benign").glob("*.png"))) == int((labels == 1).sum())
    assert len(discover(tmp_path / "breast/test")) == counts["test"]
