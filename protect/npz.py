"""Import a MedMNIST-style ``.npz`` file as class folders of PNG files.

The file holds ``{train,val,test}_images`` (``N x H x W`` grey or ``N x H x W x 3`` colour, uint8;
``N x H x W x 1`` is taken as grey) and ``{train,val,test}_labels`` (``N`` or ``N x 1`` integers).
Each image becomes ``OUT_DIR/<split>/<class>/<split>_<index>.png``, where ``<class>`` is the label
number, or its name when class names are given (name ``i`` for label ``i``), and ``<index>`` is the
image's position in its split, zero-padded to at least 4 digits (more when the split needs them).
The PNG files hold the arrays' values exactly. Each split folder is then a class-folder dataset
that ``protect images`` and ``protect verify`` read directly.

Atomic: everything is written into a hidden temporary folder next to ``OUT_DIR`` and renamed to it at
the end; ``OUT_DIR`` must not exist or be empty. Every problem with the file (unreadable, a missing
key, lengths that differ, images that are not uint8, multi-label labels, the wrong number of class
names) is an :class:`~protect.errors.InputError` with a one-line reason, raised before anything is
written.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MIN_DIGITS = 4


def _load(path: Path) -> dict[str, np.ndarray]:
    """The six arrays, checked, or an :class:`InputError`."""
    if not path.is_file():
        raise InputError(f"npz file not found: {path}")
    needed = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels")]
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in needed if k not in z.files]
            if missing:
                raise InputError(f"{path} lacks {', '.join(missing)} (a MedMNIST-style npz holds "
                                 f"{', '.join(needed)})")
            arrays = {k: z[k] for k in needed}
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"cannot read {path} as an npz file: {exc}".replace("\n", " ")) from None
    for split in SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dtype != np.uint8:
            raise InputError(f"{split}_images holds {images.dtype} values; only uint8 images are imported "
                             "(convert them to 8 bits first)")
        if images.ndim == 4 and images.shape[-1] == 1:
            images = arrays[f"{split}_images"] = images[..., 0]
        if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)) or 0 in images.shape[1:]:
            raise InputError(f"{split}_images has shape {images.shape}; expected N x H x W (grey) or "
                             "N x H x W x 3 (colour)")
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = arrays[f"{split}_labels"] = labels[:, 0]
        if labels.ndim != 1:
            raise InputError(f"{split}_labels has shape {labels.shape}; expected N or N x 1 (one class per "
                             "image; multi-label data is not supported)")
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"{split}_labels holds {labels.dtype} values; expected integer class numbers")
        if labels.size and int(labels.min()) < 0:
            raise InputError(f"{split}_labels holds a negative class number ({int(labels.min())})")
        if len(labels) != len(images):
            raise InputError(f"{split}_images has {len(images)} images but {split}_labels has {len(labels)} "
                             "labels")
    return arrays


def _class_folders(arrays: dict[str, np.ndarray], class_names: Sequence[str] | None) -> list[str]:
    """Folder name of each label number."""
    top = max((int(arrays[f"{s}_labels"].max()) for s in SPLITS if arrays[f"{s}_labels"].size), default=-1)
    if class_names is None:
        return [str(i) for i in range(top + 1)]
    names = [n.strip() for n in class_names]
    if len(names) != top + 1:
        raise InputError(f"{len(names)} class name(s) given for labels 0..{top}; give exactly {top + 1}, "
                         "in label order")
    for name in names:
        if not name or name in (".", "..") or name.startswith(".") or "/" in name or "\\" in name or "\0" in name:
            raise InputError(f"class name '{name}' cannot be a folder name (empty, hidden, or holds a slash)")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InputError(f"class name '{dup}' is given twice")
    return names


def _prepare(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output path exists and is not a folder: {out_dir}")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir} is not empty; choose a new or empty output folder")


def import_npz(path: str | os.PathLike, out_dir: str | os.PathLike,
               class_names: Sequence[str] | None = None) -> dict[str, int]:
    """Write the images of a MedMNIST-style npz as PNG class folders (see module doc).

    Args:
        path: the ``.npz`` file.
        out_dir: the folder to create (must not exist, or be empty).
        class_names: folder name of each label number, in label order; default the numbers.
    Returns:
        images written per split, e.g. ``{"train": 546, "val": 78, "test": 156}``.
    """
    path, out_dir = Path(path), Path(out_dir)
    _prepare(out_dir)
    arrays = _load(path)
    folders = _class_folders(arrays, class_names)
    parent = out_dir.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{out_dir.name}.import-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()  # not mkdtemp: the folder gets the usual permissions, not 0700
    except OSError as exc:
        raise InputError(f"cannot create a folder next to {out_dir}: {exc.strerror or exc}") from None
    counts: dict[str, int] = {}
    try:
        for split in SPLITS:
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            digits = max(MIN_DIGITS, len(str(max(0, len(images) - 1))))
            for name in sorted({folders[int(i)] for i in np.unique(labels)}):
                (tmp / split / name).mkdir(parents=True)
            (tmp / split).mkdir(exist_ok=True)
            for i, (img, label) in enumerate(zip(images, labels)):
                Image.fromarray(np.ascontiguousarray(img)).save(
                    tmp / split / folders[int(label)] / f"{split}_{i:0{digits}d}.png", format="PNG")
            counts[split] = len(images)
            log.info("%s: %d image(s)", split, len(images))
        if out_dir.is_dir():
            _prepare(out_dir)  # still empty? (rename replaces only an empty folder)
        os.replace(tmp, out_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"cannot write {out_dir}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts
