"""Find the images to protect: every image under one folder, or image files named one by one.

Labels come from class sub-folders (the first path component, class names in the order of :func:`class_names`), from a
``path,label`` CSV file, or not at all (a flat folder). CSV labels are class *names*, always
(``01`` and ``1`` are two classes); they are sorted with pure-integer names first in numeric order
(``2`` before ``10``), then the others by string.

Supported formats are the extensions of :data:`IMAGE_EXTENSIONS` (any case): PNG, JPEG, WebP, BMP,
TIFF, DICOM and HEIF (``.heic``/``.heif``, iPhone photos). Camera RAW files (:data:`RAW_EXTENSIONS`:
``.nef``, ``.cr2``, ``.arw``, ``.dng``, ...) are not read: they are listed in :attr:`Dataset.skipped`
with the hint to export them to JPEG or TIFF first, and a folder that holds only RAW files is
refused with that hint.

Folder discovery (:func:`discover`) never opens a file and never raises on what a folder holds.
Hidden files and folders (a leading ``.``: ``.DS_Store``, macOS ``._x.jpg`` resource forks) and
files without an image or RAW extension are ignored silently. Skipped, with a reason in
:attr:`Dataset.skipped`: camera RAW files, symbolic links that loop, dangle or leave the input
folder (links that stay inside are followed, to files and to folders), links back to a folder
above them, folders that cannot be listed, entries that cannot be examined, special files (FIFOs,
sockets, devices) with an image name (never opened: reading a FIFO would block), and names that
are not valid UTF-8 (they cannot be written in the run record).

File inputs (:func:`discover_files`): image files named one by one (``protect images a.jpg
b/c.png OUT``), unlabelled. Each must exist and be a regular file (a link to one is followed) with
a supported extension; anything else (a RAW or unknown extension, a folder, a FIFO, a name that is
not valid UTF-8) is an :class:`InputError` naming the file, before any work. The dataset's root is
the deepest folder holding them all (the common parent of their resolved folders) and each entry's
path is relative to it, so ``a/x.jpg`` and ``b/x.jpg`` stay two outputs; a file given twice counts
once. :func:`discover_inputs` takes the command line's inputs: one folder goes to :func:`discover`,
files to :func:`discover_files`.
"""

from __future__ import annotations

import csv
import errno
import logging
import os
import re
import stat
from collections.abc import Iterable, Sequence
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
    ".heic": "HEIF",  # iPhone photos; read and written with pillow-heif (protect.imageio)
    ".heif": "HEIF",
}

#: Camera RAW extensions (lower case): never read; listed in :attr:`Dataset.skipped` with a hint.
RAW_EXTENSIONS = frozenset({
    ".3fr", ".ari", ".arw", ".bay", ".cap", ".cr2", ".cr3", ".crw", ".dcr", ".dng", ".erf", ".fff", ".gpr",
    ".iiq", ".k25", ".kdc", ".mef", ".mos", ".mrw", ".nef", ".nrw", ".orf", ".pef", ".ptx", ".raf", ".raw",
    ".rw2", ".rwl", ".sr2", ".srf", ".srw", ".x3f",
})


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
    #: True when the images were named one by one (:func:`discover_files`), not found under a folder:
    #: ``root`` is then their common parent folder, and images beside them there are not part of the run.
    given_files: bool = False

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


def is_raw_name(name: str) -> bool:
    """Whether ``name`` has a camera RAW extension (any case)."""
    return os.path.splitext(name)[1].lower() in RAW_EXTENSIONS


RAW_HINT = "export it to JPEG or TIFF first"


def raw_reason(name: str) -> str:
    """The reason a camera RAW file is skipped, with the hint: ``camera RAW (.nef) is not read: ...``."""
    return f"camera RAW ({os.path.splitext(name)[1].lower()}) is not read: {RAW_HINT}"


def supported_extensions() -> str:
    """The supported image extensions, for messages: ``.png, .jpg, ...``."""
    return ", ".join(IMAGE_EXTENSIONS)


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
                    elif is_raw_name(name):
                        skipped.append((_printable(rel), raw_reason(name)))
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
            wanted = is_image_name(name) or is_raw_name(name)
            if not (is_dir or wanted or is_link):
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
            elif not wanted:
                continue  # a link to something that is not an image
            elif stat.S_ISREG(st.st_mode):
                if is_image_name(name):
                    found.append(rel)
                else:
                    skipped.append((rel, raw_reason(name)))
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


def _no_images_message(root: Path, skipped: list[tuple[str, str]]) -> str:
    exts = ", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
    message = f"no images ({exts}) found under {root}"
    raw = [rel for rel, why in skipped if why.startswith("camera RAW (")]
    other = [(rel, why) for rel, why in skipped if not why.startswith("camera RAW (")]
    if raw:
        kinds = sorted({os.path.splitext(rel)[1].lower() for rel in raw})
        message += (f": {len(raw)} camera RAW file(s) ({', '.join(kinds)}) are not read; "
                    "export them to JPEG or TIFF first")
    if other:
        message += f" ({len(other)} skipped, e.g. '{other[0][0]}': {other[0][1]})"
    return message


