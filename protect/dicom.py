"""DICOM (``.dcm``) files through the pipeline, with pydicom: stored values in, stored values out.

Accepted: single-frame images with one sample (MONOCHROME1/2) or three (RGB, either planar
configuration), Bits Allocated 8 or 16, any Bits Stored up to that (High Bit = Bits Stored - 1),
unsigned or signed, in Implicit/Explicit VR Little Endian, Explicit VR Big Endian or RLE Lossless.
Refused with a one-line reason: multi-frame files, YBR/palette/other photometric interpretations,
float pixel data, Bits Allocated 1 or 32, deflated and lossy or lossless-compressed transfer
syntaxes other than RLE (JPEG, JPEG-LS, JPEG 2000...: no lossless re-encoder here; decompress them
first), files without file meta information.

Values: the method works on the *stored* values on their own integer grid, ``levels =
2**BitsStored - 1`` (4095 for 12-bit CT). Signed data (Pixel Representation 1) is shifted to
unsigned by adding ``2**(BitsStored-1)`` for the computation and shifted back when written. The
Rescale Slope/Intercept (modality LUT) is *not* applied to the perturbed values: it is recorded in
``Decoded.meta["rescale"]`` only. So the perturbation bound of a method is relative to the stored
range (``eps`` of 4095 levels for 12-bit data), and the modality LUT is left untouched, which keeps
the output's rescale (Hounsfield units = slope x stored + intercept) valid and unchanged.

Writing: the output is the input file with only the pixel bytes replaced. For uncompressed syntaxes
the new values are spliced in place (same length, dtype, signedness, byte order, Bits Allocated and
Stored, planar configuration; unused high bits kept as they were, sign extension kept where the input
had it); for RLE Lossless the single frame is re-encoded with pydicom's own RLE encoder and replaces
the old fragment(s) inside the encapsulated Pixel Data (undefined length, Basic Offset Table kept),
then decoded again and checked. Every other data element, the file meta information, the preamble
and the SOP Instance UID stay byte-identical. Smallest/Largest Image Pixel Value, window settings and
Pixel Padding Value are kept as they were (a note says when the new values leave the recorded range).
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FORMAT = "DICOM"

_PIXEL_DATA = 0x7FE00010
_FLOAT_PIXEL_DATA = (0x7FE00008, 0x7FE00009)
_EXTENDED_OFFSETS = 0x7FE00001
_PIXEL_GROUP_LENGTH = 0x7FE00000
_ITEM = b"\xfe\xff\x00\xe0"
_DELIMITER = b"\xfe\xff\xdd\xe0"
_UNDEFINED = 0xFFFFFFFF
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"
_RLE = "1.2.840.10008.1.2.5"
_NATIVE = (_IMPLICIT_LE, _EXPLICIT_LE, _EXPLICIT_BE)
_PHOTOMETRIC = {(1, "MONOCHROME1"), (1, "MONOCHROME2"), (3, "RGB")}


class DicomError(Exception):
    """A DICOM file that cannot be protected; the message is the one-line reason."""


@dataclass
class Layout:
    """Where the pixel values sit in the file and how they are stored (kept in ``Decoded.meta``).

    ``prefix``/``suffix``: the file's bytes before and after the pixel values (RLE: before and
    after the frame's fragment items). ``high``: unused bits above Bits Stored, kept as they were
    (None when all zero or when the values are sign-extended); ``original``/``digest``: RLE only,
    the input's fragment items and a digest of its decoded values (unchanged values are written back
    as the original bytes).
    """

    prefix: bytes
    suffix: bytes
    syntax: str
    rows: int
    columns: int
    samples: int
    planar: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str
    sign_extend: bool
    high: np.ndarray | None = None
    original: bytes | None = None
    digest: bytes | None = None
    value_range: tuple[int, int] | None = None

    @property
    def levels(self) -> int:
        return (1 << self.bits_stored) - 1

    @property
    def offset(self) -> int:
        """Added to signed stored values for the computation (``2**(BitsStored-1)``), else 0."""
        return 1 << (self.bits_stored - 1) if self.signed else 0

    @property
    def alloc_dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.bits_allocated == 8 else np.uint16)

    @property
    def pixel_dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.bits_stored <= 8 else np.uint16)


def _syntax_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name and name != uid else uid


def _quiet_pydicom() -> None:
    """pydicom logs *and* warns about every odd value (common in real files, harmless here); the
    pipeline reports what matters per file, so its logger is raised to ERROR unless the user set it."""
    logger = logging.getLogger("pydicom")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.ERROR)


def _read(data: bytes) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    _quiet_pydicom()
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError:
        raise DicomError("not a DICOM file (no 'DICM' file meta header); files without one are not "
                         "supported") from None
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any parser failure is the file's
        raise DicomError(f"cannot read DICOM file: {exc.__class__.__name__}: {exc}".strip()) from None


def _int(ds: Any, name: str, default: int | None = None) -> int:
    try:
        value = ds.get(name, default)
        if value is None or value == "":
            raise DicomError(f"DICOM file has no {name}; it is not an image")
        return int(value)
    except DicomError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed value
        raise DicomError(f"DICOM {name} is unreadable: {exc}") from None


def _check_image(ds: Any) -> tuple[int, int, int, str, int, int, bool, int]:
    """The image attributes, or a :class:`DicomError` naming what is not supported."""
    frames = _int(ds, "NumberOfFrames") if ds.get("NumberOfFrames") not in (None, "") else 1
    if frames > 1:
        raise DicomError(f"{frames} frames (multi-frame DICOM); only single-frame images are supported")
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    samples = _int(ds, "SamplesPerPixel", 1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if (samples, photometric) not in _PHOTOMETRIC:
        what = "palette colour" if photometric == "PALETTE COLOR" else f"'{photometric or 'none'}'"
        raise DicomError(f"photometric interpretation {what} with {samples} sample(s) per pixel: only "
                         "MONOCHROME1/2 (1 sample) and RGB (3 samples) are supported; convert it first")
    allocated, stored = _int(ds, "BitsAllocated"), _int(ds, "BitsStored")
    if allocated not in (8, 16):
        raise DicomError(f"Bits Allocated {allocated}: only 8 and 16 are supported")
    high_bit = _int(ds, "HighBit", stored - 1)
    if not 1 <= stored <= allocated or high_bit != stored - 1:
        raise DicomError(f"Bits Stored {stored} with High Bit {high_bit} in {allocated} bits: only "
                         "High Bit = Bits Stored - 1 is supported")
    representation = _int(ds, "PixelRepresentation", 0)
    if representation not in (0, 1):
        raise DicomError(f"Pixel Representation {representation} is not 0 (unsigned) or 1 (signed)")
    planar = _int(ds, "PlanarConfiguration", 0) if samples > 1 else 0
    if planar not in (0, 1):
        raise DicomError(f"Planar Configuration {planar} is not 0 or 1")
    return rows, columns, samples, photometric, allocated, stored, representation == 1, planar


def _rle_items(data: bytes, start: int) -> tuple[int, int]:
    """End of the Basic Offset Table item and start of the sequence delimiter of encapsulated
    pixel data whose value starts at ``start``."""
    pos, end = start, len(data)
    first = True
    bot_end = start
    while pos + 8 <= end:
        tag, length = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if tag == _DELIMITER:
            if first:
                break
            return bot_end, pos
        if tag != _ITEM or length == _UNDEFINED or pos + 8 + length > end:
            break
        pos += 8 + length
        if first:
            bot_end, first = pos, False
    raise DicomError("encapsulated pixel data is malformed or truncated")


def _range(ds: Any, offset: int) -> tuple[int, int] | None:
    try:
        lo, hi = ds.get("SmallestImagePixelValue"), ds.get("LargestImagePixelValue")
        if lo is None or hi is None:
            return None
        return int(lo) + offset, int(hi) + offset
    except Exception:  # noqa: BLE001 - an unreadable optional element is simply not used
        return None


def header(path: str | Path) -> tuple[int, int, int]:
    """``(width, height, samples per pixel)`` of a DICOM file from its header (no pixel is read)."""
    import pydicom

    _quiet_pydicom()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["Rows", "Columns", "SamplesPerPixel"])
    return int(ds.Columns), int(ds.Rows), int(ds.get("SamplesPerPixel", 1) or 1)


def decode(data: bytes, max_pixels: int, on_header: Callable[[int, int, int, int], None] | None = None
           ) -> tuple[np.ndarray, int, Layout, dict[str, Any]]:
    """Pixels H x W x C (uint8 when Bits Stored <= 8, else uint16, signed data shifted to unsigned),
    their ``levels``, the :class:`Layout` for :func:`encode` and metadata (rescale, photometric).

    ``on_header(width, height, samples, bits)`` is called before any pixel is read. Raises
    :class:`DicomError` with the reason (``max_pixels`` exceeded: a message starting with the size).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's per-element chatter; real failures raise
        return _decode(data, max_pixels, on_header)


