"""``protect images --preview N``: look at the protection on a few images before the whole folder runs.

:func:`preview_folder` picks N images of the input spread evenly over its sorted list (every class
of a labelled folder, in proportion), copies them into a private temporary folder with their
relative paths, protects that copy with the same method, options and key as the real run would
(a method that fits, UC or SALM, fits on these N images only, and says so), and writes one PNG
sheet beside the output folder (``OUT_DIR.preview.png``): per image a row with the original, the
protected file as written, their difference amplified x8, and 1:1 crops of the centre of both
(where grain and blotches show), labelled with the file name and its PSNR, SSIM and low-frequency
colour difference dE. Nothing is written to OUT_DIR or its record; the temporary folder is removed
whatever happens. The sheet is what a person needs to judge a protection: a dE above about 2.3, or
blotches in the crops, are visible however good the PSNR.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from perturbations.errors import InputError
from perturbations.keyring import Keyring

from .discover import Dataset, discover_inputs

__all__ = ["THUMB", "CROP", "AMPLIFY", "pick_preview", "preview_folder", "preview_path"]

#: Longest side of the whole-image panels, side of the 1:1 centre crops, and the difference gain.
THUMB, CROP, AMPLIFY = 320, 160, 8
_LABEL_H = 18


def preview_path(out_dir: str | os.PathLike) -> Path:
    """Where the sheet goes: ``OUT_DIR.preview.png`` beside the output folder."""
    out = Path(out_dir)
    return out.parent / f"{out.name}.preview.png"


def pick_preview(ds: Dataset, n: int) -> list[int]:
    """Indices of ``n`` entries spread evenly over the sorted list (all of them when there are fewer)."""
    if n < 1:
        raise InputError(f"--preview needs at least 1 image, got {n}")
    m = len(ds.entries)
    if n >= m:
        return list(range(m))
    return sorted({int(i * m / n + m / (2 * n)) for i in range(n)})


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return im.convert("RGB")


def _panel(im: Image.Image) -> Image.Image:
    out = im.copy()
    out.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
    return out


def _crop(im: Image.Image) -> Image.Image:
    w, h = im.size
    s = min(CROP, w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return im.crop((left, top, left + s, top + s))


def _row(before: Image.Image, after: Image.Image, label: str) -> Image.Image:
    a, b = np.asarray(before, dtype=np.int16), np.asarray(after, dtype=np.int16)
    diff = Image.fromarray(np.clip(np.abs(b - a) * AMPLIFY, 0, 255).astype(np.uint8))
    panels = [_panel(before), _panel(after), _panel(diff), _crop(before), _crop(after)]
    height = max(p.height for p in panels) + _LABEL_H
    width = sum(p.width for p in panels) + 4 * (len(panels) + 1)
    row = Image.new("RGB", (width, height), (255, 255, 255))
    x = 4
    for p in panels:
        row.paste(p, (x, _LABEL_H))
        x += p.width + 4
    ImageDraw.Draw(row).text((4, 3), label, fill=(0, 0, 0))
    return row


def _sheet(rows: list[Image.Image], title: str) -> Image.Image:
    width = max(r.width for r in rows)
    height = sum(r.height for r in rows) + 2 * _LABEL_H
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(sheet).text((4, 3), title, fill=(0, 0, 0))
    y = 2 * _LABEL_H
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    return sheet


def preview_folder(inputs: str | os.PathLike | list, out_dir: str | os.PathLike, keyring: Keyring, options: Any,
                   n: int, sheet: str | os.PathLike | None = None) -> dict:
    """Protect ``n`` images of ``inputs`` (a folder or image files) into a temporary folder with
    ``options`` (:class:`protect.ProtectOptions`) and write the before/after sheet (default
    :func:`preview_path` of ``out_dir``). Returns ``{"sheet", "images": [{path, psnr, ssim, delta_e}],
    "psnr_mean", "ssim_mean", "delta_e_mean", "method", "params", "fitted_on"}``."""
    from .pipeline import protect_folder

    ds = discover_inputs(inputs if isinstance(inputs, list) else [inputs], options.labels_csv)
    chosen = [ds.entries[i] for i in pick_preview(ds, n)]
    target = Path(sheet) if sheet is not None else preview_path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix="protect-preview-"))
    try:
        src = tmp / "in"
        for e in chosen:
            dst = src / e.rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(e.path, dst)
        labels = None
        if ds.label_source == "csv":  # the chosen rows only, paths as staged
            labels = tmp / "labels.csv"
            labels.write_text("path,label\n" + "".join(f"{e.rel},{ds.classes[e.label]}\n" for e in chosen
                                                       if e.label is not None), encoding="utf-8")
        opts = dataclasses.replace(options, labels_csv=labels, record_dir=tmp / "record", state_from=options.state_from,
                                   overwrite=False, prune=False, progress=False, on_phase=None,
                                   allow_reprotect=True)
        out = tmp / "out"
        summary = protect_folder(src, out, keyring, opts)
        manifest = json.loads((tmp / "record" / "manifest.json").read_text(encoding="utf-8"))
        rows, images = [], []
        for item in manifest["files"]:
            label = (f"{item['path']}: PSNR {item['psnr']:.1f} dB, SSIM {item['ssim']:.3f}, "
                     f"dE {item.get('delta_e', float('nan')):.2f}")
            rows.append(_row(_open(src / item["path"]), _open(out / item["output"]), label))
            images.append({k: item.get(k) for k in ("path", "psnr", "ssim", "delta_e")})
        if not rows:
            raise InputError("--preview: none of the chosen images could be protected (see the warnings)")
        fitted = "the preview images" if summary.fit_seconds >= 0.5 and options.state_from is None else None
        title = (f"protect --preview: {summary.method} on {len(rows)} image(s); columns: original, protected, "
                 f"difference x{AMPLIFY}, centre 1:1 original, centre 1:1 protected"
                 + ("; fitted on these images only" if fitted else ""))
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f".{target.name}.part")
        _sheet(rows, title).save(part, format="PNG")
        os.replace(part, target)
        return {"sheet": str(target), "images": images, "psnr_mean": summary.psnr_mean,
                "ssim_mean": summary.ssim_mean, "delta_e_mean": summary.delta_e_mean, "method": summary.method,
                "params": summary.params, "fitted_on": fitted, "failed": summary.failed}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
