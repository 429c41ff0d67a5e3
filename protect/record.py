"""The private run record: what was done, with which key fingerprint, to which file.

It lives outside the published folder (default ``<OUT_DIR>.protect/``) and holds:

- ``journal.jsonl``: a header line (format version, method, parameters, class map, key
  fingerprint, output options), then one line per finished file, appended and flushed as each
  output lands. It is what an interrupted run resumes from.
- ``manifest.json``: the summary written at the end of every run (header, per-file entries with
  relative path, input and output SHA-256, PSNR, SSIM; failures; totals).
- ``state.pt``: the method's fitted state (tensors only), to protect more images later.

Never the key: only its fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import RecordError
from .imageio import write_atomic

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
JOURNAL, MANIFEST, STATE = "journal.jsonl", "manifest.json", "state.pt"
#: Header fields that must match for a run to resume into an existing record.
MATCHING = ("format_version", "method", "params", "class_map", "key_fingerprint", "out_format", "jpeg_quality")


def sha256_file(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def default_record_dir(out_dir: Path) -> Path:
    return out_dir.parent / (out_dir.name + ".protect")


@dataclass
class RunRecord:
    """An open run record. Use :meth:`open` to create or resume one."""

    root: Path
    header: dict[str, Any]
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    _fh: Any = None

    @classmethod
    def read(cls, root: Path) -> "RunRecord":
        """Load an existing record (read-only use: inspect, verify)."""
        journal = root / JOURNAL
        if not journal.is_file():
            raise RecordError(f"no run record at {root} (expected {JOURNAL}); pass --record DIR if it was moved")
        header, done = _read_journal(journal)
        return cls(root, header, done)

    @classmethod
    def find(cls, root: Path) -> "RunRecord | None":
        """The record at ``root`` if there is one (read once), else None."""
        return cls.read(root) if (root / JOURNAL).is_file() else None

    def check_matches(self, header: dict[str, Any]) -> None:
        """Raise :class:`RecordError` naming what differs if this record is of another run."""
        _check_header(self.root, self.header, header)

    @classmethod
    def open(cls, root: Path, header: dict[str, Any], previous: "RunRecord | None" = None) -> "RunRecord":
        """Start a new record at ``root``, or resume ``previous`` (found there) if its header matches."""
        root.mkdir(parents=True, exist_ok=True)
        journal = root / JOURNAL
        done: dict[str, dict[str, Any]] = {}
        if previous is not None:
            previous.check_matches(header)
            done = previous.done
            header = {**previous.header, **{k: v for k, v in header.items() if k not in MATCHING}}
            fh = open(journal, "a", encoding="utf-8")
        else:
            fh = open(journal, "w", encoding="utf-8")
            fh.write(json.dumps({"header": header}, sort_keys=True) + "\n")
            fh.flush()
        return cls(root, header, done, fh)

    # -- writing ---------------------------------------------------------------------------
    def add(self, entry: dict[str, Any]) -> None:
        """Journal one finished file (after its output was renamed into place); see :meth:`flush`."""
        self.done[entry["path"]] = entry
        self._fh.write(json.dumps(entry, sort_keys=True) + "\n")

    def flush(self) -> None:
        """Push journalled lines to the OS. A line lost to a crash only means that file is redone."""
        if self._fh is not None:
            self._fh.flush()

    def save_state(self, state: dict[str, torch.Tensor]) -> None:
        import io

        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in state.items()}, buf)
        write_atomic(self.root / STATE, buf.getvalue())

    def load_state(self) -> dict[str, torch.Tensor] | None:
        path = self.root / STATE
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
            raise RecordError(f"cannot read method state {path}: {exc.__class__.__name__}") from None

    def write_manifest(self, summary: dict[str, Any], failures: list[tuple[str, str]]) -> Path:
        manifest = {
            **self.header,
            "summary": summary,
            "files": [self.done[k] for k in sorted(self.done)],
            "failures": [{"path": p, "reason": r} for p, r in failures],
        }
        path = self.root / MANIFEST
        write_atomic(path, _manifest_text(manifest).encode("utf-8"))
        return path

    def close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            self._fh.close()
            self._fh = None

    def is_current(self, rel: str, in_sha: str, out_path: Path) -> bool:
        """True if ``rel`` was already protected from the same input and its output is intact."""
        entry = self.done.get(rel)
        return bool(entry and entry.get("input_sha256") == in_sha and sha256_file(out_path) == entry.get("output_sha256"))


def _manifest_text(manifest: dict[str, Any]) -> str:
    """JSON with one line per top-level key and one line per file entry: as readable as an indented
    dump, but every part goes through the C encoder (an indented dump of a 50k-file manifest runs
    the pure-Python encoder and cost about 7 % of a CIFAR-10 run)."""
    parts = []
    for key in sorted(manifest):
        value = manifest[key]
        if isinstance(value, list) and value:
            rows = ",\n  ".join(json.dumps(v, sort_keys=True) for v in value)
            parts.append(f"{json.dumps(key)}: [\n  {rows}\n ]")
        else:
            parts.append(f"{json.dumps(key)}: {json.dumps(value, sort_keys=True)}")
    return "{\n " + ",\n ".join(parts) + "\n}\n"


def _check_header(root: Path, old: dict[str, Any], header: dict[str, Any]) -> None:
    diff = [k for k in MATCHING if old.get(k) != header.get(k)]
    if diff:
        what = "a different key" if "key_fingerprint" in diff else "different " + ", ".join(diff)
        raise RecordError(
            f"{root} records a run with {what}; rerun with the same settings to resume, "
            "use --overwrite to start over, or choose another output folder"
        )


def _read_journal(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    header: dict[str, Any] | None = None
    done: dict[str, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                # A run killed mid-line leaves at most one torn line at the end; ignore it.
                log.debug("ignoring torn journal line %d", n + 1)
                continue
            if n == 0:
                header = item.get("header") if isinstance(item, dict) else None
            elif isinstance(item, dict) and "path" in item:
                done[item["path"]] = item
    if not isinstance(header, dict) or header.get("format_version") != FORMAT_VERSION:
        raise RecordError(f"{path} is not a protect run record of format {FORMAT_VERSION}")
    return header, done

