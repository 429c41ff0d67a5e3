"""Builders of odd image files for the discovery, decoding and corpus tests (all made at test time).

Every builder returns bytes. The decompression bombs declare a huge size in a tiny file; the
hand-made PNG/TIFF files are the ones Pillow cannot write (16-bit colour).
"""

from __future__ import annotations

import io
import os
import random
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_raw(pixels: np.ndarray, depth: int, colour: int) -> bytes:
    """A PNG of H x W x C ``pixels`` written by hand (any bit depth and colour type)."""
    h, w = pixels.shape[:2]
    arr = pixels.astype(">u2" if depth == 16 else np.uint8).reshape(h, w * (pixels.shape[2] if pixels.ndim == 3 else 1))
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")


def png16(colour: int, width: int = 8, height: int = 8, seed: int = 0) -> bytes:
    """16-bit PNG: colour type 0 (gray), 2 (RGB), 4 (gray+alpha) or 6 (RGBA)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    arr = np.random.default_rng(seed).integers(0, 65536, (height, width, channels))
    return png_raw(arr, 16, colour)


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` RGB with one compressed empty row."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + idat + png_chunk(b"IEND", b"")


def bmp_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A 24-bit BMP header declaring a huge size, followed by 64 bytes of pixels."""
    pixels = b"\x00" * 64
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    head = b"BM" + struct.pack("<IHHI", 14 + len(info) + len(pixels), 0, 0, 14 + len(info))
    return head + info + pixels


def _sof_offset(data: bytes) -> int:
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            return i
        i += 2 + length
    raise ValueError("no SOF marker")


