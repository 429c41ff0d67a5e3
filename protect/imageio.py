"""Decode and encode image files with Pillow, keeping what a user expects to keep.

Decoding: EXIF orientation is applied; grayscale stays one channel; alpha is split off (it is
never perturbed and is written back untouched); palette and bilevel images become RGB(A)/L;
16-bit grayscale PNG/TIFF keeps 16 bits; a transparent colour (PNG tRNS) becomes an alpha channel.
Refused with a reason: CMYK and other exotic modes, 16-bit colour or grayscale+alpha PNG and
16-bit colour TIFF (Pillow reads them at 8 bits only), multi-frame files, a content type that does
not match the extension, images without pixels, and images above ``max_pixels``
(decompression-bomb guard, checked from the header before any pixel is decoded; it replaces
Pillow's own global limit for the call, so it can be raised above it). Any failure of the
decoder on malformed bytes is an :class:`ImageError`, never another exception.

HEIF/HEIC (the iPhone default) is read and written through pillow-heif, imported only when such a
file is met (without it, that file fails with a reason naming ``pip install pillow-heif``).
libheif applies the file's own rotation on decode, so its pixels arrive upright like any other.

Encoding: lossless formats stay as they are (PNG, lossless WebP, BMP, TIFF with lossless
compression); ``out_format="png"`` converts everything to PNG. Lossy outputs (JPEG, HEIF; a
re-encode weakens the protection: the pipeline warns) follow the *input* by default
(``quality=None``, "auto"): a JPEG is written at the quality estimated from the input's
quantisation tables (:func:`estimate_jpeg_quality`) with the input's chroma subsampling, so the
output is about the size of the input; a HEIF at :data:`HEIF_QUALITY` with the input's chroma; a
lossy output of any other input at :data:`JPEG_QUALITY`, 4:4:4. An explicit quality (1..100)
overrides, and then chroma is never subsampled (4:4:4), as before "auto" existed.
:func:`lossy_settings` says which quality and subsampling a file gets.
The ICC profile, DPI and EXIF (orientation reset) are kept where the format allows.

DICOM (``.dcm``) goes through :mod:`protect.dicom` instead: stored values at their own depth, written
back into the same file with nothing else changed; it cannot be converted to PNG.

Every decoded image carries its ``levels``, the largest value of its integer grid: 255 for 8-bit
files, 65535 for 16-bit PNG/TIFF, ``2**BitsStored - 1`` for DICOM. The pipeline batches and
protects on that grid.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from .dicom import FORMAT as DICOM  # pydicom itself is imported only when a DICOM file is read

#: Largest image accepted by default: Pillow's own hard limit (2 x its default MAX_IMAGE_PIXELS).
#: ``decode(max_pixels=...)`` replaces it, above or below, without touching Pillow's global.
DEFAULT_MAX_PIXELS = 178_956_970
#: Quality of a JPEG output whose input has no quantisation tables to follow (not a JPEG).
JPEG_QUALITY = 95
#: Quality of a HEIF output in "auto" mode (HEVC carries no tables to estimate one from).
HEIF_QUALITY = 90
#: Output formats that lose information: their fidelity is measured on the decoded written file.
LOSSY = frozenset({"JPEG", "HEIF"})
OUT_FORMATS = ("keep", "png")
HEIF = "HEIF"
_EXT = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif", HEIF: ".heic"}
#: Pillow's ``subsampling`` codes and their names (``JpegImagePlugin.get_sampling``).
_SAMPLING = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}
_LOSSLESS_TIFF = {"raw", "tiff_lzw", "tiff_adobe_deflate", "tiff_deflate", "packbits", None}
_ORIENTATION = 0x0112



# -- HEIF through pillow-heif (optional at import time) ------------------------------------------
_heif_lock = threading.Lock()
_heif_ready: bool | None = None
HEIF_MISSING = "HEIF/HEIC needs the pillow-heif package: pip install pillow-heif"


def heif_available() -> bool:
    """Register pillow-heif's HEIF opener and saver with Pillow (once); False if it is not installed."""
    global _heif_ready
    if _heif_ready is None:
        with _heif_lock:
            if _heif_ready is None:
                try:
                    import pillow_heif

                    pillow_heif.register_heif_opener()
                    _heif_ready = True
                except Exception:  # noqa: BLE001 - not installed, or its native library does not load
                    _heif_ready = False
    return _heif_ready


