"""Find the images under a folder and their labels.

Labels come from class sub-folders (the first path component, class names in the order of :func:`class_names`), from a
``path,label`` CSV file, or not at all (a flat folder). CSV labels are class *names*, always
(``01`` and ``1`` are two classes); they are sorted with pure-integer names first in numeric order
(``2`` before ``10``), then the others by string.

Discovery never opens a file and never raises on what a folder holds. Hidden files and folders
and files without an image extension are ignored. Skipped, with a reason in
:attr:`Dataset.skipped`: symbolic links that loop, dangle or leave the input folder (links that
stay inside are followed, to files and to folders), links back to a folder above them, folders
that cannot be listed, entries that cannot be examined, special files (FIFOs, sockets, devices)
with an image name (never opened: reading a FIFO would block), and names that are not valid
UTF-8 (they cannot be written in the run record).
"""

from __future__ import annotations

import csv
import errno
import logging
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .errors import InputError

log = logging.getLogger(__name__)

#: Extension (lower case) -> format name (Pillow's, and "DICOM").
IMAGE_EXTENSIONS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".dcm": "DICOM",  # read and written with pydicom (protect.dicom), not Pillow
}


@dataclass(frozen=True)
class ImageEntry:
    """One image found under the root: POSIX relative path, the root, label index or None."""

    rel: str
    root: Path
    label: int | None = None

    @property
    def path(self) -> Path:
        """The absolute path (made on demand: a folder of millions of images needs no Path each)."""
        return self.root / self.rel

    @property
    def format(self) -> str:
        """Format name implied by the extension (Pillow's, or "DICOM")."""
        return IMAGE_EXTENSIONS[os.path.splitext(self.rel)[1].lower()]