def jpeg_bomb(height: int = 60_000, width: int = 60_000) -> bytes:
    """A small real JPEG whose SOF marker declares ``width`` x ``height``."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 200)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    i = _sof_offset(bytes(data))
    data[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_bomb(width: int = 16_383, height: int = 16_383) -> bytes:
    """A lossless WebP (VP8L) header declaring ``width`` x ``height`` (the most WebP allows)."""
    bits = (width - 1) | ((height - 1) << 14)  # 14 bits each, then alpha hint and version 0
    vp8l = b"\x2f" + struct.pack("<I", bits) + b"\x00" * 16
    body = b"WEBP" + b"VP8L" + struct.pack("<I", len(vp8l)) + vp8l
    return b"RIFF" + struct.pack("<I", len(body)) + body


def tiff(pixels: np.ndarray, bits: int, photometric: int) -> bytes:
    """An uncompressed little-endian TIFF of H x W x C ``pixels`` with ``bits`` per sample."""
    h, w = pixels.shape[:2]
    spp = 1 if pixels.ndim == 2 else pixels.shape[2]
    data = pixels.astype("<u2" if bits == 16 else np.uint8).tobytes()
    n_tags, ifd_off = 9, 8
    bps_off = ifd_off + 2 + n_tags * 12 + 4
    data_off = bps_off + 2 * spp
    tags = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, spp, bps_off if spp > 2 else bits), (259, 3, 1, 1),
            (262, 3, 1, photometric), (273, 4, 1, data_off), (277, 3, 1, spp), (278, 4, 1, h),
            (279, 4, 1, len(data))]
    out = b"II*\x00" + struct.pack("<IH", ifd_off, n_tags)
    for tag, kind, count, value in tags:
        if kind == 3 and count <= 2 and not (tag == 258 and spp > 2):
            out += struct.pack("<HHIHH", tag, kind, count, value, value if count == 2 else 0)
        else:
            out += struct.pack("<HHII", tag, kind, count, value)
    return out + struct.pack("<I", 0) + struct.pack(f"<{spp}H", *([bits] * spp)) + data


def tiff_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """An 8-bit grayscale TIFF declaring ``width`` x ``height`` with 64 bytes of strip data."""
    data = tiff(np.zeros((8, 8), np.uint8), 8, 1)
    out = bytearray(data)
    # the first two IFD entries are ImageWidth and ImageLength (LONG): patch their values
    struct.pack_into("<I", out, 8 + 2 + 8, width)
    struct.pack_into("<I", out, 8 + 2 + 12 + 8, height)
    return bytes(out)


# -- the odd-file corpus -----------------------------------------------------------------------
EXT_OF = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}
FORMAT_OF = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
             ".tiff": "TIFF"}
#: Pixel modes the tool protects (palette and bilevel are converted); anything else is refused.
SUPPORTED_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "I;16", "I;16B", "I;16L"}
LIMIT = 178_956_970  # the default --max-pixels


def oracle_writes(data: bytes, fmt: str) -> bool:
    """Should the tool protect this file? Decided with plain Pillow, from the product rules
    (single frame, supported mode, the extension's format, full decode), not with protect's code."""
    import warnings

    from PIL import ImageOps

    if not data:
        return False
    try:
        with warnings.catch_warnings():  # the test's own thread only
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                actual = "JPEG" if im.format == "MPO" else im.format
                if actual != fmt or getattr(im, "n_frames", 1) != 1 or im.mode not in SUPPORTED_MODES:
                    return False
                if not 0 < im.width * im.height <= LIMIT:
                    return False
                if fmt == "PNG" and data[12:16] == b"IHDR" and data[24] == 16 and data[25] in (2, 4, 6):
                    return False  # Pillow reads 16-bit colour (and gray+alpha) at 8 bits only
                if fmt == "TIFF" and im.mode in ("RGB", "RGBA", "LA"):
                    bits = im.tag_v2.get(258) or (8,)
                    if max(bits if isinstance(bits, tuple) else (bits,)) > 8:
                        return False
                im.load()
                im.getexif()
                ImageOps.exif_transpose(im).convert("RGBA" if im.mode != "I;16" else "I;16")
    except Exception:  # noqa: BLE001 - whatever Pillow raises, the file cannot be protected
        return False
    return True


def _image(rng: np.random.Generator, mode: str, size: tuple[int, int]) -> Image.Image:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 7) % 256], -1)
    rgb = np.clip(base + rng.integers(-40, 41, (h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(rgb)
    alpha = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
    if mode == "I;16":
        return Image.fromarray((rgb[:, :, 0].astype(np.uint16) * 257 + rng.integers(0, 257, (h, w))).astype(np.uint16))
    if mode == "LA":
        return Image.merge("LA", [im.convert("L"), alpha])
    if mode == "RGBA":
        return Image.merge("RGBA", [*im.split(), alpha])
    if mode == "PA":
        return im.convert("P").convert("PA")
    return im.convert(mode)


def _save(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


#: (format, mode, save options) of the valid files: every mode each format can hold.
VALID_KINDS = [
    ("PNG", "1", {}), ("PNG", "L", {}), ("PNG", "LA", {}), ("PNG", "P", {}), ("PNG", "RGB", {}),
    ("PNG", "RGBA", {}), ("PNG", "I;16", {}), ("PNG", "P", {"transparency": 0}), ("PNG", "L", {"transparency": 7}),
    ("TIFF", "1", {}), ("TIFF", "L", {}), ("TIFF", "LA", {}), ("TIFF", "P", {}), ("TIFF", "PA", {}),
    ("TIFF", "RGB", {}), ("TIFF", "RGBA", {}), ("TIFF", "I;16", {}), ("TIFF", "RGB", {"compression": "tiff_lzw"}),
    ("TIFF", "RGB", {"compression": "tiff_adobe_deflate"}), ("TIFF", "L", {"compression": "packbits"}),
    ("BMP", "1", {}), ("BMP", "L", {}), ("BMP", "P", {}), ("BMP", "RGB", {}),
    ("JPEG", "L", {"quality": 90}), ("JPEG", "RGB", {"quality": 90}), ("JPEG", "RGB", {"progressive": True}),
    ("WEBP", "RGB", {"lossless": True}), ("WEBP", "RGBA", {"lossless": True}), ("WEBP", "RGB", {"quality": 80}),
]
SIZES = [(16, 16), (24, 16), (9, 17), (32, 32)]


@dataclass
class Corpus:
    """What was put under the input folder: ``valid`` {rel: format} must be written;
    ``malformed`` {rel: reason fragment ('' when any reason will do)} must fail;
    ``skipped`` {rel as reported: reason fragment} must be skipped by discovery."""

    valid: dict[str, str] = field(default_factory=dict)
    malformed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    categories: dict[str, int] = field(default_factory=dict)


def build_corpus(root: Path, outside: Path, seed: int = 0) -> Corpus:
    """Write a seeded corpus of valid and odd files into two class folders ``root/a``, ``root/b``.

    Files made by mutation (truncation, bit flips, overwritten bytes) are classified with
    :func:`oracle_writes`; constructed ones carry the reason fragment they must fail with.
    """
    rnd = random.Random(seed)
    rng = np.random.default_rng(seed)
    corpus = Corpus()
    counter = iter(range(1_000_000))

    def put(category: str, data: bytes, ext: str, expect: str | None, name: str | None = None) -> str:
        """Write into a random class folder; ``expect`` None: ask the oracle; else a reason fragment."""
        rel = f"{rnd.choice('ab')}/{name or f'{category}-{next(counter):03d}'}{ext}"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        fmt = FORMAT_OF[ext.lower()]
        written = oracle_writes(data, fmt) if expect is None else False
        if written:
            corpus.valid[rel] = fmt
        else:
            corpus.malformed[rel] = expect or ""
        key = f"{category} ({'written' if written else 'failed'})"
        corpus.categories[key] = corpus.categories.get(key, 0) + 1
        return rel

    # valid files of every mode each format holds (checked by the oracle too)
    sources: list[tuple[str, bytes]] = []
    for fmt, mode, kwargs in VALID_KINDS:
        data = _save(_image(rng, mode, rnd.choice(SIZES)), fmt, **kwargs)
        assert oracle_writes(data, fmt), (fmt, mode, kwargs)
        put(f"valid-{fmt.lower()}-{mode.replace(';', '')}", data, EXT_OF[fmt], None)
        sources.append((fmt, data))
    exif = Image.Exif()
    exif[0x0112] = 6
    put("valid-jpeg-exif-rotated", _save(_image(rng, "RGB", (24, 16)), "JPEG", exif=exif.tobytes()), ".jpg", None)
    for name, ext in [("été à la plage", ".png"), ("写真 1", ".JPG"), ("  spaces  ", ".Tiff"), ("ümlaut", ".jpeg")]:
        fmt = FORMAT_OF[ext.lower()]
        put("valid-odd-name", _save(_image(rng, "RGB", (16, 16)), fmt), ext, None, name=name)

    # truncations at random offsets, bit flips, overwritten runs: the oracle decides
    for fmt, data in sources:
        for _ in range(3):
            cut = rnd.randrange(1, len(data))
            put("truncated", data[:cut], EXT_OF[fmt], None)
        for _ in range(3):
            flipped = bytearray(data)
            for _ in range(rnd.randint(1, 3)):
                i = rnd.randrange(min(len(data), 8), len(data))
                flipped[i] ^= 1 << rnd.randrange(8)
            put("bit-flipped", bytes(flipped), EXT_OF[fmt], None)
    for fmt, data in sources[::3]:
        run = bytearray(data)
        i = rnd.randrange(len(run))
        run[i:i + 16] = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
        put("overwritten-run", bytes(run), EXT_OF[fmt], None)
    # flips that must fail: inside the CRC-checked IHDR of a PNG
    png = next(d for f, d in sources if f == "PNG")
    for i in range(16, 29, 3):
        flipped = bytearray(png)
        flipped[i] ^= 0x10
        put("png-ihdr-flip", bytes(flipped), ".png", "")
    # random bytes and empty files under every extension
    for ext in FORMAT_OF:
        for n in (1, 7, 100, 3000):
            put("random-bytes", rng.integers(0, 256, n, dtype=np.uint8).tobytes(), ext, "")
        put("empty", b"", ext, "empty")
        put("empty", b"", ext.upper(), "empty")
    # content that does not match the extension
    by_format = {f: d for f, d in sources}
    for fmt, data in by_format.items():
        for other in EXT_OF:
            if other != fmt:
                put("wrong-extension", data, EXT_OF[other], f"content is {fmt} but the extension says {other}")
    put("wrong-extension", _save(_image(rng, "RGB", (16, 16)), "GIF"), ".png", "content is GIF")
    put("wrong-extension", b"%PDF-1.4\n" + rng.integers(0, 256, 200, dtype=np.uint8).tobytes(), ".tif", "")
    # decompression bombs: a huge declared size in a tiny file
    for build, ext in [(png_bomb, ".png"), (bmp_bomb, ".bmp"), (jpeg_bomb, ".jpg"), (webp_bomb, ".webp"),
                       (tiff_bomb, ".tif")]:
        put("bomb", build(), ext, "above the limit")
    put("bomb", png_bomb(2**31 - 1, 2**31 - 1), ".png", "above the limit")
    put("bomb", png_bomb(1, 200_000_000), ".png", "above the limit")
    # lying headers: a size the data does not hold, no pixels at all
    put("lying-header", png_bomb(3000, 3000), ".png", "")
    put("lying-header", jpeg_bomb(2000, 2000), ".jpg", None)  # libjpeg pads the missing scan: decodable
    put("lying-header", png_raw(np.zeros((0, 5, 3)), 8, 2), ".png", "")
    put("lying-header", tiff_bomb(4000, 4000), ".tif", "")
    # refused by design
    put("cmyk", _save(_image(rng, "CMYK", (16, 16)), "JPEG"), ".jpg", "CMYK")
    put("cmyk", _save(_image(rng, "CMYK", (16, 16)), "TIFF"), ".tif", "CMYK")
    put("16-bit-colour", png16(2, seed=1), ".png", "16-bit colour PNG")
    put("16-bit-colour", png16(6, seed=2), ".png", "16-bit colour PNG")
    put("16-bit-colour", png16(4, seed=3), ".png", "16-bit grayscale+alpha PNG")
    put("16-bit-colour", tiff(rng.integers(0, 65536, (8, 8, 3)), 16, 2), ".tif", "16-bit RGB TIFF")
    frames = [_image(rng, "RGB", (16, 16)) for _ in range(3)]
    put("multi-frame", _save(frames[0], "PNG", save_all=True, append_images=frames[1:]), ".png", "3 frames")
    put("multi-frame", _save(frames[0], "TIFF", save_all=True, append_images=frames[1:]), ".tif", "3 frames")
    put("multi-frame", _save(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True), ".webp",
        "3 frames")
    assert sum(1 for v in corpus.valid.values()) >= len(VALID_KINDS)

    # entries discovery skips, with a reason (never opened)
    good = _save(_image(rng, "RGB", (16, 16)), "PNG")
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "o.png").write_bytes(good)
    (outside / "d").mkdir(exist_ok=True)
    (outside / "d" / "p.png").write_bytes(good)
    a = root / "a"
    links = {
        "a/out.png": (outside / "o.png", "leaves the input folder"),
        "a/outdir": (outside / "d", "leaves the input folder"),
        "a/self.png": (Path("self.png"), "symbolic link loop"),
        "a/dangling.jpg": (Path("nothing-here.jpg"), "broken symbolic link"),
        "a/up": (Path(".."), "loop"),
    }
    for rel, (target, why) in links.items():
        os.symlink(target, root / rel)
        corpus.skipped[rel] = why
    os.mkfifo(a / "fifo.png")  # reading it would block forever
    corpus.skipped["a/fifo.png"] = "FIFO"
    try:
        with open(os.fsencode(a) + b"/caf\xe9.png", "wb") as fh:
            fh.write(good)
        corpus.skipped["a/caf\\xe9.png"] = "not valid UTF-8"
    except OSError:
        pass  # a file system that refuses such names
    corpus.categories["skipped entries"] = len(corpus.skipped)
    # followed and written: a link inside the folder, a folder named like an image
    (root / "b").mkdir(exist_ok=True)
    (root / "b" / "target.png").write_bytes(good)
    os.symlink("target.png", root / "b" / "alias.png")
    corpus.valid["b/target.png"] = corpus.valid["b/alias.png"] = "PNG"
    (a / "x.png").mkdir()
    (a / "x.png" / "inner.png").write_bytes(good)
    corpus.valid["a/x.png/inner.png"] = "PNG"
    # ignored silently: hidden files, files that are not images
    (a / ".hidden.png").write_bytes(good)
    (a / "readme.txt").write_text("not an image\n", encoding="utf-8")
    corpus.categories["valid: link target, link inside, folder named x.png"] = 3
    return corpus