def discover(root: str | os.PathLike, labels_csv: str | os.PathLike | None = None) -> Dataset:
    """All images under ``root`` with their labels (see module doc for the rules)."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"input folder not found: {root}")
    if not root.is_dir():
        raise InputError(f"input is not a folder: {root}")
    rels, skipped = walk_images(root)
    if not rels:
        raise InputError(_no_images_message(root, skipped))
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


def _file_problem(name: str) -> str | None:
    """Why a file named ``name`` cannot be an input (its extension), or None if it can."""
    ext = os.path.splitext(name)[1].lower()
    if ext in IMAGE_EXTENSIONS:
        return None
    if ext in RAW_EXTENSIONS:
        return raw_reason(name)
    what = f"'{_printable(ext)}' is not a supported image extension" if ext else "has no image extension"
    return f"{what} (supported: {supported_extensions()})"


def _as_list(paths: Sequence[str | os.PathLike] | str | os.PathLike) -> list[str | os.PathLike]:
    """One path given where a sequence is expected counts as one path, not as its characters."""
    return [paths] if isinstance(paths, (str, bytes, os.PathLike)) else list(paths)


def discover_files(paths: Sequence[str | os.PathLike]) -> Dataset:
    """The image files named in ``paths`` as one unlabelled dataset (see module doc).

    The root is the deepest folder holding them all (``os.path.commonpath`` of their resolved
    folders); entries are sorted, their paths relative to the root, and a file named twice counts
    once. A link to a file is followed but keeps the name given. No file is opened.

    Raises:
        InputError: no path given, or one that is missing, a folder, not a regular file, has a
            camera RAW or unknown extension, or a name that is not valid UTF-8 (one line naming it).
    """
    paths = _as_list(paths)
    if not paths:
        raise InputError("no input given: name an input folder or image files")
    located: list[tuple[str, str]] = []  # (resolved folder, name as given)
    for given in paths:
        text = os.fsdecode(given)
        shown = _printable(text)
        name = os.path.basename(text.rstrip(os.sep))
        try:
            st = os.stat(text)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise InputError(f"input file not found: {shown}") from None
            if exc.errno == errno.ELOOP:
                raise InputError(f"input {shown} is a symbolic link loop") from None
            raise InputError(f"cannot examine input {shown}: {_why(exc)}") from None
        if stat.S_ISDIR(st.st_mode):
            raise InputError(f"input {shown} is a folder: give one input folder alone, or image files")
        problem = _file_problem(name)
        if problem is not None:
            raise InputError(f"input {shown}: {problem}")
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"input {shown} is {_special_kind(st.st_mode)}, not a regular file")
        located.append((os.path.realpath(os.path.dirname(os.path.abspath(text))), name))
    try:
        root = os.path.commonpath([folder for folder, _ in located])
    except ValueError:  # folders on different drives (Windows)
        raise InputError("the input files have no common folder (different drives); protect them separately") from None
    rels = sorted({Path(os.path.relpath(os.path.join(folder, name), root)).as_posix() for folder, name in located})
    for rel in rels:  # the relative path is written in the run record
        if not _valid_utf8(rel):
            raise InputError(f"input {_printable(rel)} (under {_printable(root)}): name is not valid UTF-8; rename it")
    abs_root = Path(root)
    return Dataset(abs_root, [ImageEntry(r, abs_root, None) for r in rels], [], [], "none", given_files=True)


def discover_inputs(paths: Sequence[str | os.PathLike],
                    labels_csv: str | os.PathLike | None = None) -> Dataset:
    """The dataset the command line's inputs name: one folder (:func:`discover`, with the label
    file if given) or image files (:func:`discover_files`, unlabelled).

    Raises:
        InputError: nothing given, several folders, a folder mixed with files, ``labels_csv``
            with files, or what :func:`discover` and :func:`discover_files` refuse.
    """
    paths = _as_list(paths)
    if not paths:
        raise InputError("no input given: name an input folder or image files")
    first = os.fsdecode(paths[0])
    if len(paths) == 1 and not os.path.lexists(first) and not (is_image_name(first) or is_raw_name(first)):
        raise InputError(f"input folder not found: {_printable(first)}")  # not named like an image: meant a folder
    folders = [p for p in paths if os.path.isdir(p)]
    if folders:
        if len(paths) == 1:
            return discover(paths[0], labels_csv)
        if len(folders) == len(paths):
            raise InputError(f"{len(folders)} input folders given: give one input folder, or image files")
        raise InputError(f"input {_printable(os.fsdecode(folders[0]))} is a folder: give one input folder alone, "
                         "or image files")
    if labels_csv is not None:
        raise InputError("--labels needs an input folder; image files given one by one are unlabelled")
    return discover_files(paths)