# -- JPEG quality from quantisation tables ------------------------------------------------------
#: The example tables of ITU-T T.81 Annex K (luminance, chrominance), natural (row-major) order,
#: which the IJG library scales to a quality setting.
_ANNEX_K = (
    (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
     14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
     49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99),
    (17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
     47, 66, 99, 99, 99, 99, 99, 99, *([99] * 32)),
)


def ijg_tables(quality: int) -> tuple[np.ndarray, np.ndarray]:
    """The luminance and chrominance tables the IJG library (and Pillow) write at ``quality``
    (1..100, baseline: entries clamped to 1..255)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return tuple(np.clip((np.array(t, dtype=np.int64) * scale + 50) // 100, 1, 255) for t in _ANNEX_K)  # type: ignore[return-value]


_IJG = np.stack([np.stack(ijg_tables(q)) for q in range(1, 101)])  # 100 x 2 x 64


def estimate_jpeg_quality(quantization: dict[int, Any] | None) -> int | None:
    """The IJG quality (1..100) whose scaled Annex K tables are closest to a JPEG's own
    (``PIL.Image.quantization``: table id -> 64 values in natural order): exact for files written
    by libjpeg/Pillow at a quality; for other encoders' tables (cameras, Photoshop) the closest
    quality by mean absolute log-ratio, ties to the higher quality. None without tables."""
    if not quantization:
        return None
    tables = [np.asarray(list(quantization[k]), dtype=np.float64) for k in sorted(quantization)[:2]]
    if any(t.size != 64 for t in tables):
        return None
    err = np.zeros(100)
    for i, t in enumerate(tables):
        ref = _IJG[:, i].astype(np.float64)
        err += np.abs(np.log(np.maximum(t, 1.0)) - np.log(ref)).mean(axis=1)
    exact = np.flatnonzero(err == 0)
    if exact.size:
        return int(exact[-1] + 1)
    best = np.flatnonzero(err <= err.min() + 1e-12)
    return int(np.clip(best[-1] + 1, 1, 100))


def _jpeg_sampling(im: Image.Image) -> str | None:
    """The chroma subsampling of a JPEG being read ("4:4:4", "4:2:2", "4:2:0"), None for grayscale.
    Patterns Pillow cannot write (4:1:1, 4:4:0, ...) count as 4:2:0 (the nearest in size)."""
    if im.mode not in ("RGB", "YCbCr"):
        return None
    code = JpegImagePlugin.get_sampling(im)
    if code in _SAMPLING:
        return _SAMPLING[code]
    layers = getattr(im, "layer", None) or []
    return "4:4:4" if len({(h, v) for _, h, v, _ in layers}) <= 1 else "4:2:0"


def lossy_settings(fmt: str, meta: dict[str, Any], quality: int | None) -> tuple[int | None, str | None]:
    """(quality, subsampling) a ``fmt`` output of an input with ``meta`` is written with;
    ``quality`` None is "auto" (see module doc). (None, None) for lossless formats; subsampling
    None for grayscale JPEG."""
    if fmt not in LOSSY:
        return None, None
    if quality is not None:
        return int(quality), "4:4:4"
    if fmt == "JPEG":
        if meta.get("jpeg_quality") is not None:
            return int(meta["jpeg_quality"]), meta.get("subsampling")
        return JPEG_QUALITY, "4:4:4"
    return HEIF_QUALITY, meta.get("subsampling") or "4:2:0"


class ImageError(Exception):
    """An image that cannot be protected; the message is the reason shown to the user."""


@dataclass
class Decoded:
    """Pixels split from metadata: ``pixels`` H x W x C (C 1 or 3), uint8 or uint16, with values in
    ``[0, levels]``; ``levels`` defaults to 255 for uint8 and 65535 for uint16 (DICOM sets
    ``2**BitsStored - 1``: 4095 for 12-bit data)."""

    pixels: np.ndarray
    alpha: np.ndarray | None
    format: str
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    levels: int = 0

    def __post_init__(self) -> None:
        if not self.levels:
            self.levels = 65535 if self.pixels.dtype == np.uint16 else 255
        if self.levels & (self.levels + 1) or self.levels > (65535 if self.pixels.dtype == np.uint16 else 255):
            raise ValueError(f"levels {self.levels} is not 2**bits - 1 within the {self.pixels.dtype} pixels")

    @property
    def bits(self) -> int:
        """Bits per value in memory (8 or 16), not the file's depth (see :attr:`depth`)."""
        return 16 if self.pixels.dtype == np.uint16 else 8

    @property
    def depth(self) -> int:
        """Bits of the integer grid: ``levels == 2**depth - 1`` (8, 16, or 12 for 12-bit DICOM)."""
        return self.levels.bit_length()

    @property
    def key(self) -> tuple[int, int, int, int]:
        """Batching key: channels, height, width, depth (which fixes ``levels`` and the in-memory
        dtype): images of another depth never share a batch."""
        h, w, c = self.pixels.shape
        return c, h, w, self.depth


