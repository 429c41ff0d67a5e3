"""A seeded corpus of odd files through the real command line.

About 90 valid images of every mode each format holds, beside more than 200 malformed or refused
files (truncations, bit flips, random bytes, empty files, wrong extensions, decompression bombs,
lying headers, CMYK, 16-bit colour, multi-frame) and entries discovery must skip (links that leave
the folder, loop or dangle, a FIFO, a name that is not UTF-8), all built at test time in two class
folders (see ``tests/corpus.py``). ``protect images --json`` must write every valid image, name
every malformed one with a reason and write nothing for it, exit 1 without a traceback, leave the
input untouched, change nothing on a rerun, and leave a record that ``protect inspect --check``
accepts.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import TEST_KEY
from tests.corpus import build_corpus

PROTECT = Path(sys.executable).with_name("protect")


def cli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [str(PROTECT)] if PROTECT.is_file() else [sys.executable, "-m", "cli.main"]
    env = {k: v for k, v in os.environ.items() if k not in ("PROTECT_KEY", "PROTECT_DEBUG")}
    # a hang (a FIFO opened for reading) fails the test through the timeout
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=Path(__file__).resolve().parents[2])


def snapshot(root: Path) -> dict[bytes, tuple]:
    """Every entry under ``root`` (bytes names, links not followed, nothing opened but regular
    files): type, permission bits, size, mtime and the content hash or the link target."""
    out: dict[bytes, tuple] = {}
    base = os.fsencode(root)
    for folder, dirs, files in os.walk(base, followlinks=False):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                what = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as fh:
                    what = hashlib.sha256(fh.read()).hexdigest()
            else:
                what = None
            out[os.path.relpath(path, base)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_size,
                                                st.st_mtime_ns, what)
        out[os.path.relpath(folder, base)] = ("dir", os.lstat(folder).st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    inp, out, outside = tmp / "in", tmp / "out", tmp / "outside"
    corpus = build_corpus(inp, outside, seed=20240601)
    before = snapshot(inp), snapshot(outside)
    command = ["images", inp, out, "--key", TEST_KEY, "--json", "--device", "cpu", "--workers", "2"]
    first = cli(*command)
    after_first = snapshot(out)
    second = cli(*command)
    return corpus, inp, out, outside, before, first, after_first, second


def summary_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout)


def test_corpus_is_large_and_mixed(corpus_run):
    corpus = corpus_run[0]
    assert len(corpus.malformed) >= 200 and len(corpus.valid) >= 60 and len(corpus.skipped) >= 6


def test_exit_code_and_no_traceback(corpus_run):
    first, second = corpus_run[5], corpus_run[7]
    for proc in (first, second):
        assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr[-3000:]
        assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])


def test_every_valid_image_is_written_and_nothing_else(corpus_run):
    corpus, inp, out = corpus_run[:3]
    summary = summary_of(corpus_run[5])
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() or p.is_symlink()}
    missing = sorted(set(corpus.valid) - written)
    assert not missing, (missing, [f for f in summary["failures"] if f["path"] in missing])
    assert written == set(corpus.valid), sorted(written - set(corpus.valid))
    for rel, fmt in corpus.valid.items():
        path = out / rel
        assert path.is_file() and not path.is_symlink()
        with Image.open(path) as im, Image.open(inp / rel) as src:
            assert im.format == fmt
            assert sorted(im.size) == sorted(src.size)  # EXIF rotation may swap width and height
    assert (summary["done"], summary["total"]) == (len(corpus.valid), len(corpus.valid) + len(corpus.malformed))


def test_every_malformed_file_fails_with_a_reason(corpus_run):
    corpus, _, out = corpus_run[:3]
    summary = summary_of(corpus_run[5])
    reasons = {f["path"]: f["reason"] for f in summary["failures"]}
    assert set(reasons) == set(corpus.malformed), (
        sorted(set(corpus.malformed) - set(reasons)), sorted(set(reasons) - set(corpus.malformed)))
    assert summary["failed"] == len(corpus.malformed)
    wrong = {rel: reasons[rel] for rel, fragment in corpus.malformed.items()
             if not reasons[rel].strip() or fragment not in reasons[rel]}
    assert not wrong, wrong
    assert not any((out / rel).exists() for rel in corpus.malformed)


def test_odd_entries_are_skipped_and_reported(corpus_run):
    corpus, _, out = corpus_run[:3]
    warnings = summary_of(corpus_run[5])["warnings"]
    for rel, fragment in corpus.skipped.items():
        assert any(w.startswith(f"skipped {rel}: ") and fragment in w for w in warnings), (rel, warnings)
        assert not os.path.lexists(out / rel)
    assert not (out / "a" / ".hidden.png").exists() and not (out / "a" / "readme.txt").exists()


def test_input_tree_is_untouched(corpus_run):
    _, inp, _, outside, before = corpus_run[:5]
    assert (snapshot(inp), snapshot(outside)) == before


def test_rerun_changes_nothing(corpus_run):
    corpus, _, out = corpus_run[:3]
    after_first, second = corpus_run[6], corpus_run[7]
    summary = summary_of(second)
    assert (summary["done"], summary["skipped"], summary["failed"]) == (0, len(corpus.valid), len(corpus.malformed))
    assert {f["path"] for f in summary["failures"]} == set(corpus.malformed)
    assert snapshot(out) == after_first  # same bytes, not even rewritten


def test_inspect_check_accepts_the_record(corpus_run):
    corpus, _, out = corpus_run[:3]
    proc = cli("inspect", out, "--check", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["files"] == len(corpus.valid) and info["check"]["ok"] and info["complete"]
    assert {f["path"] for f in info["failures"]} == set(corpus.malformed)


# -- found while building the corpus: odd files and folder arguments the pipeline must survive --
def _small_folder(root: Path) -> None:
    samples = Path(__file__).resolve().parents[2] / "samples" / "cifar10" / "train"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        (root / cls / "x.png").write_bytes((samples / "cat" / "0000.png").read_bytes())


def _limit_memory() -> None:  # runs in the child: a read of the whole huge file fails fast
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (12 << 30, 12 << 30))


def test_a_huge_file_fails_alone(tmp_path):
    """A (sparse) 64 GiB file named .png must be one failure with a reason, not the end of the
    run: the pipeline reads every file whole before the pixel limit is checked."""
    inp = tmp_path / "in"
    _small_folder(inp)
    huge = inp / "a" / "huge.png"
    with open(huge, "wb") as fh:
        try:
            fh.truncate(64 << 30)
        except OSError:
            pytest.skip("no sparse files here")
    if os.stat(huge).st_blocks * 512 > 1 << 20:
        pytest.skip("this file system does not keep the file sparse")
    command = [str(PROTECT)] if PROTECT.is_file() else [sys.executable, "-m", "cli.main"]
    env = {k: v for k, v in os.environ.items() if k not in ("PROTECT_KEY", "PROTECT_DEBUG")}
    proc = subprocess.run([*command, "images", str(inp), str(tmp_path / "out"), "--key", TEST_KEY, "--json",
                           "--device", "cpu"], capture_output=True, text=True, env=env, timeout=120,
                          preexec_fn=_limit_memory)
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 1, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["done"] == 2 and [f["path"] for f in summary["failures"]] == ["a/huge.png"]
    assert summary["failures"][0]["reason"]


@pytest.mark.parametrize("which", ["in-loop", "out-loop", "record-loop", "out-dangling"])
def test_odd_folder_arguments_are_input_errors(tmp_path, keyring, which):
    """IN_DIR, OUT_DIR or the record given as a symbolic link that loops or dangles: a
    ProtectError (the CLI's one-line error, exit 2) before anything is written, not a
    RuntimeError or FileExistsError (the CLI's "internal error")."""
    from protect import ProtectError, ProtectOptions, protect_folder

    inp = tmp_path / "in"
    _small_folder(inp)
    os.symlink("loop", tmp_path / "loop")
    os.symlink("nowhere", tmp_path / "dangling")
    in_dir, out_dir, record = {
        "in-loop": (tmp_path / "loop", tmp_path / "out", None),
        "out-loop": (inp, tmp_path / "loop", None),
        "record-loop": (inp, tmp_path / "out", tmp_path / "loop"),
        "out-dangling": (inp, tmp_path / "dangling", None),
    }[which]
    before = sorted(p.name for p in tmp_path.iterdir())
    options = ProtectOptions(device="cpu", progress=False, record_dir=record, params={"filter_size": 3})
    with pytest.raises(ProtectError):
        protect_folder(in_dir, out_dir, keyring, options)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written (no stray record)
