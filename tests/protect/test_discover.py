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


def test_label_csv_integer_labels_are_names_in_natural_order(tmp_path):
    put(tmp_path, "1.png", "2.png", "3.png")
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n1.png,0\n2.png,4\n3.png,10\n", encoding="utf-8")
    ds = discover(tmp_path, csv)
    assert ds.classes == ["0", "4", "10"]  # no invented classes 1..3, 5..9; "4" before "10"
    assert {e.rel: e.label for e in ds.entries} == {"1.png": 0, "2.png": 1, "3.png": 2}


def test_label_csv_zero_padded_and_mixed_labels_are_distinct_names(tmp_path):
    names = ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]
    put(tmp_path, *names)
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n" + "".join(f"{n},{lab}\n" for n, lab in zip(
        names, ["01", "1", "cat", "10", "2", "01"])), encoding="utf-8")
    ds = discover(tmp_path, csv)  # was an internal KeyError
    assert ds.classes == ["01", "1", "2", "10", "cat"]
    assert {e.rel: ds.classes[e.label] for e in ds.entries} == {
        "a.png": "01", "b.png": "1", "c.png": "cat", "d.png": "10", "e.png": "2", "f.png": "01"}


def test_label_csv_large_numeric_label_is_one_class(tmp_path):
    put(tmp_path, "1.png", "2.png")
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n1.png,20230101\n2.png,20230101\n", encoding="utf-8")
    ds = discover(tmp_path, csv)  # was 20 million classes
    assert ds.classes == ["20230101"] and [e.label for e in ds.entries] == [0, 0]


def test_class_names_order():
    from protect.discover import class_names

    assert class_names(["10", "2", "b", "a", "02", "-1", "1", "2"]) == ["1", "02", "2", "10", "-1", "a", "b"]
    assert class_names(["٣", "3"]) == ["3", "٣"]  # only ASCII digits count as integers


def test_label_csv_unreadable_content_is_an_input_error(tmp_path):
    put(tmp_path, "1.png")
    csv = tmp_path / "labels.csv"
    csv.write_bytes(b"path,label\n1.png,\"" + b"a" * 200_000 + b"\"\n")  # csv.Error: field larger than the limit
    with pytest.raises(InputError, match="cannot read label file"):
        discover(tmp_path, csv)
    csv.write_bytes(b"path,label\n1.png,\xff\xfe\n")
    with pytest.raises(InputError, match="cannot read label file"):
        discover(tmp_path, csv)


def test_label_csv_listing_a_skipped_entry_is_not_an_error(tmp_path):
    put(tmp_path, "1.png", "2.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n1.png,a\n2.png,b\ndangling.png,c\n", encoding="utf-8")
    ds = discover(tmp_path, csv)
    assert rels(ds) == ["1.png", "2.png"] and ds.classes == ["a", "b"]  # no class for the skipped one
    assert "broken symbolic link" in dict(ds.skipped)["dangling.png"]


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


# -- odd trees: discovery never raises, never opens a file, and says why it skipped ----------
def test_odd_links_are_skipped_with_a_reason(tmp_path):
    root, outside = tmp_path / "in", tmp_path / "outside"
    put(root, "a/x.png", "b/y.png", "target/t.png")
    put(outside, "o.png")
    a = root / "a"
    os.symlink("self.png", a / "self.png")  # points to itself: was "internal error: Symlink loop"
    os.symlink("ping.png", a / "pong.png")
    os.symlink("pong.png", a / "ping.png")
    os.symlink("missing.png", a / "dangling.png")
    os.symlink("noext", a / "dangling")  # any link not followed is reported, whatever its name
    os.symlink("x.png", a / "chain1.png")  # chain inside: followed
    os.symlink("chain1.png", a / "chain2.png")
    os.symlink(outside / "o.png", a / "hop.png")  # chain leaving the folder
    os.symlink("hop.png", a / "chain-out.png")
    os.symlink(root, a / "to-root")
    os.symlink("../target", root / "b" / "linked")  # folder link inside: followed
    ds = discover(root)
    assert rels(ds) == ["a/chain1.png", "a/chain2.png", "a/x.png", "b/linked/t.png", "b/y.png", "target/t.png"]
    skipped = dict(ds.skipped)
    assert set(skipped) == {"a/self.png", "a/ping.png", "a/pong.png", "a/dangling.png", "a/dangling",
                            "a/hop.png", "a/chain-out.png", "a/to-root"}
    for rel in ("a/self.png", "a/ping.png", "a/pong.png"):
        assert "symbolic link loop" in skipped[rel]
    assert "broken symbolic link" in skipped["a/dangling.png"]
    assert "leaves the input folder" in skipped["a/hop.png"] and "leaves" in skipped["a/chain-out.png"]
    assert "loop" in skipped["a/to-root"]
    assert ds.skipped == sorted(ds.skipped)


def test_root_given_through_a_link(tmp_path):
    put(tmp_path, "real/a/x.png")
    os.symlink(tmp_path / "real", tmp_path / "alias")
    ds = discover(tmp_path / "alias")
    assert rels(ds) == ["a/x.png"] and ds.skipped == []


def test_a_folder_named_like_an_image_is_a_folder(tmp_path):
    put(tmp_path, "a/x.png/inner.png", "a/y.png", "b/empty.jpg/readme.txt", "b/z.png")
    ds = discover(tmp_path)
    assert rels(ds) == ["a/x.png/inner.png", "a/y.png", "b/z.png"] and ds.skipped == []


def _run_with_timeout(fn, seconds: float = 10.0):
    """Run ``fn`` in a daemon thread: a discovery that opened a FIFO would block forever."""
    import threading

    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "discovery blocked (did it open a FIFO?)"
    return result["value"]


def test_special_files_with_image_names_are_never_opened(tmp_path, monkeypatch):
    import socket

    put(tmp_path, "a/x.png")
    os.mkfifo(tmp_path / "a" / "fifo.png")
    os.mkfifo(tmp_path / "a" / "fifo.txt")  # not an image name: ignored silently
    os.symlink("fifo.png", tmp_path / "a" / "to-fifo.jpg")
    monkeypatch.chdir(tmp_path / "a")  # AF_UNIX paths are limited to ~100 bytes: bind a short one
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind("sock.webp")
        expected = {"a/fifo.png": "FIFO", "a/to-fifo.jpg": "FIFO", "a/sock.webp": "socket"}
        try:
            os.mknod(tmp_path / "a" / "dev.bmp", 0o600 | __import__("stat").S_IFCHR, os.makedev(1, 3))
            expected["a/dev.bmp"] = "character device"
        except (PermissionError, OSError):
            pass  # creating devices needs privileges
        ds = _run_with_timeout(lambda: discover(tmp_path))
    finally:
        sock.close()
    assert rels(ds) == ["a/x.png"]
    skipped = dict(ds.skipped)
    assert set(skipped) == set(expected)
    for rel, kind in expected.items():
        assert kind in skipped[rel] and "not a regular file" in skipped[rel]


def test_names_that_are_not_utf8_are_skipped(tmp_path):
    put(tmp_path, "a/x.png", "b/y.png")
    base = os.fsencode(tmp_path)
    try:
        with open(base + b"/a/caf\xe9.png", "wb") as fh:
            fh.write(PNG)
        os.mkdir(base + b"/b/d\xff")
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    with open(base + b"/b/d\xff/z.png", "wb") as fh:
        fh.write(PNG)
    with open(base + b"/a/notes\xff.txt", "wb") as fh:
        fh.write(b"not an image")
    ds = discover(tmp_path)
    assert rels(ds) == ["a/x.png", "b/y.png"]
    assert ds.skipped == [("a/caf\\xe9.png", "name is not valid UTF-8; rename it"),
                          ("b/d\\xff", "name is not valid UTF-8; rename it")]
    import json

    json.dumps(ds.skipped, ensure_ascii=False).encode("utf-8")  # writable in a UTF-8 record


def test_unlistable_folders_are_skipped_with_a_reason(tmp_path, monkeypatch):
    put(tmp_path, "a/x.png", "a/locked/y.png", "b/z.png")
    real_scandir = os.scandir

    def scandir(path):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    ds = discover(tmp_path)
    assert rels(ds) == ["a/x.png", "b/z.png"]
    assert ds.skipped == [("a/locked", "cannot list folder: Permission denied")]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any folder")