def _png_bit_depth(data: bytes) -> tuple[int, int]:
    """(bit depth, colour type) from a PNG header, or (0, 0)."""
    if len(data) > 26 and data[12:16] == b"IHDR":
        return data[24], data[25]
    return 0, 0


# -- the pixel limit ---------------------------------------------------------------------------
# Pillow refuses images above 2 x Image.MAX_IMAGE_PIXELS (a process-wide global) inside
# Image.open and some loaders, before we could apply our own limit. Decoding runs in threads, so
# changing that global would race; instead Pillow's check function is wrapped once: in a thread
# that is inside decode() it applies decode's ``max_pixels`` (and never warns), everywhere else it
# is Pillow's own check, unchanged.
_local = threading.local()
_pillow_bomb_check = getattr(Image, "_decompression_bomb_check", None)
_pillow_bomb_check = getattr(_pillow_bomb_check, "__wrapped__", _pillow_bomb_check)


class _TooLarge(Image.DecompressionBombError):
    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__(f"{size[0]}x{size[1]}")
        self.size = size


def _bomb_check(size: tuple[int, int], *args: Any, **kwargs: Any) -> None:
    limit = getattr(_local, "max_pixels", None)
    if limit is None:
        return _pillow_bomb_check(size, *args, **kwargs)  # type: ignore[misc]
    if max(1, size[0]) * max(1, size[1]) > limit:
        raise _TooLarge(size)
    return None


if _pillow_bomb_check is not None:
    _bomb_check.__wrapped__ = _pillow_bomb_check  # type: ignore[attr-defined]
    Image._decompression_bomb_check = _bomb_check  # type: ignore[attr-defined]


@contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    before = getattr(_local, "max_pixels", None)
    _local.max_pixels = max_pixels
    try:
        yield
    finally:
        _local.max_pixels = before


def _too_large(size: tuple[int, int], max_pixels: int) -> ImageError:
    w, h = size
    return ImageError(f"{w}x{h} = {w * h} pixels is above the limit of {max_pixels} "
                      "(decompression-bomb guard); raise it with --max-pixels if you trust the file")


def _reason(exc: BaseException) -> str:
    """The decoder's message; the exception's name too when it is not an I/O error."""
    text = str(exc).strip()
    if isinstance(exc, OSError) and text:
        return text
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


#: Formats named in a "content is X" message when the extension does not match.
_KNOWN = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")


