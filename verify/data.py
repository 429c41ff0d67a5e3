"""Load a labelled image folder into memory as one uint8 tensor, for surrogate training.

Verification trains many small models on the same few thousand images, so the images are decoded
once (Pillow, in a thread pool) into ``x``: uint8 ``N x C x H x W`` (C = 1 for grayscale images, 3
otherwise; alpha is dropped, palette/CMYK become RGB, 16-bit becomes 8-bit by rounding), and labels
into ``y``: int64 ``(N,)``. All images must share one size and one channel count (verification does
not resize: resizing would change what the protection put in the pixels).

DICOM files (``.dcm``) are decoded by :func:`protect.imageio.decode` (pydicom), exactly as ``protect``
reads them: the stored values on their own grid ``0..levels`` (``2**BitsStored - 1``; signed data
shifted to unsigned, the modality rescale not applied). Like 16-bit PNG they become 8 bits by
``round(v * 255 / levels)``, so verification sees what the protection did at 8-bit precision: a
perturbation finer than ``levels / 255`` stored values, or a narrow stored range (a signed CT slice
spans ~2000 of 65535 values: 9 grey levels), is lost to that rounding.

``sha256`` fingerprints the loaded data (sorted relative paths, class names and file bytes); the
baseline cache and the saved cells in :mod:`verify.run` key on it.

Every failure a user's files can cause (missing, unreadable, undecodable, truncated or otherwise
damaged images, whatever Pillow raises for them) is an :class:`InputError` of one line that names
the file and the reason.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from perturbations.errors import InputError
from protect.discover import Dataset, ImageEntry, class_names, discover, read_label_csv
from protect.imageio import DICOM, ImageError, decode

__all__ = ["TensorSet", "check_same_classes", "find_overlap", "image_sizes", "load_folder"]

log = logging.getLogger(__name__)

_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass
class TensorSet:
    """A labelled image set in memory.

    Attributes:
        x: uint8 ``N x C x H x W`` images.
        y: int64 ``(N,)`` class indices into ``classes``.
        classes: sorted class names (the folder's class map).
        root: the folder the images came from.
        sha256: hex fingerprint of the relative paths, class names and file bytes.
        rels: relative POSIX path of each image, in order (sorted).
        source_sha256: the same fingerprint without the resolution the images were brought to
            (empty: equal to ``sha256``), so what depends on which images these are (the validation
            split) is the same at every attacker resolution.
    """

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    root: Path
    sha256: str
    rels: list[str] = field(default_factory=list)
    source_sha256: str = ""

    @property
    def content_id(self) -> str:
        """Which images, labels and paths these are, whatever their resolution."""
        return self.source_sha256 or self.sha256

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.x.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)``."""
        return int(self.x.shape[2]), int(self.x.shape[3])

    def counts(self) -> list[int]:
        """Number of images per class, in class order."""
        return torch.bincount(self.y, minlength=self.num_classes).tolist()

    def subset(self, indices: torch.Tensor | Sequence[int]) -> TensorSet:
        """The images at ``indices`` (same classes); the hash covers the parent hash and the indices."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        h = hashlib.sha256(f"{self.sha256}/subset/".encode() + ",".join(map(str, idx.tolist())).encode())
        rels = [self.rels[i] for i in idx.tolist()] if self.rels else []
        source = ""
        if self.source_sha256:
            source = hashlib.sha256(f"{self.source_sha256}/subset/".encode()
                                    + ",".join(map(str, idx.tolist())).encode()).hexdigest()
        return TensorSet(self.x[idx].contiguous(), self.y[idx].clone(), list(self.classes), self.root, h.hexdigest(),
                         rels, source)

    def select_classes(self, names: Sequence[str]) -> TensorSet:
        """Only the images of the classes ``names``, relabelled ``0..len(names)-1`` in sorted name order."""
        names = sorted(names)
        missing = [n for n in names if n not in self.classes]
        if missing:
            raise InputError(f"classes {missing} are not in {self.root} (has {self.classes})")
        old = [self.classes.index(n) for n in names]
        keep = torch.isin(self.y, torch.tensor(old)).nonzero().flatten()
        out = self.subset(keep)
        remap = torch.full((len(self.classes),), -1, dtype=torch.int64)
        remap[torch.tensor(old)] = torch.arange(len(old))
        out.y = remap[out.y]
        out.classes = list(names)
        out.sha256 = hashlib.sha256(f"{out.sha256}/classes/{'|'.join(names)}".encode()).hexdigest()
        return out

    def pixel_digests(self) -> list[bytes]:
        """A 16-byte BLAKE2b digest of each image's pixels (with its shape): equal for equal images
        whatever file format held them."""
        x = self.x.numpy() if self.x.device.type == "cpu" else self.x.cpu().numpy()
        return [hashlib.blake2b(memoryview(a.tobytes()), digest_size=16).digest() for a in x]

    def describe(self) -> dict:
        """A JSON-ready summary (root, count, per-class counts, shape, hash) for certificates."""
        return {
            "root": str(self.root),
            "count": len(self),
            "per_class": self.counts(),
            "shape": [self.channels, *self.image_size],
            "sha256": self.sha256,
        }


def _pixels(img: Image.Image) -> np.ndarray:
    """H x W x C uint8 array of an ``L`` or ``RGB`` image (``tobytes`` is faster than ``asarray``)."""
    w, h = img.size
    return np.frombuffer(img.tobytes(), dtype=np.uint8).reshape(h, w, len(img.getbands()))


def _to_8bit(a: np.ndarray, levels: int) -> np.ndarray:
    """Values on the grid ``0..levels`` as uint8: ``round(a * 255 / levels)`` (one correctly rounded
    float64 division, so 16-bit PNG gives exactly ``round(a / 257)``)."""
    if a.dtype == np.uint8 and levels == 255:
        return a
    return np.clip(np.rint(a.astype(np.float64) * 255.0 / levels), 0, 255).astype(np.uint8)


def _to_array(img: Image.Image) -> np.ndarray:
    """H x W x C uint8 array: C = 1 for grayscale modes, else 3 (alpha dropped)."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit data (PNG 16-bit opens as I or I;16): scale 0..65535 to 0..255 with rounding.
        return _to_8bit(np.asarray(img), 65535)[:, :, None]
    if mode in _GRAY_MODES:
        return _pixels(img if mode == "L" else img.convert("L"))
    if mode != "RGB":
        img = img.convert("RGBA" if "A" in mode or mode == "P" else "RGB").convert("RGB")
    return _pixels(img)


#: How verify brings an image to an attacker's resolution R (torchvision's Resize(R) then CenterCrop(R)).
RESIZE_RULE = ("shorter side to R (the longer side truncated as torchvision's Resize does), bilinear with "
               "antialiasing (Pillow); centre crop R x R; JPEGs decoded at the smallest DCT scale that keeps "
               "at least 2R pixels on each side")


def resize_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """``arr`` (H x W x C uint8) resized so its shorter side is ``size`` (bilinear, antialiased;
    the longer side ``int(size * long / short)``) and centre-cropped to ``size x size``: what
    torchvision's ``Resize(size)`` and ``CenterCrop(size)`` do to a PIL image."""
    h, w, c = arr.shape
    if (h, w) != (size, size):
        if h <= w:
            nh, nw = size, int(size * w / h)
        else:
            nh, nw = int(size * h / w), size
        if (nh, nw) != (h, w):
            img = Image.fromarray(arr[:, :, 0] if c == 1 else arr)
            arr = _pixels(img.resize((nw, nh), Image.Resampling.BILINEAR))
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        arr = arr[top:top + size, left:left + size]
    return np.ascontiguousarray(arr)


def _read(entry: ImageEntry, resolution: int | None = None) -> tuple[str, np.ndarray]:
    """(sha256 of the file bytes, H x W x C uint8 array) for one image; with ``resolution`` R, the
    image brought to R x R (:data:`RESIZE_RULE`), never held at full size when it is a JPEG."""
    try:
        data = entry.path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read image {entry.rel}: {exc.strerror or exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    if entry.format == DICOM:
        arr = _read_dicom(entry.rel, data)
        return digest, (arr if resolution is None else resize_crop(arr, resolution))
    if data[128:132] == b"DICM":  # the DICOM magic, under another extension
        raise InputError(f"cannot decode image {entry.rel}: the content is DICOM; rename the file to .dcm")
    try:
        try:  # naming the format skips probing every plugin (a third of the time for small PNGs)
            img = Image.open(io.BytesIO(data), formats=[entry.format])
        except UnidentifiedImageError:  # extension does not match the content
            img = Image.open(io.BytesIO(data))
        with img:
            if resolution is not None and img.format == "JPEG":  # decode at a reduced DCT scale
                img.draft(None, (2 * resolution, 2 * resolution))
            img.load()
            if img.format in ("JPEG", "WEBP", "TIFF"):  # formats that carry EXIF orientation
                img = ImageOps.exif_transpose(img)
            arr = _to_array(img)
        if resolution is not None:
            arr = resize_crop(arr, resolution)
    except UnidentifiedImageError:
        raise InputError(f"cannot decode image {entry.rel}: not an image Pillow can read "
                         "(unknown format or a damaged header)") from None
    except MemoryError:
        raise InputError(f"cannot decode image {entry.rel}: it needs more memory than is available") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file can make any Pillow plugin raise anything
        # (OSError "truncated", SyntaxError "broken PNG file", struct.error, EOFError, ValueError,
        # DecompressionBombError, ...): all are the file's fault, never an internal error.
        raise InputError(f"cannot decode image {entry.rel}: {_reason(exc)}") from None
    return digest, arr


def _read_dicom(rel: str, data: bytes) -> np.ndarray:
    """H x W x C uint8 array of a DICOM file (C = 1 or 3): its stored values scaled by its levels."""
    try:
        decoded = decode(data, DICOM)
    except ImageError as exc:  # pydicom's failures, already one user-facing reason
        raise InputError(f"cannot decode image {rel}: {' '.join(str(exc).split())}") from None
    except MemoryError:
        raise InputError(f"cannot decode image {rel}: it needs more memory than is available") from None
    return _to_8bit(decoded.pixels, decoded.levels)


def _reason(exc: BaseException) -> str:
    """One line: the exception's message (or its type when it has none), for a decode error."""
    text = " ".join(str(exc).split())
    kind = type(exc).__name__
    if not text:
        return f"damaged file ({kind})"
    return text if isinstance(exc, (OSError, ValueError)) else f"{text} ({kind})"


def _describe(arr: np.ndarray) -> str:
    h, w, c = arr.shape
    return f"{w}x{h} {'grayscale' if c == 1 else 'RGB'}"


def find_overlap(test: TensorSet, train: TensorSet) -> tuple[str, str] | None:
    """``(test path, train path)`` of the first test image whose pixels equal an image of ``train``
    (None when the sets share no image). A model scored on images it trained on measures memory,
    not what the training set teaches."""
    seen = {d: i for i, d in enumerate(train.pixel_digests())}
    for i, d in enumerate(test.pixel_digests()):
        j = seen.get(d)
        if j is not None:
            name = lambda t, k: t.rels[k] if t.rels else f"#{k}"  # noqa: E731
            return name(test, i), name(train, j)
    return None


def check_same_classes(classes: Sequence[str], expected: Sequence[str], name: str, expected_name: str) -> None:
    """InputError ``class folders differ: <expected_name> has [...], <name> has [...]`` unless equal."""
    if list(classes) != list(expected):
        only_here = sorted(set(classes) - set(expected))
        only_there = sorted(set(expected) - set(classes))
        hint = ""
        if only_here or only_there:
            hint = f" (only in {name}: {only_here or 'none'}; only in {expected_name}: {only_there or 'none'})"
        raise InputError(
            f"class folders differ: {expected_name} has {list(expected)}, {name} has {list(classes)}{hint}"
        )


def _discover(root: Path, labels_csv: str | os.PathLike | None) -> Dataset:
    """:func:`protect.discover.discover`, except that a CSV row ``a/x.jpg`` also labels ``a/x.png``
    when only the latter exists: the output of ``protect images --format png --labels CSV``, so
    the protected folder and the clean folder share one label file."""
    if labels_csv is None:
        return discover(root)
    table = read_label_csv(Path(labels_csv))
    renamed: dict[str, str] = {}
    for rel in table:
        if not rel.lower().endswith(".png"):
            png = str(PurePosixPath(rel).with_suffix(".png"))
            if png not in table and not (root / rel).exists() and (root / png).exists():
                renamed[rel] = png
    if not renamed:
        return discover(root, labels_csv)
    log.info("%d row(s) of the label file %s name a converted image (.png) under %s", len(renamed), labels_csv, root)
    table = {renamed.get(rel, rel): label for rel, label in table.items()}
    ds = discover(root)
    found = {e.rel for e in ds.entries}
    missing = sorted(r for r in table if r not in found)
    if missing:
        raise InputError(f"label file lists {len(missing)} image(s) not found under {root}, e.g. '{missing[0]}'")
    labelled = [e.rel for e in ds.entries if e.rel in table]
    if len(labelled) < len(ds.entries):
        log.warning("%d image(s) are not in the label file and are skipped", len(ds.entries) - len(labelled))
    classes = class_names(table[r] for r in labelled)
    index = {name: i for i, name in enumerate(classes)}
    entries = [ImageEntry(r, ds.root, index[table[r]]) for r in labelled]
    return Dataset(ds.root, entries, classes, ds.skipped, "csv")


def _first_per_class(entries: Sequence[ImageEntry], n: int) -> list[ImageEntry]:
    """The first ``n`` entries of each class, in the entries' (sorted path) order."""
    kept: list[ImageEntry] = []
    per: dict[int, int] = {}
    for e in entries:
        if per.get(e.label, 0) < n:  # type: ignore[arg-type]
            per[e.label] = per.get(e.label, 0) + 1  # type: ignore[index]
            kept.append(e)
    return kept


def _header_size(entry: ImageEntry) -> tuple[int, int] | None:
    """(width, height) as displayed (EXIF orientation applied) from the file's header, or None when
    it cannot be read that way (DICOM, a damaged or unknown file: :func:`load_folder` reports those)."""
    if entry.format == DICOM:
        return None
    try:
        with Image.open(entry.path) as img:
            w, h = img.size
            if img.format in ("JPEG", "WEBP", "TIFF") and img.getexif().get(0x0112) in (5, 6, 7, 8):
                w, h = h, w  # rotated by 90 degrees when displayed
            return int(w), int(h)
    except Exception:  # noqa: BLE001 - any unreadable header: unknown here, reported by load_folder
        return None


def image_sizes(root: str | os.PathLike, labels_csv: str | os.PathLike | None = None,
                max_per_class: int | None = None, workers: int | None = None) -> list[tuple[int, int]] | None:
    """The displayed (width, height) of every labelled image :func:`load_folder` would load, read from
    the file headers (nothing decoded: milliseconds per 12-megapixel JPEG), or None when any size
    cannot be read that way (a DICOM folder, a damaged file) or the folder cannot be listed."""
    try:
        ds = _discover(Path(root), labels_csv)
    except (InputError, OSError):
        return None
    entries = [e for e in ds.entries if e.label is not None]
    if max_per_class is not None and max_per_class >= 1:
        entries = _first_per_class(entries, max_per_class)
    if not entries:
        return None
    with ThreadPoolExecutor(max_workers=workers or min(16, 2 * (os.cpu_count() or 1))) as pool:
        sizes = list(pool.map(_header_size, entries, chunksize=64))
    return None if any(s is None for s in sizes) else sizes  # type: ignore[return-value]


def load_folder(
    root: str | os.PathLike,
    labels_csv: str | os.PathLike | None = None,
    classes: list[str] | None = None,
    max_per_class: int | None = None,
    *,
    name: str | None = None,
    expected_name: str = "expected",
    workers: int | None = None,
    resolution: int | None = None,
) -> TensorSet:
    """Decode every labelled image under ``root`` into a :class:`TensorSet`.

    Labels come from class sub-folders or ``labels_csv`` (see :func:`protect.discover.discover`; a
    row ``x.jpg`` also labels ``x.png`` when only that exists, as ``protect images --format png`` writes).
    ``classes``: when given, the folder's class names must equal it (else InputError
    ``class folders differ: <expected_name> has [...], <name> has [...]``). ``max_per_class``: keep
    the first N images of each class in sorted path order (quick subsets; the hash covers only
    the kept images). ``name`` labels this folder in messages (default: the folder's name).
    ``workers``: decoding threads (default ``min(16, 2 * cpu_count)``). ``resolution``: bring every
    image to R x R as an attacker's pipeline does (:data:`RESIZE_RULE`), so folders of mixed sizes
    and orientations load, held in memory at R x R only (a mix of grey and colour images loads as
    colour); the hash covers the rule and R.

    Raises InputError for a missing, empty or unlabelled folder, fewer than two classes,
    undecodable images, or (without ``resolution``) images whose size or channel count differs
    from the first image.
    """
    if resolution is not None and (isinstance(resolution, bool) or int(resolution) < 8):
        raise InputError(f"resolution must be at least 8 pixels, got {resolution}")
    root = Path(root)
    name = name or root.name or str(root)
    ds = _discover(root, labels_csv)
    if not ds.labelled:
        raise InputError(
            f"{name} folder {root} has no labels: put the images in one sub-folder per class "
            f"(or pass a path,label CSV: {'--test-labels' if name == 'test' else '--labels'} CSV)"
        )
    if classes is not None:
        check_same_classes(ds.classes, classes, name, expected_name)
    if len(ds.classes) < 2:
        raise InputError(f"{name} folder {root} has only {len(ds.classes)} class ({ds.classes}); need at least 2")
    entries = [e for e in ds.entries if e.label is not None]
    if max_per_class is not None:
        if max_per_class < 1:
            raise InputError(f"max_per_class must be >= 1, got {max_per_class}")
        entries = _first_per_class(entries, max_per_class)
    if not entries:
        raise InputError(f"{name} folder {root} has no labelled images")
    empty = [c for i, c in enumerate(ds.classes) if not any(e.label == i for e in entries)]
    if empty:
        log.warning("%s folder %s: class(es) %s have no images", name, root, empty)

    workers = workers or min(16, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda e: _read(e, resolution), entries, chunksize=64))
    if resolution is not None and len({r[1].shape[2] for r in results}) > 1:  # grey among colour: as colour
        results = [(d, a if a.shape[2] == 3 else np.repeat(a, 3, axis=2)) for d, a in results]

    first_shape = results[0][1].shape
    x = np.empty((len(entries), *first_shape), dtype=np.uint8)
    h = hashlib.sha256()
    h.update(b"protect.verify.data/1\0")
    h.update(("\0".join(ds.classes) + "\0\0").encode())
    source = h.copy() if resolution is not None else None  # the same images at their own size
    if resolution is not None:
        h.update(f"resolution {int(resolution)}: {RESIZE_RULE}\0".encode())
    for i, (entry, (digest, arr)) in enumerate(zip(entries, results)):
        if arr.shape != first_shape:
            raise InputError(
                f"image {entry.rel} in {name} is {_describe(arr)}, but {entries[0].rel} is "
                f"{_describe(results[0][1])}: all images must share one size and channel count "
                f"(or train the attacker at one resolution: --resolution 64)"
            )
        x[i] = arr
        line = f"{entry.rel}\0{entry.label}\0{digest}\n".encode()
        h.update(line)
        if source is not None:
            source.update(line)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor([e.label for e in entries], dtype=torch.int64)
    log.info("loaded %d images (%s) from %s", len(entries), _describe(results[0][1]), root)
    return TensorSet(xt, y, list(ds.classes), ds.root, h.hexdigest(), [e.rel for e in entries],
                     source.hexdigest() if source is not None else "")