@dataclass
class Dataset:
    """The images of a folder in a fixed (sorted) order, with the class names if labelled."""

    root: Path
    entries: list[ImageEntry]
    classes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    label_source: str = "none"  # "folders", "csv" or "none"

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    @property
    def class_map(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.entries)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _printable(name: str) -> str:
    """A name that may hold undecodable bytes (surrogate escapes), shown with ``\\xNN`` escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _valid_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


_SPECIAL = [(stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device")]


def _special_kind(mode: int) -> str:
    for test, kind in _SPECIAL:
        if test(mode):
            return kind
    return "not a regular file"


def walk_images(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, str]]]:
    """Relative POSIX paths of every image under ``root`` (sorted), and the skipped entries
    as sorted ``(relative path, reason)`` pairs. Never raises for what the folder holds."""
    root_real = os.path.realpath(os.fspath(root))
    found: list[str] = []
    skipped: list[tuple[str, str]] = []
    try:
        st = os.stat(root_real)
    except OSError as exc:
        return [], [(".", f"cannot read folder: {_why(exc)}")]
    # Each folder carries the identities (device, inode) of the folders above it: a link back to
    # one of them is a loop and is not followed; other links to the same folder are followed.
    stack = [(root_real, "", frozenset({(st.st_dev, st.st_ino)}))]
    while stack:
        folder, rel_folder, above = stack.pop()
        try:
            with os.scandir(folder) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            skipped.append((rel_folder or ".", f"cannot list folder: {_why(exc)}"))
            continue
        for child in children:
            name = child.name
            if name.startswith("."):
                continue
            rel = f"{rel_folder}/{name}" if rel_folder else name
            try:
                is_link = child.is_symlink()
                if not is_link and child.is_file(follow_symlinks=False):  # the common case: no stat call
                    if is_image_name(name):
                        if _valid_utf8(name):
                            found.append(rel)
                        else:
                            skipped.append((_printable(rel), "name is not valid UTF-8; rename it"))
                    continue
                st = child.stat(follow_symlinks=True)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    skipped.append((_printable(rel), "symbolic link loop; not followed"))
                elif exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    skipped.append((_printable(rel), "broken symbolic link (its target does not exist)"))
                else:
                    skipped.append((_printable(rel), f"cannot examine: {_why(exc)}"))
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            if not (is_dir or is_image_name(name) or is_link):
                continue  # not an image: ignored silently
            if not _valid_utf8(name):
                skipped.append((_printable(rel), "name is not valid UTF-8; rename it"))
                continue
            if is_link and not _inside(os.path.realpath(child.path), root_real):
                skipped.append((rel, "symbolic link leaves the input folder; not followed"))
                continue
            if is_dir:
                ident = (st.st_dev, st.st_ino)
                if ident in above:
                    skipped.append((rel, "link to a folder above it (a loop); not followed"))
                else:
                    stack.append((child.path, rel, above | {ident}))
            elif not is_image_name(name):
                continue  # a link to something that is not an image
            elif stat.S_ISREG(st.st_mode):
                found.append(rel)
            else:
                skipped.append((rel, f"{_special_kind(st.st_mode)}, not a regular file; not read"))
    found.sort()
    skipped.sort()
    return found, skipped


def read_label_csv(path: Path) -> dict[str, str]:
    """``path,label`` rows of a label file (header required) as {relative path: label}."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise InputError(f"label file not found: {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read label file {path}: {exc}") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["path", "label"]:
        raise InputError(f"label file {path} must start with the header line 'path,label'")
    labels: dict[str, str] = {}
    for lineno, row in enumerate(rows[1:], start=2):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise InputError(f"label file {path}, line {lineno}: expected 'path,label'")
        rel = PurePosixPath(row[0].strip().replace("\\", "/"))
        key = str(PurePosixPath(*[p for p in rel.parts if p not in (".", "")]))
        if key in labels:
            raise InputError(f"label file {path}, line {lineno}: '{key}' is listed twice")
        labels[key] = row[1].strip()
    if not labels:
        raise InputError(f"label file {path} has no rows")
    return labels


_INTEGER = re.compile(r"[0-9]+")


def class_names(labels: Iterable[str]) -> list[str]:
    """The distinct label names, sorted: pure-integer names first by value (then by string, so
    ``01`` and ``1`` are two classes), then the other names by string. No class is invented."""

    def key(name: str) -> tuple[int, int, str]:
        return (0, int(name), name) if _INTEGER.fullmatch(name) else (1, 0, name)

    return sorted(set(labels), key=key)


def discover(root: str | os.PathLike, labels_csv: str | os.PathLike | None = None) -> Dataset:
    """All images under ``root`` with their labels (see module doc for the rules)."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"input folder not found: {root}")
    if not root.is_dir():
        raise InputError(f"input is not a folder: {root}")
    rels, skipped = walk_images(root)
    if not rels:
        raise InputError(f"no images (png, jpg, jpeg, webp, bmp, tif, tiff, dcm) found under {root}"
                         + (f" ({len(skipped)} skipped, e.g. '{skipped[0][0]}': {skipped[0][1]})" if skipped else ""))
    abs_root = Path(os.path.realpath(root))

    if labels_csv is not None:
        table = read_label_csv(Path(labels_csv))
        found = set(rels)
        why_skipped = dict(skipped)
        missing = sorted(r for r in table if r not in found and r not in why_skipped)
        if missing:
            raise InputError(f"label file lists {len(missing)} image(s) not found under {root}, e.g. '{missing[0]}'")
        unlabelled = [r for r in rels if r not in table]
        skipped = sorted(skipped + [(r, "not in the label file") for r in unlabelled])
        if unlabelled:
            log.warning("%d image(s) are not in the label file and are skipped", len(unlabelled))
        labelled = [r for r in rels if r in table]
        if not labelled:
            raise InputError(f"none of the images under {root} is listed in the label file {labels_csv}")
        classes = class_names(table[r] for r in labelled)
        if len(classes) > len(labelled):  # cannot happen with names; guards against a regression
            raise InputError(f"label file {labels_csv} has {len(classes)} classes for {len(labelled)} images")
        index = {name: i for i, name in enumerate(classes)}
        entries = [ImageEntry(r, abs_root, index[table[r]]) for r in labelled]
        return Dataset(abs_root, entries, classes, skipped, "csv")

    top_level = [r for r in rels if "/" not in r]
    nested = [r for r in rels if "/" in r]
    if nested and not top_level:
        classes = class_names(r.split("/", 1)[0] for r in nested)
        index = {name: i for i, name in enumerate(classes)}
        entries = [ImageEntry(r, abs_root, index[r.split("/", 1)[0]]) for r in rels]
        return Dataset(abs_root, entries, classes, skipped, "folders")
    if nested and top_level:
        log.warning(
            "%d image(s) lie directly in %s beside class folders; treating the folder as unlabelled",
            len(top_level), root,
        )
    return Dataset(abs_root, [ImageEntry(r, abs_root, None) for r in rels], [], skipped, "none")
