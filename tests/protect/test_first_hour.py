"""What a new user meets first (issue 17): a private record, no debris after a refusal, a refusal
to protect a protected folder twice, a rerun that resumes the recorded method, single files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from protect import InputError, ProtectOptions, RecordError, protect_folder
from protect.keys import write_key_file
from protect.errors import KeyMaterialError
from tests.tiny import tree


def run(in_dir, out_dir, keyring, **options):
    return protect_folder(in_dir, out_dir, keyring, ProtectOptions(progress=False, workers=1, **options))


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


posix_only = pytest.mark.skipif(os.name != "posix", reason="Unix permissions")


# -- item 4: the record and the key are private -----------------------------------------------
@posix_only
def test_record_folder_is_0700_and_its_files_0600(tmp_path, keyring, make_folder):
    inp = make_folder(per_class=2)
    old = os.umask(0o022)
    try:
        run(inp, tmp_path / "out", keyring)
    finally:
        os.umask(old)
    record = tmp_path / "out.protect"
    assert mode(record) == 0o700
    files = [p for p in record.iterdir() if p.is_file()]
    assert {p.name for p in files} >= {"journal.jsonl", "manifest.json", "lock"}
    assert all(mode(p) == 0o600 for p in files), {p.name: oct(mode(p)) for p in files}
    assert mode(tmp_path / "out") & 0o077  # the output itself is for publishing: not made private


@posix_only
def test_an_old_world_readable_record_is_tightened_on_resume(tmp_path, keyring, make_folder):
    inp = make_folder(per_class=2)
    run(inp, tmp_path / "out", keyring)
    record = tmp_path / "out.protect"
    os.chmod(record, 0o755)
    for p in record.iterdir():
        os.chmod(p, 0o644)
    run(inp, tmp_path / "out", keyring)
    assert mode(record) == 0o700 and all(mode(p) == 0o600 for p in record.iterdir())


@posix_only
def test_keygen_file_is_0600_and_never_overwritten(tmp_path):
    path = write_key_file(tmp_path / "owner.key", "0123456789abcdef0123456789abcdef")
    assert mode(path) == 0o600 and path.read_text() == "0123456789abcdef0123456789abcdef\n"
    with pytest.raises(KeyMaterialError, match="never overwritten"):
        write_key_file(path, "another")
    assert path.read_text().startswith("0123456789abcdef")


# -- item 3: a refusal leaves nothing behind ----------------------------------------------------
def test_a_refused_run_removes_the_folders_it_created(tmp_path, keyring, make_folder):
    inp = make_folder(per_class=1)
    before = tree(tmp_path)
    # a surrogate with no weights file: the fit fails after the folders and the lock were made
    with pytest.raises(Exception):
        run(inp, tmp_path / "deep" / "out", keyring, method="uc",
            params={"surrogate": "cifar-resnet20", "surrogate_weights": str(tmp_path / "missing.th")})
    assert tree(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_a_refusal_keeps_folders_the_user_made(tmp_path, keyring, make_folder):
    inp = make_folder(per_class=1)
    (tmp_path / "out").mkdir()
    with pytest.raises(Exception):
        run(inp, tmp_path / "out", keyring, method="uc",
            params={"surrogate": "cifar-resnet20", "surrogate_weights": str(tmp_path / "missing.th")})
    assert (tmp_path / "out").is_dir() and not any((tmp_path / "out").iterdir())
    assert not (tmp_path / "out.protect").exists()


# -- item 6: protecting twice is refused ----------------------------------------------------------
def test_protecting_an_output_again_is_refused_then_allowed(tmp_path, keyring, make_folder):
    inp = make_folder(per_class=2)
    run(inp, tmp_path / "out", keyring)
    before = tree(tmp_path)
    with pytest.raises(InputError, match="--allow-reprotect"):
        run(tmp_path / "out", tmp_path / "twice", keyring)
    assert tree(tmp_path) == before and not (tmp_path / "twice").exists()
    s = run(tmp_path / "out", tmp_path / "twice", keyring, allow_reprotect=True)
    assert s.done == 4 and any("output of a protect run" in w for w in s.warnings)


def test_a_moved_output_is_recognised_by_its_hashes(tmp_path, keyring, make_folder):
    inp = make_folder(per_class=2)
    run(inp, tmp_path / "out", keyring, record_dir=tmp_path / "private.protect")
    (tmp_path / "out").rename(tmp_path / "published")
    with pytest.raises(InputError, match="is an output listed in"):
        run(tmp_path / "published", tmp_path / "twice", keyring)


def test_protecting_the_originals_again_elsewhere_is_not_a_reprotect(tmp_path, keyring, make_folder):
    inp = make_folder(per_class=2)
    run(inp, tmp_path / "out", keyring)
    assert run(inp, tmp_path / "out2", keyring).done == 4  # in.protect does not exist; out.protect lists outputs


# -- item 7: a rerun without --method resumes the recorded method -------------------------------
def test_rerun_without_method_resumes_the_recorded_one(tmp_path, keyring, make_folder):
    inp = make_folder(per_class=3)
    params = {"surrogate": "cifar-resnet20", "clusters": 2, "steps": 5}
    first = run(inp, tmp_path / "out", keyring, method="uc", params=params)
    again = run(inp, tmp_path / "out", keyring)
    assert again.method == "uc" and again.skipped == first.done == 6 and again.done == 0
    assert "recorded" in again.method_note


# -- item 1: an unlabelled folder gets the label-free method -------------------------------------
def test_unlabelled_folder_defaults_to_a_label_free_method(tmp_path, keyring, make_folder):
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(make_folder(per_class=3).rglob("*.png")):
        p.rename(flat / f"{p.parent.name}-{p.name}")
    s = run(flat, tmp_path / "out", keyring, params={"steps": 5})  # the method is chosen, the fit kept short
    assert s.method == "uc" and s.done == 6 and "no labels" in s.method_note


# -- item 11: single files ------------------------------------------------------------------------
def test_single_and_several_files(tmp_path, keyring, make_folder):
    inp = make_folder(per_class=2)
    files = sorted(inp.rglob("*.png"))
    before = tree(inp)
    one = run([files[0]], tmp_path / "one", keyring, method="uc",
              params={"surrogate": "cifar-resnet20", "clusters": 1})
    assert one.done == 1 and [p.name for p in (tmp_path / "one").iterdir()] == [files[0].name]
    several = run(files[:3], tmp_path / "several", keyring, method="uc",
                  params={"surrogate": "cifar-resnet20", "clusters": 2, "steps": 5})
    assert several.done == 3
    written = sorted(str(p.relative_to(tmp_path / "several")) for p in (tmp_path / "several").rglob("*.png"))
    assert written == sorted(str(f.relative_to(inp)) for f in files[:3])
    assert tree(inp) == before


def test_files_cannot_be_written_over_themselves(tmp_path, keyring, make_folder):
    inp = make_folder(per_class=1)
    f = sorted(inp.rglob("*.png"))[0]
    with pytest.raises(InputError, match="overwrite the input"):
        run([f], f.parent, keyring, method="uc", params={"surrogate": "cifar-resnet20", "clusters": 1})


def test_manifest_names_the_given_files(tmp_path, keyring, make_folder):
    inp = make_folder(per_class=1)
    files = sorted(inp.rglob("*.png"))
    run(files, tmp_path / "out", keyring, method="uc", params={"surrogate": "cifar-resnet20", "clusters": 2, "steps": 5})
    manifest = json.loads((tmp_path / "out.protect" / "manifest.json").read_text())
    assert sorted(manifest["inputs"]) == sorted(str(f.relative_to(inp)) for f in files)


def test_record_error_is_still_raised_for_a_foreign_record(tmp_path, keyring, make_folder):
    inp = make_folder(per_class=1)
    (tmp_path / "out.protect").mkdir()
    (tmp_path / "out.protect" / "journal.jsonl").write_text("not a record\n")
    with pytest.raises(RecordError):
        run(inp, tmp_path / "out", keyring, method="cuda")
