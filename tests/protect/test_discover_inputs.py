"""Inputs named on the command line: image files one by one, or one folder (discover_inputs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from protect import InputError
from protect.discover import discover_files, discover_inputs

PNG = (Path(__file__).resolve().parents[2] / "samples" / "cifar10" / "train" / "cat" / "0000.png").read_bytes()


def put(root: Path, *names: str) -> list[Path]:
    paths = []
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(PNG)
        paths.append(path)
    return paths


def rels(ds) -> list[str]:
    return [e.rel for e in ds.entries]


def test_one_file_is_a_dataset_rooted_at_its_folder(tmp_path):
    photo, _ = put(tmp_path, "holiday/photo.jpg", "holiday/other.jpg")
    ds = discover_files([photo])
    assert ds.given_files and not ds.labelled and ds.label_source == "none" and ds.skipped == []
    assert ds.root == (tmp_path / "holiday").resolve()
    assert rels(ds) == ["photo.jpg"]  # the file beside it is not part of the run
    assert ds.entries[0].path == photo.resolve() and ds.entries[0].format == "JPEG" and ds.entries[0].label is None


def test_same_name_in_two_folders_stays_two_entries(tmp_path):
    a, b = put(tmp_path, "shoot/a/x.jpg", "shoot/b/x.jpg")
    ds = discover_files([str(b), a])
    assert ds.root == (tmp_path / "shoot").resolve()
    assert rels(ds) == ["a/x.jpg", "b/x.jpg"]
    assert [e.path for e in ds.entries] == [a.resolve(), b.resolve()]


def test_deepest_common_parent_and_nested_files(tmp_path):
    paths = put(tmp_path, "p/q/r/1.png", "p/q/s/t/2.HEIC", "p/q/3.webp")
    ds = discover_files(paths)
    assert ds.root == (tmp_path / "p" / "q").resolve()
    assert rels(ds) == ["3.webp", "r/1.png", "s/t/2.HEIC"]
    assert [e.format for e in ds.entries] == ["WEBP", "PNG", "HEIF"]


def test_duplicates_are_collapsed(tmp_path, monkeypatch):
    (x,) = put(tmp_path, "d/x.png")
    monkeypatch.chdir(tmp_path / "d")
    ds = discover_files(["x.png", x, "./x.png", str(tmp_path / "d" / ".." / "d" / "x.png")])
    assert rels(ds) == ["x.png"] and ds.root == (tmp_path / "d").resolve()


def test_relative_paths_and_a_linked_folder(tmp_path, monkeypatch):
    put(tmp_path, "real/x.png", "real/y.png")
    os.symlink(tmp_path / "real", tmp_path / "alias")
    monkeypatch.chdir(tmp_path)
    ds = discover_files(["alias/x.png", "real/y.png"])
    assert ds.root == (tmp_path / "real").resolve() and rels(ds) == ["x.png", "y.png"]


def test_a_link_to_a_file_keeps_the_name_given(tmp_path):
    (target,) = put(tmp_path, "store/IMG_1234.jpg")
    (tmp_path / "pick").mkdir()
    os.symlink(target, tmp_path / "pick" / "best.jpg")
    ds = discover_files([tmp_path / "pick" / "best.jpg"])
    assert rels(ds) == ["best.jpg"] and ds.root == (tmp_path / "pick").resolve()
    assert ds.entries[0].path.read_bytes() == PNG


def test_one_path_given_as_a_string_is_one_file(tmp_path):
    (x,) = put(tmp_path, "x.png")
    assert rels(discover_files(str(x))) == ["x.png"]
    assert rels(discover_inputs(x)) == ["x.png"]


@pytest.mark.parametrize("name, match", [
    ("shot.NEF", r"camera RAW \(\.nef\) is not read: export it to JPEG or TIFF first"),
    ("shot.dng", r"camera RAW \(\.dng\)"),
    ("notes.txt", r"'\.txt' is not a supported image extension \(supported: \.png, \.jpg, .*\.heic"),
    ("anim.gif", r"not a supported image extension"),
    ("README", r"has no image extension"),
])
def test_unsupported_files_are_refused_with_a_hint(tmp_path, name, match):
    good, bad = put(tmp_path, "ok.png", name)
    with pytest.raises(InputError, match=match) as info:
        discover_files([good, bad])
    assert name in str(info.value) and "\n" not in str(info.value)


def test_missing_file_is_an_error(tmp_path):
    (good,) = put(tmp_path, "ok.png")
    with pytest.raises(InputError, match="input file not found: .*gone.png"):
        discover_files([good, tmp_path / "gone.png"])
    os.symlink("nowhere.png", tmp_path / "dangling.png")
    with pytest.raises(InputError, match="input file not found"):
        discover_files([tmp_path / "dangling.png"])
    os.symlink("loop.png", tmp_path / "loop.png")
    with pytest.raises(InputError, match="loop"):
        discover_files([tmp_path / "loop.png"])


def test_special_files_are_refused_without_opening(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(InputError, match="FIFO, not a regular file"):
        discover_files([tmp_path / "pipe.png"])  # would block forever if opened


def test_folders_are_refused_among_files(tmp_path):
    (x,) = put(tmp_path, "d/x.png")
    with pytest.raises(InputError, match="is a folder"):
        discover_files([tmp_path / "d"])
    with pytest.raises(InputError, match="is a folder"):
        discover_inputs([x, tmp_path / "d"])
    put(tmp_path, "e/y.png")
    with pytest.raises(InputError, match="2 input folders"):
        discover_inputs([tmp_path / "d", tmp_path / "e"])


def test_nothing_given_is_an_error():
    with pytest.raises(InputError, match="no input given"):
        discover_files([])
    with pytest.raises(InputError, match="no input given"):
        discover_inputs([])


def test_names_that_are_not_utf8_are_refused(tmp_path):
    base = os.fsencode(tmp_path)
    try:
        with open(base + b"/caf\xe9.png", "wb") as fh:
            fh.write(PNG)
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    with pytest.raises(InputError, match=r"caf\\xe9.png.*not valid UTF-8"):
        discover_files([base + b"/caf\xe9.png"])
    with pytest.raises(InputError, match="not valid UTF-8"):
        discover_files([os.fsdecode(base + b"/caf\xe9.png")])


def test_inputs_one_folder_is_discovered_with_its_labels(tmp_path):
    put(tmp_path, "in/cat/1.png", "in/dog/2.png", "in/dog/3.nef")
    ds = discover_inputs([tmp_path / "in"])
    assert not ds.given_files and ds.label_source == "folders" and ds.classes == ["cat", "dog"]
    assert rels(ds) == ["cat/1.png", "dog/2.png"] and [r for r, _ in ds.skipped] == ["dog/3.nef"]
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\ncat/1.png,a\ndog/2.png,b\n", encoding="utf-8")
    assert discover_inputs([str(tmp_path / "in")], csv).label_source == "csv"


def test_inputs_files_go_to_discover_files_and_refuse_labels(tmp_path):
    a, b = put(tmp_path, "a/x.jpg", "b/x.jpg")
    ds = discover_inputs([a, b])
    assert ds.given_files and rels(ds) == ["a/x.jpg", "b/x.jpg"]
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\na/x.jpg,a\n", encoding="utf-8")
    with pytest.raises(InputError, match="--labels needs an input folder"):
        discover_inputs([a, b], csv)


def test_inputs_missing_path_is_not_found(tmp_path):
    with pytest.raises(InputError, match="input folder not found: .*photos$"):
        discover_inputs([tmp_path / "photos"])
    for name in ("photo.jpg", "shot.NEF"):
        with pytest.raises(InputError, match=f"input file not found: .*{name}$"):
            discover_inputs([tmp_path / name])
    put(tmp_path, "x.png")
    with pytest.raises(InputError, match="input file not found: .*photos$"):
        discover_inputs([tmp_path / "x.png", tmp_path / "photos"])