def _decode(data: bytes, max_pixels: int, on_header: Callable[[int, int, int, int], None] | None
            ) -> tuple[np.ndarray, int, Layout, dict[str, Any]]:
    ds = _read(data)
    syntax = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "") or "")
    if not syntax:
        raise DicomError("DICOM file meta information has no Transfer Syntax UID")
    element = ds.get_item(_PIXEL_DATA)
    if element is None:
        if any(ds.get_item(t) is not None for t in _FLOAT_PIXEL_DATA):
            raise DicomError("float pixel data (Float/Double Float Pixel Data) is not supported")
        raise DicomError("DICOM file has no pixel data (not an image)")
    rows, columns, samples, photometric, allocated, stored, signed, planar = _check_image(ds)
    if syntax == _DEFLATED:
        raise DicomError("transfer syntax Deflated Explicit VR Little Endian is not supported; "
                         "inflate the file first (e.g. `dcmconv +te`)")
    if syntax not in _NATIVE and syntax != _RLE:
        raise DicomError(f"compressed transfer syntax '{_syntax_name(syntax)}' cannot be re-encoded "
                         "losslessly; decompress the file first (e.g. `gdcmconv --raw`)")
    if rows < 1 or columns < 1:
        raise DicomError(f"image has no pixels ({columns}x{rows})")
    if rows * columns > max_pixels:
        raise DicomError(f"{columns}x{rows} = {rows * columns} pixels is above the limit of {max_pixels} "
                         "(decompression-bomb guard); raise it with --max-pixels if you trust the file")
    if on_header is not None:
        on_header(columns, rows, samples, 16 if stored > 8 else 8)

    start = getattr(element, "value_tell", None)
    length = getattr(element, "length", None)
    if start is None or length is None:
        raise DicomError("cannot locate the pixel data in the file")
    count = rows * columns * samples
    alloc = np.dtype(np.uint8 if allocated == 8 else np.uint16)
    original = digest = None
    if syntax in _NATIVE:
        if length == _UNDEFINED:
            raise DicomError("encapsulated pixel data in an uncompressed transfer syntax")
        need = count * alloc.itemsize
        if length < need or start + need > len(data):
            raise DicomError(f"pixel data is truncated ({min(length, len(data) - start)} of {need} bytes)")
        order = ">" if syntax == _EXPLICIT_BE else "<"
        raw = np.frombuffer(data, alloc.newbyteorder(order), count, offset=start).astype(alloc)
        if planar == 1:
            raw = raw.reshape(samples, rows, columns).transpose(1, 2, 0)
        raw = raw.reshape(rows, columns, samples)
        prefix, suffix = data[:start], data[start + need:]
    else:
        if ds.get_item(_EXTENDED_OFFSETS) is not None or ds.get_item(_PIXEL_GROUP_LENGTH) is not None:
            raise DicomError("RLE pixel data with an Extended Offset Table or a group length cannot be "
                             "re-encoded without changing them; decompress the file first")
        if length != _UNDEFINED:
            raise DicomError("RLE pixel data is not encapsulated (defined length)")
        bot_end, delimiter = _rle_items(data, start)
        try:
            from pydicom.pixels import get_decoder

            arr, _ = get_decoder(_RLE).as_array(ds, raw=True)
        except Exception as exc:  # noqa: BLE001 - untrusted bytes
            raise DicomError(f"cannot decode RLE pixel data: {exc}") from None
        # the words as stored, whatever dtype the decoder chose (two's complement within the allocation)
        raw = (arr.astype(np.int64) & ((1 << allocated) - 1)).astype(alloc).reshape(rows, columns, samples)
        prefix, suffix = data[:bot_end], data[delimiter:]
        original = data[bot_end:delimiter]
        digest = hashlib.blake2b(raw.tobytes(), digest_size=16).digest()

    mask = (1 << stored) - 1
    field = raw & alloc.type(mask)
    high_bits = raw & alloc.type(~mask & ((1 << allocated) - 1))
    sign_extend = False
    if signed and stored < allocated:
        negative = (field >> (stored - 1)) & 1
        sign_extend = bool(np.array_equal(high_bits, np.where(negative == 1, alloc.type(~mask & ((1 << allocated) - 1)),
                                                                alloc.type(0))))
    elif signed:
        sign_extend = True
    high = None if sign_extend or not high_bits.any() else high_bits
    if signed:
        field ^= alloc.type(1 << (stored - 1))  # (v + 2**(b-1)) mod 2**b: shift to unsigned
    pixel_dtype = np.uint8 if stored <= 8 else np.uint16
    pixels = np.ascontiguousarray(field.astype(pixel_dtype))

    layout = Layout(prefix, suffix, syntax, rows, columns, samples, planar, allocated, stored, signed, photometric,
                    sign_extend, high, original, digest)
    layout.value_range = _range(ds, layout.offset)
    meta: dict[str, Any] = {"dicom": layout, "photometric": photometric, "transfer_syntax": syntax}
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None or intercept is not None:
        try:
            meta["rescale"] = (float(slope if slope is not None else 1), float(intercept or 0))
        except (TypeError, ValueError):
            pass
    return pixels, layout.levels, layout, meta


