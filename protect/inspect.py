"""Read a run record back: what was done to a published folder, and is it intact."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from perturbations import Keyring

from .errors import RecordError
from .record import MANIFEST, RunRecord, default_record_dir
from .safefs import Tree


def _manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"cannot read {path} ({exc.__class__.__name__}); rerun the protect command to "
                          "rewrite it") from None
    if not isinstance(data, dict):
        raise RecordError(f"{path} is not a protect manifest; rerun the protect command to rewrite it")
    return data


def inspect_run(out_dir: str | os.PathLike, record_dir: str | os.PathLike | None = None,
                check_files: bool = False, keyring: Keyring | None = None) -> dict[str, Any]:
    """Summarise the run record of ``out_dir``.

    Args:
        out_dir: a folder written by ``protect images``.
        record_dir: where its record is (default ``<out_dir>.protect``).
        check_files: re-hash every output and report missing or changed files (links inside the
            output folder count as changed: they are never followed).
        keyring: if given, report whether it is the key the run used (by fingerprint).
    Returns a dict: method, params, key fingerprint, counts, fidelity, failures, orphans (outputs of
    inputs that were removed or now fail), completeness and, with ``check_files``, the check.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise RecordError(f"output folder not found: {out}")
    root = Path(record_dir) if record_dir else default_record_dir(out)
    record = RunRecord.read(root)
    header = record.header
    manifest = _manifest(root)
    failures = manifest.get("failures", []) if isinstance(manifest.get("failures"), list) else []
    orphans = manifest.get("orphans", []) if isinstance(manifest.get("orphans"), list) else []
    orphan_paths = {o.get("path") for o in orphans if isinstance(o, dict)}
    files = [e for rel, e in record.done.items() if rel not in orphan_paths]
    summary = manifest.get("summary", {}) if isinstance(manifest.get("summary"), dict) else {}
    info: dict[str, Any] = {
        "out_dir": str(out),
        "record_dir": str(root),
        "method": header.get("method"),
        "paper": header.get("paper"),
        "params": header.get("resolved_params", header.get("params")),
        "key_fingerprint": header.get("key_fingerprint"),
        "class_map": header.get("class_map"),
        "label_source": header.get("label_source"),
        "out_format": header.get("out_format"),
        "files": len(files),
        "failures": failures,
        "orphans": orphans,
        # every image accounted for: protected, or failed with a reason (a rerun would not help)
        "complete": bool(manifest) and summary.get("total") == len(files) + len(failures),
        "psnr_mean": _mean(f.psnr for f in files),
        "psnr_min": min((f.psnr for f in files), default=None),
        "ssim_mean": _mean(f.ssim for f in files),
        "ssim_min": min((f.ssim for f in files), default=None),
        "delta_e_mean": _mean(f.delta_e for f in files if f.delta_e is not None),
        "delta_e_max": max((f.delta_e for f in files if f.delta_e is not None), default=None),
        **_as_written(files),
    }
    if keyring is not None:
        info["key_matches"] = keyring.fingerprint() == header.get("key_fingerprint")
    if check_files:
        missing, changed = [], []
        with Tree(out, create=False) as tree:
            for f in files:
                digest = tree.sha256(f.output)
                if digest is None:
                    (changed if os.path.lexists(out / f.output) else missing).append(f.output)
                elif digest != f.output_sha256:
                    changed.append(f.output)
        info["check"] = {"missing": missing, "changed": changed, "ok": not missing and not changed}
    return info


def _as_written(files: list[Any]) -> dict[str, Any]:
    """What the journal lines say of the files as written: the largest change of any value
    (``max_delta_max``, in the images' levels; None for records written before it was kept), and
    the quality range and chroma subsamplings of lossy outputs (None / [] when there are none)."""
    deltas, qualities, samplings = [], [], set()
    for f in files:
        try:
            item = json.loads(f.line)
        except (TypeError, ValueError):
            continue
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("max_delta"), int):
            deltas.append(item["max_delta"])
        if isinstance(item.get("quality"), int):
            qualities.append(item["quality"])
        if isinstance(item.get("subsampling"), str):
            samplings.add(item["subsampling"])
    return {
        "max_delta_max": max(deltas, default=None),
        "max_delta_missing": len(files) - len(deltas),  # files whose record predates max_delta
        "quality_min": min(qualities, default=None),
        "quality_max": max(qualities, default=None),
        "subsampling": sorted(samplings),
    }


def _mean(values: Any) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else None
