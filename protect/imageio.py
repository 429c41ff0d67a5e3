"""Decode and encode image files with Pillow, keeping what a user expects to keep.

Decoding: EXIF orientation is applied; grayscale stays one channel; alpha is split off (it is
never perturbed and is written back untouched); palette and bilevel images become RGB(A)/L;
16-bit grayscale PNG/TIFF keeps 16 bits. Refused with a reason: CMYK and other exotic modes,
16-bit colour PNG (Pillow reads it at 8 bits only), multi-frame files, a content type that does not
match the extension, images above the pixel limit (decompression-bomb guard).

Encoding: lossless formats stay as they are (PNG, lossless WebP, BMP, TIFF with lossless
compression); JPEG is written at high quality without chroma subsampling (a JPEG re-encode
weakens the protection: the pipeline warns); ``out_format="png"`` converts everything to PNG.
The ICC profile, DPI and EXIF (orientation reset) are kept where the format allows.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's hard decompression-bomb limit (2x its warning limit)
JPEG_QUALITY = 95
OUT_FORMATS = ("keep", "png")
_EXT = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}
_LOSSLESS_TIFF = {"raw", "tiff_lzw", "tiff_adobe_deflate", "tiff_deflate", "packbits", None}
_ORIENTATION = 0x0112

TMP_MARK = ".protect-tmp-"


class ImageError(Exception):
    """An image that cannot be protected; the message is the reason shown to the user."""


@dataclass
class Decoded:
    """Pixels split from metadata: ``pixels`` H x W x C (C 1 or 3), uint8 or uint16."""

    pixels: np.ndarray
    alpha: np.ndarray | None
    format: str
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def bits(self) -> int:
        return 16 if self.pixels.dtype == np.uint16 else 8

    @property
    def key(self) -> tuple[int, int, int, int]:
        """Batching key: channels, height, width, bits."""
        h, w, c = self.pixels.shape
        return c, h, w, self.bits


def _png_bit_depth(data: bytes) -> tuple[int, int]:
    """(bit depth, colour type) from a PNG header, or (0, 0)."""
    if len(data) > 26 and data[12:16] == b"IHDR":
        return data[24], data[25]
    return 0, 0


def decode(data: bytes, expected_format: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode one file's bytes. Raises :class:`ImageError` with a user-facing reason."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("not a readable image (corrupt or unknown format)") from None
    except Image.DecompressionBombError:
        raise ImageError("image too large for Pillow's decompression-bomb guard") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"cannot read image: {exc}") from None
    actual = im.format or "unknown"
    if actual == "MPO":  # multi-picture JPEG from some cameras: the first frame is a JPEG
        actual = "JPEG"
    if actual != expected_format:
        raise ImageError(f"content is {actual} but the extension says {expected_format}; rename the file")
    w, h = im.size
    if w * h > max_pixels:
        raise ImageError(f"{w}x{h} = {w * h} pixels is above the limit of {max_pixels} "
                         "(decompression-bomb guard); raise it with --max-pixels if you trust the file")
    if getattr(im, "n_frames", 1) > 1:
        raise ImageError(f"{im.n_frames} frames (animated or multi-page); only single images are supported")
    if actual == "PNG":
        depth, colour = _png_bit_depth(data)
        if depth == 16 and colour in (2, 6):
            raise ImageError("16-bit colour PNG: Pillow can only read it at 8 bits; convert it to 8-bit first")
    notes: list[str] = []
    try:
        im.load()
        exif = im.getexif()
        if exif.get(_ORIENTATION, 1) not in (1, None):
            im = ImageOps.exif_transpose(im)
            exif = im.getexif()
            notes.append("EXIF orientation applied")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"corrupt or truncated image: {exc}") from None

    meta: dict[str, Any] = {}
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
    if mode == "1":
        im, mode = im.convert("L"), "L"
        notes.append("bilevel image converted to 8-bit grayscale")
    elif mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
        mode = im.mode
        notes.append("palette image converted to " + mode)
    elif mode == "LA" or mode == "La":
        im = im.convert("LA")
    if mode in ("I;16", "I;16B", "I;16L") or (mode == "I" and actual == "PNG"):
        arr = np.asarray(im, dtype=np.uint32 if mode == "I" else None)
        pixels = arr.astype(np.uint16)[:, :, None]
    elif mode in ("L", "RGB"):
        pixels = np.asarray(im)
        pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    elif mode in ("LA", "La", "RGBA"):
        arr = np.asarray(im)
        pixels, alpha = arr[:, :, :-1], arr[:, :, -1].copy()
    elif mode == "CMYK":
        raise ImageError("CMYK image: convert it to RGB with a colour-managed tool first")
    else:
        raise ImageError(f"unsupported pixel mode {mode}")
    return Decoded(np.ascontiguousarray(pixels), alpha, actual, notes, meta)


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
    return Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels, mode="L" if pixels.shape[2] == 1 else "RGB")


def encode(im: Image.Image, fmt: str, meta: dict[str, Any], jpeg_quality: int = JPEG_QUALITY) -> bytes:
    """Encode with the settings for ``fmt`` (see module doc); returns the file bytes."""
    kwargs: dict[str, Any] = {}
    if fmt in ("PNG", "JPEG", "WEBP", "TIFF") and meta.get("icc_profile"):
        kwargs["icc_profile"] = meta["icc_profile"]
    if fmt in ("PNG", "JPEG", "TIFF") and meta.get("dpi"):
        kwargs["dpi"] = meta["dpi"]
    if fmt in ("PNG", "JPEG", "WEBP") and meta.get("exif"):
        kwargs["exif"] = meta["exif"]
    if fmt == "JPEG":
        if im.mode in ("LA", "RGBA"):
            raise ImageError("JPEG cannot hold an alpha channel")
        kwargs.update(quality=jpeg_quality, subsampling=0)
    elif fmt == "WEBP":
        kwargs.update(lossless=True, quality=100, method=4)
    elif fmt == "TIFF":
        comp = meta.get("compression")
        kwargs["compression"] = comp if comp in _LOSSLESS_TIFF else "tiff_adobe_deflate"
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that no reader ever sees a partial file.

    The bytes go to a hidden temporary file in the same folder (named per process and thread, so
    concurrent writers never share one), then ``os.replace`` renames it into place.
    """
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{threading.get_ident()}")
    try:
        fh = open(tmp, "wb")
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(tmp, "wb")
    try:
        with fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def remove_stale_temporaries(root: Path) -> int:
    """Delete temporary files an interrupted run left under ``root``; returns how many."""
    count = 0
    if root.is_dir():
        for tmp in root.rglob(f".*{TMP_MARK}*"):
            if tmp.is_file():
                tmp.unlink()
                count += 1
    return count