def _stored_bits(pixels: np.ndarray, layout: Layout) -> np.ndarray:
    """H x W x C values on the unsigned grid back to the allocated words of the file."""
    alloc = layout.alloc_dtype
    if pixels.shape != (layout.rows, layout.columns, layout.samples):
        raise DicomError(f"pixels of shape {pixels.shape} do not match the {layout.columns}x{layout.rows}x"
                         f"{layout.samples} image")
    if int(pixels.max(initial=0)) > layout.levels:
        raise DicomError(f"pixel values above {layout.levels} do not fit {layout.bits_stored} stored bits")
    field = pixels.astype(alloc)
    if layout.signed:
        field ^= alloc.type(1 << (layout.bits_stored - 1))  # shift back to two's complement
    if layout.sign_extend and layout.bits_stored < layout.bits_allocated:
        upper = alloc.type(~layout.levels & ((1 << layout.bits_allocated) - 1))
        field = np.where((field >> (layout.bits_stored - 1)) & 1 == 1, field | upper, field).astype(alloc)
    elif layout.high is not None:
        field |= layout.high
    return field


def encode(pixels: np.ndarray, layout: Layout, notes: list[str] | None = None) -> bytes:
    """The input file with its pixel values replaced by ``pixels`` (see module doc); appends a note
    to ``notes`` when values leave the recorded Smallest/Largest Image Pixel Value range."""
    raw = _stored_bits(pixels, layout)
    if layout.value_range is not None and notes is not None and raw.size:
        lo, hi = layout.value_range
        if int(pixels.min()) < lo or int(pixels.max()) > hi:
            notes.append("DICOM: protected values leave the Smallest/Largest Image Pixel Value range "
                         "(those elements are kept unchanged)")
    if layout.syntax in _NATIVE:
        words = raw.transpose(2, 0, 1) if layout.planar == 1 else raw
        order = ">" if layout.syntax == _EXPLICIT_BE else "<"
        body = np.ascontiguousarray(words).astype(layout.alloc_dtype.newbyteorder(order)).tobytes()
        return layout.prefix + body + layout.suffix
    # RLE Lossless
    if hashlib.blake2b(raw.tobytes(), digest_size=16).digest() == layout.digest and layout.original is not None:
        return layout.prefix + layout.original + layout.suffix  # unchanged values: the original bytes
    try:
        from pydicom.pixels import get_encoder

        src = raw.view(np.int8 if layout.bits_allocated == 8 else np.int16) if layout.signed else raw
        if layout.samples == 1:
            src = src[:, :, 0]
        frame = get_encoder(_RLE).encode(
            np.ascontiguousarray(src), rows=layout.rows, columns=layout.columns, samples_per_pixel=layout.samples,
            bits_allocated=layout.bits_allocated, bits_stored=layout.bits_allocated,  # every allocated bit
            pixel_representation=int(layout.signed), photometric_interpretation=layout.photometric,
            number_of_frames=1, planar_configuration=0)
    except Exception as exc:  # noqa: BLE001 - the encoder's own checks
        raise DicomError(f"cannot re-encode RLE Lossless pixel data: {exc}") from None
    if len(frame) % 2:
        frame += b"\x00"
    out = layout.prefix + _ITEM + len(frame).to_bytes(4, "little") + frame + layout.suffix
    check, _, _, _ = decode(out, layout.rows * layout.columns)
    if not np.array_equal(check, pixels):
        raise DicomError("RLE re-encoding did not reproduce the pixel values; file not written")
    return out
