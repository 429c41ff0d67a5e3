"""Read a run record back: what was done to a published folder, and is it intact."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from perturbations import Keyring

from .errors import RecordError
from .record import MANIFEST, RunRecord, default_record_dir, sha256_file


def inspect_run(out_dir: str | os.PathLike, record_dir: str | os.PathLike | None = None,
                check_files: bool = False, keyring: Keyring | None = None) -> dict[str, Any]:
    """Summarise the run record of ``out_dir``.

    Args:
        out_dir: a folder written by ``protect images``.
        record_dir: where its record is (default ``<out_dir>.protect``).
        check_files: re-hash every output and report missing or changed files.
        keyring: if given, report whether it is the key the run used (by fingerprint).
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise RecordError(f"output folder not found: {out}")
    root = Path(record_dir) if record_dir else default_record_dir(out.resolve())
    record = RunRecord.read(root)
    header = record.header
    manifest_path = root / MANIFEST
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    files = list(record.done.values())
    failures = manifest.get("failures", [])
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
        # every image accounted for: protected, or failed with a reason (a rerun would not help)
        "complete": bool(manifest) and manifest.get("summary", {}).get("total") == len(files) + len(failures),
        "psnr_mean": _mean(f["psnr"] for f in files),
        "psnr_min": min((f["psnr"] for f in files), default=None),
        "ssim_mean": _mean(f["ssim"] for f in files),
        "ssim_min": min((f["ssim"] for f in files), default=None),
    }
    if keyring is not None:
        info["key_matches"] = keyring.fingerprint() == header.get("key_fingerprint")
    if check_files:
        missing, changed = [], []
        for f in files:
            digest = sha256_file(out / f["output"])
            if digest is None:
                missing.append(f["output"])
            elif digest != f["output_sha256"]:
                changed.append(f["output"])
        info["check"] = {"missing": missing, "changed": changed, "ok": not missing and not changed}
    return info


def _mean(values: Any) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else None
