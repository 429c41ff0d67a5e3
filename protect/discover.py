"""Find the images under a folder and their labels.

Labels come from class sub-folders (the first path component, class names sorted), from a
``path,label`` CSV file, or not at all (a flat folder). Hidden files and folders are skipped;
symbolic links are followed only while they stay inside the input folder.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .errors import InputError

log = logging.getLogger(__name__)

#: Extension (lower case) -> Pillow format name.
IMAGE_EXTENSIONS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}


@dataclass(frozen=True)
class ImageEntry:
    """One image found under the root: POSIX relative path, absolute path, label index or None."""

    rel: str
    path: Path
    label: int | None = None

    @property
    def format(self) -> str:
        """Pillow format name implied by the extension."""
        return IMAGE_EXTENSIONS[PurePosixPath(self.rel).suffix.lower()]


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
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def walk_images(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Relative POSIX paths of every image under ``root`` (sorted) and the skipped links."""
    root = root.resolve()
    found: list[str] = []
    skipped: list[tuple[str, str]] = []
    # Each folder carries the real paths of the folders above it: a link back to one of them
    # is a loop and is not followed; other links to the same folder are (like links to files).
    stack = [(root, PurePosixPath(), frozenset({root}))]
    while stack:
        folder, rel_folder, above = stack.pop()
        try:
            children = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            skipped.append((str(rel_folder) or ".", f"cannot list folder: {exc.strerror or exc}"))
            continue
        for child in children:
            if child.name.startswith("."):
                continue
            rel = rel_folder / child.name
            if child.is_symlink():
                target = Path(child.path).resolve()
                if not _inside(target, root):
                    skipped.append((str(rel), "symbolic link leaves the input folder; not followed"))
                    continue
                if target.is_dir():
                    if target not in above:
                        stack.append((Path(child.path), rel, above | {target}))
                    continue
            if child.is_dir(follow_symlinks=True):
                real = Path(child.path).resolve()
                if real not in above:
                    stack.append((Path(child.path), rel, above | {real}))
            elif child.is_file(follow_symlinks=True) and is_image_name(child.name):
                found.append(str(rel))
    found.sort()
    return found, skipped


def read_label_csv(path: Path) -> dict[str, str]:
    """``path,label`` rows of a label file (header required) as {relative path: label}."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise InputError(f"label file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
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


def _class_names(values: list[str]) -> list[str]:
    """Sorted class names; all-integer labels keep their integer as the index."""
    unique = set(values)
    if all(v.lstrip("-").isdigit() for v in unique):
        ints = sorted(int(v) for v in unique)
        if ints[0] < 0:
            raise InputError(f"integer labels must be >= 0, got {ints[0]}")
        return [str(i) for i in range(ints[-1] + 1)]
    return sorted(unique)


def discover(root: str | os.PathLike, labels_csv: str | os.PathLike | None = None) -> Dataset:
    """All images under ``root`` with their labels (see module doc for the rules)."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"input folder not found: {root}")
    if not root.is_dir():
        raise InputError(f"input is not a folder: {root}")
    rels, skipped = walk_images(root)
    if not rels:
        raise InputError(f"no images (png, jpg, jpeg, webp, bmp, tif, tiff) found under {root}")
    abs_root = root.resolve()

    if labels_csv is not None:
        table = read_label_csv(Path(labels_csv))
        missing = sorted(set(table) - set(rels))
        if missing:
            raise InputError(f"label file lists {len(missing)} image(s) not found under {root}, e.g. '{missing[0]}'")
        unlabelled = [r for r in rels if r not in table]
        skipped += [(r, "not in the label file") for r in unlabelled]
        if unlabelled:
            log.warning("%d image(s) are not in the label file and are skipped", len(unlabelled))
        classes = _class_names(list(table.values()))
        index = {name: i for i, name in enumerate(classes)}
        entries = [ImageEntry(r, abs_root / r, index[table[r]]) for r in rels if r in table]
        return Dataset(abs_root, entries, classes, skipped, "csv")

    top_level = [r for r in rels if "/" not in r]
    nested = [r for r in rels if "/" in r]
    if nested and not top_level:
        classes = sorted({r.split("/", 1)[0] for r in nested})
        index = {name: i for i, name in enumerate(classes)}
        entries = [ImageEntry(r, abs_root / r, index[r.split("/", 1)[0]]) for r in rels]
        return Dataset(abs_root, entries, classes, skipped, "folders")
    if nested and top_level:
        log.warning(
            "%d image(s) lie directly in %s beside class folders; treating the folder as unlabelled",
            len(top_level), root,
        )
    return Dataset(abs_root, [ImageEntry(r, abs_root / r, None) for r in rels], [], skipped, "none")
