"""The certificate as a file: write it atomically, read it back, check the fixed core of its schema.

The core of ``protect.certificate/2`` (:mod:`verify.certificate`) is checked on every save and
load; optional fields (balanced accuracy, AUC, ``score_metric``, ...) are checked only where
present. Version 2 changed what the numbers mean (the epoch chosen on validation, a headline score
against the clean ERM reference, the per-cell comparison renamed ``effect``), so a version-1
certificate is refused with a message that says to verify again.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from perturbations.errors import RecordError

from .metrics import METRICS

__all__ = ["EXTRA_RUN_FIELDS", "SCHEMA", "load_certificate", "save_certificate"]

SCHEMA = "protect.certificate/2"
#: Optional per-run metrics (None when a run did not measure them): certificate name = CellResult field.
EXTRA_RUN_FIELDS = ("final_balanced_acc", "peak_balanced_acc", "final_auc", "peak_auc", "balanced_acc", "auc")


def _sanitize(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    return obj


def write_text_atomic(path: str | os.PathLike, text: str, prefix: str = ".tmp-") -> Path:
    """Write ``text`` to ``path`` atomically: a uniquely named temporary file in the same folder
    (``prefix``), flushed to disk, then renamed into place; the temporary file is removed on any
    failure. The folder is created when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_certificate(cert: dict, path: str | os.PathLike) -> Path:
    """Validate and write ``cert`` as JSON to ``path`` atomically (non-finite numbers become null)."""
    _validate(cert, "certificate")
    return write_text_atomic(path, json.dumps(_sanitize(cert), indent=2, allow_nan=False) + "\n", ".certificate-")


def load_certificate(path: str | os.PathLike) -> dict:
    """Read and validate a certificate; RecordError when missing, unreadable or of another schema."""
    path = Path(path)
    try:
        cert = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecordError(f"certificate not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"cannot read certificate {path}: {exc}") from None
    _validate(cert, str(path))
    return cert


def _is_acc(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 <= x <= 1.0


def _check_run(run: Any, where: str) -> None:
    if not isinstance(run, dict):
        raise RecordError(f"{where} is not an object")
    for key in ("acc", "final_acc", "peak_acc"):
        if not _is_acc(run.get(key)):
            raise RecordError(f"{where}.{key} must be an accuracy in [0, 1], got {run.get(key)!r}")
    curve = run.get("curve")
    if not isinstance(curve, list) or not all(a is None or _is_acc(a) for a in curve):
        raise RecordError(f"{where}.curve must be a list of accuracies in [0, 1] (null where not measured)")
    for key in EXTRA_RUN_FIELDS:  # optional (absent in older certificates), null when not measured
        if run.get(key) is not None and not _is_acc(run[key]):
            raise RecordError(f"{where}.{key} must be a fraction in [0, 1] or null, got {run[key]!r}")
    for key in ("curve_balanced_acc", "curve_auc"):
        values = run.get(key)
        if values is not None and (not isinstance(values, list) or not all(a is None or _is_acc(a) for a in values)):
            raise RecordError(f"{where}.{key} must be a list of fractions in [0, 1] (or null)")


def _validate(cert: Any, where: str) -> None:
    """RecordError unless ``cert`` has the fixed core of schema ``protect.certificate/2`` (a version-1
    certificate is refused with a message that says to verify again)."""
    if not isinstance(cert, dict):
        raise RecordError(f"{where}: not a certificate (expected a JSON object)")
    if cert.get("schema") == "protect.certificate/1":
        raise RecordError(f"{where}: a certificate of an older version (protect.certificate/1, peaks chosen with the "
                          "test labels, scores per cell): run protect verify again")
    if cert.get("schema") != SCHEMA:
        raise RecordError(f"{where}: schema is {cert.get('schema')!r}, expected {SCHEMA!r}")
    for key, types in (("tier", str), ("model", str), ("epochs", int), ("seeds", list), ("cells", list), ("verdict", dict)):
        if not isinstance(cert.get(key), types) or isinstance(cert.get(key), bool):
            raise RecordError(f"{where}: field '{key}' is missing or not a {types.__name__}")
    if not cert["cells"]:
        raise RecordError(f"{where}: no cells")
    for i, cell in enumerate(cert["cells"]):
        at = f"{where}: cells[{i}]"
        if not isinstance(cell, dict) or not isinstance(cell.get("training"), str) or not isinstance(cell.get("defense"), str):
            raise RecordError(f"{at} needs string fields 'training' and 'defense'")
        _check_run(cell.get("protected"), f"{at}.protected")
        if "clean" in cell:
            _check_run(cell["clean"], f"{at}.clean")
        s = cell.get("effect")
        if s is not None and (not isinstance(s, (int, float)) or isinstance(s, bool)):
            raise RecordError(f"{at}.effect must be a number or null")
    v = cert["verdict"]
    b = v.get("best_attacker")
    if not isinstance(b, dict) or not isinstance(b.get("training"), str) or not isinstance(b.get("defense"), str) \
            or not _is_acc(b.get("acc")):
        raise RecordError(f"{where}: verdict.best_attacker needs training, defense and acc")
    if "score" not in v or (v["score"] is not None and not isinstance(v["score"], (int, float))):
        raise RecordError(f"{where}: verdict.score must be a number or null")
    if cert.get("score_metric", "accuracy") not in METRICS:  # absent in older certificates: accuracy
        raise RecordError(f"{where}: score_metric must be one of {list(METRICS)}, got {cert.get('score_metric')!r}")