def test_unreadable_folder_by_permissions(tmp_path):
    put(tmp_path, "a/x.png", "a/locked/y.png", "b/z.png")
    (tmp_path / "a" / "locked").chmod(0)
    try:
        ds = discover(tmp_path)
    finally:
        (tmp_path / "a" / "locked").chmod(0o755)
    assert rels(ds) == ["a/x.png", "b/z.png"]
    assert [rel for rel, _ in ds.skipped] == ["a/locked"]


# -- photographers' folders: HEIF is an image, camera RAW is listed with a hint --------------
def test_photographer_folder_heic_listed_raw_skipped_junk_ignored(tmp_path):
    put(tmp_path, "IMG_0001.jpg", "IMG_0002.HEIC", "IMG_0003.heif", "DSC_0004.NEF", "notes.txt",
        ".DS_Store", "._IMG_0001.jpg", "._DSC_0004.NEF")
    ds = discover(tmp_path)
    assert rels(ds) == ["IMG_0001.jpg", "IMG_0002.HEIC", "IMG_0003.heif"]
    assert [e.format for e in ds.entries] == ["JPEG", "HEIF", "HEIF"]
    assert ds.skipped == [("DSC_0004.NEF", "camera RAW (.nef) is not read: export it to JPEG or TIFF first")]
    assert not ds.given_files


@pytest.mark.parametrize("ext", [".nef", ".NEF", ".cr2", ".Cr3", ".arw", ".dng", ".raf", ".orf", ".rw2", ".nrw",
                                 ".pef", ".srw", ".rwl", ".3fr", ".erf", ".kdc", ".mrw", ".x3f", ".iiq"])
def test_every_raw_extension_is_skipped_with_a_reason(tmp_path, ext):
    put(tmp_path, "a/x.png", f"a/shot{ext}")
    ds = discover(tmp_path)
    assert rels(ds) == ["a/x.png"]
    assert ds.skipped == [(f"a/shot{ext}", f"camera RAW ({ext.lower()}) is not read: export it to JPEG or TIFF first")]


def test_raw_through_links_and_odd_raw_entries(tmp_path):
    put(tmp_path, "a/x.png", "a/real.cr2", "a/raw.nef/inner.png")  # a folder named like a RAW file is a folder
    os.symlink("real.cr2", tmp_path / "a" / "alias.CR2")
    os.mkfifo(tmp_path / "a" / "pipe.dng")
    ds = _run_with_timeout(lambda: discover(tmp_path))
    assert rels(ds) == ["a/raw.nef/inner.png", "a/x.png"]
    skipped = dict(ds.skipped)
    assert set(skipped) == {"a/alias.CR2", "a/real.cr2", "a/pipe.dng"}
    raw = "camera RAW (.cr2) is not read: export it to JPEG or TIFF first"
    assert skipped["a/alias.CR2"] == skipped["a/real.cr2"] == raw
    assert "FIFO" in skipped["a/pipe.dng"]


def test_folder_of_only_raw_files_says_so(tmp_path):
    put(tmp_path, "DSC_1.NEF", "DSC_2.nef", "IMG_3.CR3", ".DS_Store", "notes.txt")
    with pytest.raises(InputError) as info:
        discover(tmp_path)
    message = str(info.value)
    assert "no images" in message and "3 camera RAW file(s) (.cr3, .nef)" in message
    assert "export them to JPEG or TIFF first" in message
    assert "\n" not in message


def test_no_images_message_lists_the_supported_extensions(tmp_path):
    from protect.discover import IMAGE_EXTENSIONS

    put(tmp_path, "notes.txt")
    with pytest.raises(InputError) as info:
        discover(tmp_path)
    message = str(info.value)
    for ext in IMAGE_EXTENSIONS:
        assert ext.lstrip(".") in message
    assert "heic" in message and "RAW" not in message


def test_label_csv_listing_a_raw_file_is_not_an_error(tmp_path):
    put(tmp_path, "1.png", "2.png", "3.nef")
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n1.png,a\n2.png,b\n3.nef,a\n", encoding="utf-8")
    ds = discover(tmp_path, csv)
    assert rels(ds) == ["1.png", "2.png"]
    assert dict(ds.skipped)["3.nef"].startswith("camera RAW (.nef)")
