"""The private run record of a protected folder (``OUT_DIR.protect/`` by default).

Files (all written without following links inside the folder, see :mod:`protect.safefs`):

- ``journal.jsonl``: line 1 is the run header (method, parameters, class map, key fingerprint,
  format version); then one JSON line per finished file, appended and flushed right after its
  output lands. It is what an interrupted run resumes from.
- ``manifest.json``: the summary written at the end of every run (header, per-file entries with
  relative path, label, input and output SHA-256, PSNR, SSIM; failures; orphans; totals).
- ``state.pt``: the method's fitted state (tensors only), streamed to disk, to protect more images
  later; its SHA-256 is part of what makes an output current.
- ``lock``: the pid of the run holding the folder (see :class:`protect.safefs.RunLock`).

An output is *current* (skipped on a rerun) only when its input bytes, its label, and everything
else it depends on (method, resolved parameters, state, output format and quality, and the device
class for methods that are not exact) match its journal line, and the output file still has the
recorded bytes. Journal lines of files that are no longer in the input folder, or that now fail,
are *orphans*: reported by the run and by ``protect inspect``, and removed (with their outputs,
when those still hold the recorded bytes) by ``protect images --prune``.

Never the key: only its fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import torch

from .errors import RecordError
from .safefs import Tree

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
JOURNAL, MANIFEST, STATE = "journal.jsonl", "manifest.json", "state.pt"
#: Header fields that must match for a run to resume into an existing record.
MATCHING = ("format_version", "method", "params", "class_map", "key_fingerprint", "out_format", "jpeg_quality",
            "max_delta_e")


def default_record_dir(out_dir: Path) -> Path:
    """``OUT_DIR.protect`` beside the output folder as given (a link named as OUT_DIR is not resolved)."""
    out = Path(os.path.abspath(out_dir))
    return out.parent / (out.name + ".protect")


def make_private(root: Path) -> None:
    """Owner-only permissions for the record folder (0700) and its regular files (0600); links and
    anything that is not a regular file are left alone (never followed)."""
    try:
        if stat.S_ISDIR(os.lstat(root).st_mode):
            os.chmod(root, 0o700)
        for name in os.listdir(root):
            path = root / name
            if stat.S_ISREG(os.lstat(path).st_mode):
                os.chmod(path, 0o600)
    except OSError as exc:  # a file system without Unix permissions: say so, do not fail the run
        log.warning("cannot make the run record %s private: %s", root, exc.strerror or exc)


def deps_digest(fields: dict[str, Any]) -> str:
    """A short digest of everything, besides the input bytes and the label, an output depends on."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def state_digest(state: dict[str, Any]) -> str:
    """SHA-256 of a method state's tensors (names, dtypes, shapes and bytes), independent of how
    ``torch.save`` lays the file out."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class Entry(NamedTuple):
    """One journalled file: its JSON line and the fields the pipeline reads back."""

    line: str
    path: str
    output: str
    input_sha256: str
    output_sha256: str
    label: str | None
    deps: str
    psnr: float
    ssim: float
    #: mean low-frequency CIELAB dE (:func:`protect.fidelity.delta_e`); None in records written before it
    delta_e: float | None = None

    @classmethod
    def parse(cls, line: str) -> "Entry | None":
        try:
            item = json.loads(line)
            de = item.get("delta_e")
            return cls(line.rstrip("\n"), item["path"], item["output"], item["input_sha256"], item["output_sha256"],
                       item.get("label"), item.get("deps", ""), float(item["psnr"]), float(item["ssim"]),
                       None if de is None else float(de))
        except (ValueError, KeyError, TypeError):
            return None


@dataclass
class RunRecord:
    """An open run record. Use :meth:`open` to create or resume one, :meth:`read` to look at one."""

    root: Path
    header: dict[str, Any]
    done: dict[str, Entry] = field(default_factory=dict)
    journal_lines: int = 0  # lines after the header, including superseded and torn ones
    _tree: Tree | None = None
    _fh: BinaryIO | None = None

    @classmethod
    def read(cls, root: Path) -> "RunRecord":
        """Load an existing record (read-only use: inspect, verify)."""
        journal = root / JOURNAL
        if not journal.is_file() or journal.is_symlink():
            raise RecordError(f"no run record at {root} (expected {JOURNAL}); pass --record DIR if it was moved")
        header, done, lines = _read_journal(journal)
        return cls(root, header, done, lines)

    @classmethod
    def find(cls, root: Path) -> "RunRecord | None":
        """The record at ``root`` if there is one (read once), else None."""
        return cls.read(root) if (root / JOURNAL).is_file() else None

    def check_matches(self, header: dict[str, Any]) -> None:
        """Raise :class:`RecordError` naming what differs if this record is of another run."""
        _check_header(self.root, self.header, header)

    @classmethod
    def open(cls, root: Path, header: dict[str, Any], previous: "RunRecord | None" = None) -> "RunRecord":
        """Start a new record at ``root``, or resume ``previous`` (found there) if its header matches.

        The record is private: its folder is made 0700 and its files 0600 (a record of an older
        version is tightened the same way)."""
        tree = Tree(root, private=True)
        make_private(root)
        done: dict[str, Entry] = {}
        lines = 0
        if previous is not None:
            previous.check_matches(header)
            done, lines = previous.done, previous.journal_lines
            header = {**previous.header, **{k: v for k, v in header.items() if k not in MATCHING}}
            record = cls(root, header, done, lines, tree)
            if lines > len(done):  # superseded or torn lines: start from a compact journal
                record.compact()
            record._fh = record._append()
        else:
            tree.write(JOURNAL, (json.dumps({"header": header}, sort_keys=True) + "\n").encode())
            record = cls(root, header, done, lines, tree)
            record._fh = record._append()
        return record

    def _append(self) -> BinaryIO:
        assert self._tree is not None
        try:
            return self._tree.open_append(JOURNAL)
        except OSError as exc:
            raise RecordError(f"cannot append to {self.root / JOURNAL}: {exc.strerror or exc}") from None

    # -- writing ---------------------------------------------------------------------------
    def add(self, entry: Entry) -> None:
        """Journal one finished file (after its output was renamed into place)."""
        assert self._fh is not None
        self._fh.write(entry.line.encode("utf-8") + b"\n")
        self.done[entry.path] = entry
        self.journal_lines += 1

    def flush(self) -> None:
        """Push journalled lines to the OS. A line lost to a crash only means that file is redone."""
        if self._fh is not None:
            self._fh.flush()

    def forget(self, paths: Iterable[str]) -> None:
        """Drop journal entries (after pruning their outputs); call :meth:`compact` to persist."""
        for p in paths:
            self.done.pop(p, None)

    def compact(self) -> None:
        """Rewrite the journal atomically with one line per current entry."""
        assert self._tree is not None
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        text = json.dumps({"header": self.header}, sort_keys=True) + "\n" + "".join(
            self.done[k].line + "\n" for k in sorted(self.done))
        self._tree.write(JOURNAL, text.encode("utf-8"))
        self.journal_lines = len(self.done)

    def reopen(self) -> None:
        if self._fh is None:
            self._fh = self._append()

    def save_state(self, write: Any) -> str:
        """Stream the method state to ``state.pt`` (``write(fh)`` serialises it); returns its SHA-256."""
        assert self._tree is not None
        digest = hashlib.sha256()

        class _Hashing:
            def __init__(self, fh: BinaryIO) -> None:
                self.fh = fh

            def write(self, b: bytes) -> int:
                digest.update(b)
                return self.fh.write(b)

            def flush(self) -> None:
                self.fh.flush()

        self._tree.write(STATE, lambda fh: write(_Hashing(fh)))
        return digest.hexdigest()

    def state_sha256(self) -> str | None:
        tree = self._tree or Tree(self.root, create=False)
        return tree.sha256(STATE)

    def open_state(self) -> BinaryIO | None:
        tree = self._tree or Tree(self.root, create=False)
        return tree.open_read(STATE)

    def write_manifest(self, summary: dict[str, Any], files: list[str], failures: list[tuple[str, str]],
                       orphans: list[dict[str, str]]) -> Path:
        """``manifest.json``: header, summary, the entries of ``files`` (sorted), failures, orphans."""
        assert self._tree is not None
        parts = [f"{json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in sorted(self.header.items())]
        parts.append(f'"summary": {json.dumps(summary, sort_keys=True)}')
        rows = ",\n  ".join(self.done[k].line for k in sorted(files))
        parts.append('"files": [' + (f"\n  {rows}\n " if rows else "") + "]")
        fails = ",\n  ".join(json.dumps({"path": p, "reason": r}, sort_keys=True) for p, r in failures)
        parts.append('"failures": [' + (f"\n  {fails}\n " if fails else "") + "]")
        orph = ",\n  ".join(json.dumps(o, sort_keys=True) for o in orphans)
        parts.append('"orphans": [' + (f"\n  {orph}\n " if orph else "") + "]")
        self._tree.write(MANIFEST, ("{\n " + ",\n ".join(parts) + "\n}\n").encode("utf-8"))
        return self.root / MANIFEST

    def close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            self._fh.close()
            self._fh = None
        if self._tree is not None:
            self._tree.close()
            self._tree = None


def _check_header(root: Path, old: dict[str, Any], header: dict[str, Any]) -> None:
    diff = [k for k in MATCHING if old.get(k) != header.get(k)]
    if diff:
        what = "a different key" if "key_fingerprint" in diff else "different " + ", ".join(diff)
        raise RecordError(
            f"{root} records a run with {what}; rerun with the same settings to resume, "
            "use --overwrite to start over, or choose another output folder"
        )


def _read_journal(path: Path) -> tuple[dict[str, Any], dict[str, Entry], int]:
    header: dict[str, Any] | None = None
    done: dict[str, Entry] = {}
    lines = 0
    try:
        fh = open(path, encoding="utf-8")
    except OSError as exc:
        raise RecordError(f"cannot read {path}: {exc.strerror or exc}") from None
    with fh:
        try:
            for n, line in enumerate(fh):
                if n == 0:
                    try:
                        item = json.loads(line)
                    except json.JSONDecodeError:
                        break
                    header = item.get("header") if isinstance(item, dict) else None
                    continue
                lines += 1
                entry = Entry.parse(line)  # a run killed mid-line leaves a torn last line: ignored
                if entry is not None:
                    done[entry.path] = entry
        except UnicodeDecodeError:
            raise RecordError(f"{path} is not a protect run record (not UTF-8 text)") from None
    if not isinstance(header, dict):
        raise RecordError(f"{path} is not a protect run record")
    if header.get("format_version") != FORMAT_VERSION:
        raise RecordError(f"{path} is a run record of format {header.get('format_version')}, this version "
                          f"reads format {FORMAT_VERSION}: protect the folder again with --overwrite")
    return header, done, lines
