"""Discovery: class folders, label CSV, flat folders, hidden files, symlinks, odd names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from protect import InputError, discover

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
PNG = (SAMPLES / "cifar10" / "train" / "cat" / "0000.png").read_bytes()


def put(root: Path, *names: str, data: bytes = PNG) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def rels(ds) -> list[str]:
    return [e.rel for e in ds.entries]


def test_class_folders_give_sorted_classes_and_labels(tmp_path):
    put(tmp_path, "zebra/1.png", "ant/2.png", "mole/3.png", "ant/1.png")
    ds = discover(tmp_path)
    assert ds.classes == ["ant", "mole", "zebra"]
    assert ds.label_source == "folders" and ds.labelled
    assert [(e.rel, e.label) for e in ds.entries] == [
        ("ant/1.png", 0), ("ant/2.png", 0), ("mole/3.png", 1), ("zebra/1.png", 2)]
    assert ds.class_map == {"ant": 0, "mole": 1, "zebra": 2}
    assert all(e.path == tmp_path.resolve() / e.rel for e in ds.entries)


def test_nested_folders_inside_a_class_keep_the_class(tmp_path):
    put(tmp_path, "a/x.png", "a/deep/er/y.png", "b/sub/z.png")
    ds = discover(tmp_path)
    assert ds.classes == ["a", "b"]
    assert {e.rel: e.label for e in ds.entries} == {"a/deep/er/y.png": 0, "a/x.png": 0, "b/sub/z.png": 1}


def test_flat_folder_is_unlabelled(tmp_path):
    put(tmp_path, "b.png", "a.png")
    ds = discover(tmp_path)
    assert not ds.labelled and ds.classes == [] and ds.label_source == "none"
    assert rels(ds) == ["a.png", "b.png"] and all(e.label is None for e in ds.entries)


def test_images_beside_class_folders_make_the_folder_unlabelled(tmp_path, caplog):
    put(tmp_path, "top.png", "a/x.png", "b/y.png")
    ds = discover(tmp_path)
    assert not ds.labelled and rels(ds) == ["a/x.png", "b/y.png", "top.png"]
    assert "beside class folders" in caplog.text


def test_label_csv_with_names(tmp_path):
    put(tmp_path, "img/1.png", "img/2.png", "img/3.png")
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\nimg/1.png,dog\n./img/2.png,cat\nimg/3.png,dog\n", encoding="utf-8")
    ds = discover(tmp_path, csv)
    assert ds.label_source == "csv" and ds.classes == ["cat", "dog"]
    assert {e.rel: e.label for e in ds.entries} == {"img/1.png": 1, "img/2.png": 0, "img/3.png": 1}


def test_label_csv_with_integers_keeps_the_index(tmp_path):
    put(tmp_path, "1.png", "2.png", "3.png")
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n1.png,0\n2.png,4\n3.png,10\n", encoding="utf-8")
    ds = discover(tmp_path, csv)
    assert ds.classes == [str(i) for i in range(11)]
    assert {e.rel: e.label for e in ds.entries} == {"1.png": 0, "2.png": 4, "3.png": 10}


def test_label_csv_skips_unlisted_images(tmp_path):
    put(tmp_path, "1.png", "2.png")
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n1.png,a\n", encoding="utf-8")
    ds = discover(tmp_path, csv)
    assert rels(ds) == ["1.png"]
    assert ("2.png", "not in the label file") in ds.skipped


def test_label_csv_listing_a_missing_file_is_an_error(tmp_path):
    put(tmp_path, "1.png")
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n1.png,a\nghost.png,b\n", encoding="utf-8")
    with pytest.raises(InputError, match="ghost.png"):
        discover(tmp_path, csv)


def test_label_csv_needs_its_header(tmp_path):
    put(tmp_path, "1.png")
    csv = tmp_path / "labels.csv"
    csv.write_text("1.png,a\n", encoding="utf-8")
    with pytest.raises(InputError, match="header"):
        discover(tmp_path, csv)


def test_label_csv_duplicate_rows_are_an_error(tmp_path):
    put(tmp_path, "1.png", "2.png")
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n1.png,a\n2.png,b\n./1.png,b\n", encoding="utf-8")
    with pytest.raises(InputError, match="listed twice"):
        discover(tmp_path, csv)


def test_label_csv_not_found(tmp_path):
    put(tmp_path, "1.png")
    with pytest.raises(InputError, match="label file not found"):
        discover(tmp_path, tmp_path / "nope.csv")


def test_hidden_files_and_folders_are_skipped(tmp_path):
    put(tmp_path, "a/x.png", "a/.hidden.png", ".cache/a/y.png", "a/.thumbs/z.png", "b/w.png")
    ds = discover(tmp_path)
    assert rels(ds) == ["a/x.png", "b/w.png"]
    assert ds.classes == ["a", "b"]


def test_extensions_in_any_case_and_non_images_ignored(tmp_path):
    put(tmp_path, "a/1.PNG", "a/2.JpEg", "a/3.jpg", "a/4.WebP", "a/5.BMP", "a/6.Tif", "a/7.TIFF",
        "a/readme.txt", "a/anim.gif", "a/noext")
    ds = discover(tmp_path)
    assert rels(ds) == ["a/1.PNG", "a/2.JpEg", "a/3.jpg", "a/4.WebP", "a/5.BMP", "a/6.Tif", "a/7.TIFF"]
    assert [e.format for e in ds.entries] == ["PNG", "JPEG", "JPEG", "WEBP", "BMP", "TIFF", "TIFF"]


def test_symlinks_leaving_the_root_are_skipped_and_reported(tmp_path):
    root, outside = tmp_path / "in", tmp_path / "outside"
    put(root, "a/x.png")
    put(outside, "o.png", "d/p.png")
    os.symlink(outside / "o.png", root / "a" / "out.png")
    os.symlink(outside / "d", root / "a" / "outdir")
    ds = discover(root)
    assert rels(ds) == ["a/x.png"]
    skipped = dict(ds.skipped)
    assert set(skipped) == {"a/out.png", "a/outdir"}
    assert all("leaves the input folder" in why for why in skipped.values())


def test_symlinks_inside_the_root_are_followed(tmp_path):
    put(tmp_path, "a/x.png", "shared/s.png")
    os.symlink(tmp_path / "a" / "x.png", tmp_path / "a" / "alias.png")
    os.symlink(tmp_path / "shared", tmp_path / "b")
    ds = discover(tmp_path)
    assert rels(ds) == ["a/alias.png", "a/x.png", "b/s.png", "shared/s.png"]
    assert ds.classes == ["a", "b", "shared"] and ds.skipped == []


def test_symlink_loop_does_not_hang(tmp_path):
    put(tmp_path, "a/x.png")
    os.symlink(tmp_path / "a", tmp_path / "a" / "loop")
    assert rels(discover(tmp_path)) == ["a/x.png"]


def test_unicode_and_spaces_in_names(tmp_path):
    put(tmp_path, "chat noir/été à la plage.png", "日本/写真 1.png")
    ds = discover(tmp_path)
    assert ds.classes == ["chat noir", "日本"]
    assert rels(ds) == ["chat noir/été à la plage.png", "日本/写真 1.png"]
    assert all(e.path.is_file() for e in ds.entries)


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(InputError, match="no images"):
        discover(tmp_path)
    put(tmp_path, "a/readme.txt", ".hidden.png")
    with pytest.raises(InputError, match="no images"):
        discover(tmp_path)


def test_missing_or_file_input_is_an_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        discover(tmp_path / "nope")
    put(tmp_path, "f.png")
    with pytest.raises(InputError, match="not a folder"):
        discover(tmp_path / "f.png")