def _open(data: bytes, expected_format: str, max_pixels: int) -> Image.Image:
    """Open (header only) as ``expected_format``; say what the content is when it is not."""
    if expected_format == HEIF and not heif_available():
        raise ImageError(HEIF_MISSING)
    try:
        return Image.open(io.BytesIO(data), formats=[expected_format])
    except UnidentifiedImageError:
        pass
    except _TooLarge as exc:
        raise _too_large(exc.size, max_pixels) from None
    except Image.DecompressionBombError as exc:  # Pillow's own check (only if it could not be wrapped)
        raise ImageError(f"image too large for Pillow's decompression-bomb guard: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any decoder failure is the file's
        raise ImageError(f"cannot read image: {_reason(exc)}") from None
    if data[128:132] == b"DICM":
        raise ImageError(f"content is DICOM but the extension says {expected_format}; rename the file to .dcm")
    try:
        known = _KNOWN + ((HEIF,) if data[4:8] == b"ftyp" and heif_available() else ())
        with Image.open(io.BytesIO(data), formats=[f for f in known if f != expected_format]) as other:
            actual = "JPEG" if other.format == "MPO" else other.format
    except Exception:  # noqa: BLE001 - not one of the known formats either
        raise ImageError("not a readable image (corrupt or unknown format)") from None
    if actual in _EXT:
        raise ImageError(f"content is {actual} but the extension says {expected_format}; rename the file")
    raise ImageError(f"content is {actual}, which is not supported (extension says {expected_format})")


def decode(data: bytes, expected_format: str, max_pixels: int = DEFAULT_MAX_PIXELS,
           on_header: Callable[[int, int, int, int], None] | None = None) -> Decoded:
    """Decode one file's bytes. Raises :class:`ImageError` with a user-facing reason.

    ``max_pixels`` is the only size limit: it is checked from the header before any pixel is
    decoded, and it replaces Pillow's global decompression-bomb limit (higher or lower) for
    this call only, in this thread only. ``on_header(width, height, bands, bits)`` is called once
    the header passed every check and before any pixel is decoded (the pipeline's memory budget
    admits the image there; it may block).
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    if expected_format == DICOM:
        return _decode_dicom(data, max_pixels, on_header)
    with _pixel_limit(max_pixels):
        im = _open(data, expected_format, max_pixels)
        try:
            return _decode(im, data, expected_format, max_pixels, on_header)
        finally:
            im.close()


def _decode(im: Image.Image, data: bytes, expected_format: str, max_pixels: int,
            on_header: Callable[[int, int, int, int], None] | None = None) -> Decoded:
    actual = "JPEG" if im.format == "MPO" else im.format  # multi-picture JPEG from some cameras
    w, h = im.size
    if w < 1 or h < 1:
        raise ImageError(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise _too_large((w, h), max_pixels)
    try:
        frames = getattr(im, "n_frames", 1)
    except Exception as exc:  # noqa: BLE001 - untrusted bytes
        raise ImageError(f"corrupt image: {_reason(exc)}") from None
    if frames > 1:
        raise ImageError(f"{frames} frames (animated or multi-page); only single images are supported")
    if actual == "PNG":
        depth, colour = _png_bit_depth(data)
        if depth == 16 and colour in (2, 6):
            raise ImageError("16-bit colour PNG: Pillow can only read it at 8 bits; convert it to 8-bit first")
        if depth == 16 and colour == 4:
            raise ImageError("16-bit grayscale+alpha PNG: Pillow can only read it as 8-bit RGBA; "
                             "convert it to 8 bits first")
    if actual == "TIFF" and im.mode in ("RGB", "RGBA", "LA"):
        bits = getattr(im, "tag_v2", {}).get(258) or 8  # BitsPerSample: one value or one per sample
        depth = max(bits) if isinstance(bits, tuple) else int(bits)
        if depth > 8:
            raise ImageError(f"{depth}-bit {im.mode} TIFF: Pillow can only read it at 8 bits; "
                             "convert it to 8-bit first")
    if on_header is not None:
        bands = len(im.getbands())  # values per pixel once decoded: palettes expand to RGB(A)
        if im.mode in ("P", "PA"):
            bands = 4 if im.mode == "PA" or "transparency" in im.info else 3
        elif im.mode in ("1", "L", "RGB") and "transparency" in im.info:
            bands += 1
        on_header(w, h, bands, 16 if im.mode.startswith("I") else 8)
    notes: list[str] = []
    try:
        im.load()
        meta: dict[str, Any] = {}
        if actual == "JPEG":  # what an "auto" JPEG output follows (read before any transpose)
            meta["jpeg_quality"] = estimate_jpeg_quality(getattr(im, "quantization", None))
            meta["subsampling"] = _jpeg_sampling(im)
        elif actual == HEIF:
            chroma = im.info.get("chroma")
            meta["subsampling"] = {420: "4:2:0", 422: "4:2:2", 444: "4:4:4"}.get(chroma)
            if im.info.get("original_orientation") not in (1, None):  # libheif rotated it on decode
                notes.append("EXIF orientation applied")
        exif = _exif(im, actual)
        if exif.get(_ORIENTATION, 1) not in (1, None):
            im = ImageOps.exif_transpose(im)
            exif = im.getexif()
            notes.append("EXIF orientation applied")

        if im.info.get("icc_profile"):
            meta["icc_profile"] = im.info["icc_profile"]
        if im.info.get("dpi"):
            meta["dpi"] = im.info["dpi"]
        if len(exif):
            exif[_ORIENTATION] = 1
            meta["exif"] = exif.tobytes()
        if actual == "TIFF":
            meta["compression"] = im.info.get("compression")

        mode = im.mode
        alpha = None
        if mode in ("P", "PA"):
            has_alpha = mode == "PA" or "transparency" in im.info
            im = im.convert("RGBA" if has_alpha else "RGB")
            mode = im.mode
            notes.append("palette image converted to " + mode)
        elif mode in ("1", "L", "RGB") and "transparency" in im.info:  # a transparent colour (tRNS)
            im = im.convert("RGBA" if mode == "RGB" else "LA")
            notes.append(f"transparent colour converted to an alpha channel ({mode} to {im.mode})")
            mode = im.mode
        elif mode == "1":
            im, mode = im.convert("L"), "L"
            notes.append("bilevel image converted to 8-bit grayscale")
        elif mode == "La":
            im, mode = im.convert("LA"), "LA"
        if mode in ("I;16", "I;16B", "I;16L") or (mode == "I" and actual == "PNG"):
            arr = np.asarray(im, dtype=np.uint32 if mode == "I" else None)
            pixels = arr.astype(np.uint16)[:, :, None]
        elif mode in ("L", "RGB"):  # tobytes + frombuffer: a third of asarray's cost on small images
            pixels = np.frombuffer(im.tobytes(), dtype=np.uint8).reshape(im.height, im.width, len(mode))
        elif mode in ("LA", "RGBA"):
            arr = np.asarray(im)
            pixels, alpha = arr[:, :, :-1], arr[:, :, -1].copy()
        elif mode == "CMYK":
            raise ImageError("CMYK image: convert it to RGB with a colour-managed tool first")
        else:
            raise ImageError(f"unsupported pixel mode {mode}")
    except ImageError:
        raise
    except _TooLarge as exc:
        raise _too_large(exc.size, max_pixels) from None
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any decoder failure is the file's
        raise ImageError(f"corrupt or truncated image: {_reason(exc)}") from None
    return Decoded(np.ascontiguousarray(pixels), alpha, actual, notes, meta)


#: PNG ``info`` keys that can carry EXIF (Pillow reads it from any of them).
_PNG_EXIF_KEYS = ("exif", "Raw profile type exif", "Raw profile type APP1", "XML:com.adobe.xmp", "xmp")


def _exif(im: Image.Image, fmt: str) -> Image.Exif:
    """The image's EXIF; a PNG without any chunk that could hold one skips Pillow's parse."""
    if fmt == "PNG" and not any(k in im.info for k in _PNG_EXIF_KEYS):
        return Image.Exif()
    return im.getexif()


def _decode_dicom(data: bytes, max_pixels: int, on_header: Callable[[int, int, int, int], None] | None) -> Decoded:
    from . import dicom

    try:
        pixels, levels, _, meta = dicom.decode(data, max_pixels, on_header)
    except dicom.DicomError as exc:
        raise ImageError(str(exc)) from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any failure of the parser is the file's
        raise ImageError(f"corrupt DICOM file: {_reason(exc)}") from None
    return Decoded(pixels, None, DICOM, [], meta, levels)


def output_name(rel: str, fmt: str, out_format: str) -> str:
    """Relative output path: the same name, with ``.png`` when converting."""
    if out_format == "png" and fmt != "PNG":
        return str(PurePosixPath(rel).with_suffix(".png"))
    return rel


def to_image(pixels: np.ndarray, alpha: np.ndarray | None) -> Image.Image:
    """A Pillow image from H x W x C pixels (uint8/uint16) and optional alpha."""
    if pixels.dtype == np.uint16:
        # frombytes, not fromarray(mode="I;16"): Pillow >= 11 rejects that mode for uint16 arrays.
        h, w = pixels.shape[:2]
        return Image.frombytes("I;16", (w, h), pixels[:, :, 0].astype("<u2").tobytes())
    if alpha is not None:
        return Image.fromarray(np.concatenate([pixels, alpha[:, :, None]], axis=2), mode="LA" if pixels.shape[2] == 1 else "RGBA")
    mode = "L" if pixels.shape[2] == 1 else "RGB"
    h, w = pixels.shape[:2]
    return Image.frombuffer(mode, (w, h), np.ascontiguousarray(pixels), "raw", mode, 0, 1)  # no copy


def encode_pixels(pixels: np.ndarray, decoded: Decoded, fmt: str, jpeg_quality: int | None = None) -> bytes:
    """The output file of ``decoded`` with new ``pixels`` (same shape, dtype and levels) in ``fmt``;
    ``jpeg_quality`` None follows the input (see :func:`lossy_settings`).
    A DICOM input is written as DICOM only (its header cannot go into a PNG)."""
    if decoded.format == DICOM:
        if fmt != DICOM:
            raise ImageError("a DICOM file is written as DICOM only; --format png would drop its header "
                             "(use --format keep)")
        from . import dicom

        try:
            return dicom.encode(pixels, decoded.meta["dicom"], decoded.notes)
        except dicom.DicomError as exc:
            raise ImageError(str(exc)) from None
    return encode(to_image(pixels, decoded.alpha), fmt, decoded.meta, jpeg_quality)


def encode(im: Image.Image, fmt: str, meta: dict[str, Any], jpeg_quality: int | None = None) -> bytes:
    """Encode with the settings for ``fmt`` (see module doc); returns the file bytes.
    ``jpeg_quality`` is the quality of a lossy output, None for "auto" (:func:`lossy_settings`)."""
    kwargs: dict[str, Any] = {}
    if fmt in ("PNG", "JPEG", "WEBP", "TIFF", HEIF) and meta.get("icc_profile"):
        kwargs["icc_profile"] = meta["icc_profile"]
    if fmt in ("PNG", "JPEG", "TIFF") and meta.get("dpi"):
        kwargs["dpi"] = meta["dpi"]
    if fmt in ("PNG", "JPEG", "WEBP", HEIF) and meta.get("exif"):
        kwargs["exif"] = meta["exif"]
    quality, subsampling = lossy_settings(fmt, meta, jpeg_quality)
    if fmt == "JPEG":
        if im.mode in ("LA", "RGBA"):
            raise ImageError("JPEG cannot hold an alpha channel")
        kwargs.update(quality=quality, subsampling=subsampling or "4:4:4")
    elif fmt == HEIF:
        if not heif_available():
            raise ImageError(HEIF_MISSING)
        kwargs.update(quality=quality, subsampling=subsampling)
    elif fmt == "WEBP":
        kwargs.update(lossless=True, quality=100, method=4)
    elif fmt == "TIFF":
        comp = meta.get("compression")
        kwargs["compression"] = comp if comp in _LOSSLESS_TIFF else "tiff_adobe_deflate"
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()
