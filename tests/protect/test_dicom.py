"""DICOM in and out: stored values at their depth, nothing but the pixel values changed, refusals.

pydicom's bundled test files are used offline (``get_testdata_file(name, download=False)``); other
cases are derived from them by editing a few attributes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRBigEndian, RLELossless

from protect import ProtectOptions, protect_folder
from protect.discover import discover
from protect.fitpass import load_resized
from protect.imageio import ImageError, decode, encode_pixels

PIXEL_DATA = 0x7FE00010


def sample(name: str) -> bytes:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    return Path(path).read_bytes()


def read(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def elements(ds: pydicom.Dataset) -> dict:
    """{tag: (VR, value)} of every element but Pixel Data, file meta included."""
    out = {("meta", e.tag): (e.VR, e.value) for e in ds.file_meta}
    out.update({e.tag: (e.VR, e.value) for e in ds if e.tag != PIXEL_DATA})
    return out


def assert_only_pixels_differ(before: bytes, after: bytes) -> None:
    a, b = read(before), read(after)
    assert a.preamble == b.preamble
    assert elements(a) == elements(b)
    assert a.SOPInstanceUID == b.SOPInstanceUID
    assert a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID


def to_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def twelve_bit(signed: bool, junk_high_bits: bool = False) -> bytes:
    """MR_small with 12 stored bits in 16 allocated (signed: sign-extended words)."""
    ds = read(sample("MR_small.dcm"))
    values = ds.pixel_array.astype(np.int32) % 4096 - (2048 if signed else 0)
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, int(signed)
    for name in ("SmallestImagePixelValue", "LargestImagePixelValue"):
        if name in ds:
            del ds[name]
    words = values.astype(np.int16).view(np.uint16) if signed else values.astype(np.uint16)
    if junk_high_bits:
        words = words | np.uint16(0xA000)
    ds.PixelData = words.astype("<u2").tobytes()
    return to_bytes(ds)


def bumped(pixels: np.ndarray, levels: int) -> np.ndarray:
    """A deterministic change of every value, kept on the grid, hitting both ends of it."""
    out = (pixels.astype(np.int64) * 7 + 3) % (levels + 1)
    flat = out.reshape(-1)
    flat[0], flat[-1] = 0, levels
    return out.astype(pixels.dtype)


NATIVE = ["CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "SC_rgb_small_odd.dcm"]
RLE = ["MR_small_RLE.dcm", "SC_rgb_rle.dcm"]


# -- decode / encode ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", NATIVE + RLE)
def test_unchanged_pixels_write_the_same_file(name):
    data = sample(name)
    d = decode(data, "DICOM")
    out = encode_pixels(d.pixels, d, "DICOM")
    assert out == data
    assert_only_pixels_differ(data, out)


@pytest.mark.parametrize("name", NATIVE + RLE)
def test_new_pixels_change_only_pixel_data(name):
    data = sample(name)
    d = decode(data, "DICOM")
    new = bumped(d.pixels, d.levels)
    out = encode_pixels(new, d, "DICOM")
    assert out != data
    assert_only_pixels_differ(data, out)
    assert np.array_equal(decode(out, "DICOM").pixels, new)
    # an independent reader sees the stored values shifted back
    ds = read(out)
    expected = new.astype(np.int64) - (1 << (ds.BitsStored - 1) if ds.PixelRepresentation else 0)
    assert np.array_equal(ds.pixel_array.reshape(new.shape).astype(np.int64), expected)


def test_signed_ct_stays_signed_and_within_range():
    data = sample("CT_small.dcm")
    d = decode(data, "DICOM")
    assert d.levels == 65535 and d.pixels.dtype == np.uint16
    assert d.meta["rescale"] == (1.0, -1024.0)  # recorded, never applied to the perturbed values
    original = read(data).pixel_array
    assert np.array_equal(d.pixels[:, :, 0].astype(np.int64) - 32768, original)
    out = read(encode_pixels(bumped(d.pixels, d.levels), d, "DICOM"))
    assert out.PixelRepresentation == 1 and out.RescaleIntercept == -1024
    arr = out.pixel_array
    assert arr.dtype == np.int16 and arr.min() == -32768 and arr.max() == 32767


def test_big_endian_stays_big_endian():
    data = sample("MR_small_bigendian.dcm")
    d = decode(data, "DICOM")
    out = encode_pixels(bumped(d.pixels, d.levels), d, "DICOM")
    assert len(out) == len(data)
    assert read(out).file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    little = decode(sample("MR_small.dcm"), "DICOM")
    assert np.array_equal(d.pixels, little.pixels)  # the same image read from either byte order


def test_rle_is_re_encoded_as_rle_with_the_same_instance_uid():
    data = sample("MR_small_RLE.dcm")
    d = decode(data, "DICOM")
    new = bumped(d.pixels, d.levels)
    out = encode_pixels(new, d, "DICOM")
    ds = read(out)
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    assert ds.SOPInstanceUID == read(data).SOPInstanceUID
    assert np.array_equal(ds.pixel_array.astype(np.int64), new[:, :, 0].astype(np.int64) - 32768)


@pytest.mark.parametrize("signed", [False, True])
def test_twelve_bit_levels_and_representation(signed):
    data = twelve_bit(signed)
    d = decode(data, "DICOM")
    assert d.levels == 4095 and d.pixels.max() <= 4095
    assert d.depth == 12 and d.key == (1, 64, 64, 12) and decode(sample("MR_small.dcm"), "DICOM").key == (1, 64, 64, 16)
    assert encode_pixels(d.pixels, d, "DICOM") == data
    new = bumped(d.pixels, d.levels)
    out = encode_pixels(new, d, "DICOM")
    assert_only_pixels_differ(data, out)
    words = np.frombuffer(out, "<u2", 64 * 64, offset=read(out).get_item(PIXEL_DATA).value_tell)
    if signed:  # sign-extended like the input: negative values fill the unused bits with ones
        assert np.array_equal(words.view(np.int16), new.reshape(-1).astype(np.int16) - 2048)
    else:
        assert int(words.max()) <= 4095


def test_unused_high_bits_are_kept():
    data = twelve_bit(False, junk_high_bits=True)
    d = decode(data, "DICOM")
    assert d.levels == 4095 and d.pixels.max() <= 4095
    out = encode_pixels(bumped(d.pixels, d.levels), d, "DICOM")
    words = np.frombuffer(out, "<u2", 64 * 64, offset=read(out).get_item(PIXEL_DATA).value_tell)
    assert np.all(words & 0xF000 == 0xA000)


def test_planar_rgb_keeps_its_planar_configuration():
    ds = read(sample("SC_rgb_small_odd.dcm"))
    interleaved = ds.pixel_array
    ds.PlanarConfiguration = 1
    ds.PixelData = np.ascontiguousarray(interleaved.transpose(2, 0, 1)).tobytes() + b"\x00"
    data = to_bytes(ds)
    d = decode(data, "DICOM")
    assert np.array_equal(d.pixels, interleaved)
    new = bumped(d.pixels, 255)
    out = read(encode_pixels(new, d, "DICOM"))
    assert out.PlanarConfiguration == 1 and np.array_equal(out.pixel_array, new)


def test_values_above_the_stored_range_are_refused():
    d = decode(twelve_bit(False), "DICOM")
    with pytest.raises(ImageError, match="above 4095"):
        encode_pixels(np.full_like(d.pixels, 4096), d, "DICOM")


def test_png_output_is_refused_for_dicom():
    d = decode(sample("MR_small.dcm"), "DICOM")
    with pytest.raises(ImageError, match="written as DICOM only"):
        encode_pixels(d.pixels, d, "PNG")


# -- refusals ----------------------------------------------------------------------------------
def edited(name: str, **changes) -> bytes:
    ds = read(sample(name))
    for key, value in changes.items():
        if value is None:
            del ds[key]
        else:
            setattr(ds, key, value)
    return to_bytes(ds)


def float_pixels() -> bytes:
    ds = read(sample("MR_small.dcm"))
    del ds.PixelData
    ds.FloatPixelData = np.zeros(64 * 64, "<f4").tobytes()
    return to_bytes(ds)


@pytest.mark.parametrize("make, reason", [
    (lambda: sample("JPEG2000.dcm"), "compressed transfer syntax 'JPEG 2000 Image Compression'"),
    (lambda: sample("examples_palette.dcm"), "palette colour"),
    (lambda: sample("examples_ybr_color.dcm"), "30 frames"),
    (lambda: edited("SC_rgb_small_odd.dcm", PhotometricInterpretation="YBR_FULL"), "'YBR_FULL'"),
    (lambda: sample("image_dfl.dcm"), "Deflated"),
    (lambda: edited("MR_small.dcm", BitsAllocated=32, BitsStored=32, HighBit=31), "Bits Allocated 32"),
    (lambda: float_pixels(), "float pixel data"),
    (lambda: sample("MR_truncated.dcm"), "truncated"),
    (lambda: b"not a dicom file at all" * 10, "not a DICOM file"),
])
def test_refusals_are_one_line(make, reason):
    with pytest.raises(ImageError, match=reason) as info:
        decode(make(), "DICOM")
    assert "\n" not in str(info.value)


def test_dicom_named_png_is_told_to_rename():
    with pytest.raises(ImageError, match="content is DICOM"):
        decode(sample("MR_small.dcm"), "PNG")


def test_pixel_limit_applies_before_pixels_are_read():
    with pytest.raises(ImageError, match="above the limit of 100"):
        decode(sample("MR_small.dcm"), "DICOM", max_pixels=100)


# -- the pipeline ------------------------------------------------------------------------------
@pytest.fixture
def dicom_folder(tmp_path):
    root = tmp_path / "in"
    files = {"a/ct.dcm": sample("CT_small.dcm"), "a/mr.dcm": sample("MR_small.dcm"),
             "a/mr12.dcm": twelve_bit(True), "b/mr_be.dcm": sample("MR_small_bigendian.dcm"),
             "b/mr_rle.dcm": sample("MR_small_RLE.dcm"), "b/rgb.dcm": sample("SC_rgb_rle.dcm"),
             "b/j2k.dcm": sample("JPEG2000.dcm")}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_discovery_finds_dicom(dicom_folder):
    ds = discover(dicom_folder)
    assert ds.classes == ["a", "b"] and {e.format for e in ds.entries} == {"DICOM"}


def test_protect_a_dicom_folder(tmp_path, dicom_folder, keyring, one_thread):
    out = tmp_path / "out"
    s = protect_folder(dicom_folder, out, keyring, ProtectOptions(method="cuda", progress=False, workers=1))
    assert s.failed == 1 and s.failures[0][0] == "b/j2k.dcm" and "JPEG 2000" in s.failures[0][1]
    assert s.done == 6 and not (out / "b/j2k.dcm").exists()
    for rel in ("a/ct.dcm", "a/mr.dcm", "a/mr12.dcm", "b/mr_be.dcm", "b/mr_rle.dcm", "b/rgb.dcm"):
        before, after = (dicom_folder / rel).read_bytes(), (out / rel).read_bytes()
        assert before != after, rel
        assert_only_pixels_differ(before, after)
    # the 12-bit image was protected on its own grid (a 16-bit batch would overflow 12 bits)
    assert decode((out / "a/mr12.dcm").read_bytes(), "DICOM").pixels.max() <= 4095


def test_protect_dicom_to_png_fails_per_file(tmp_path, dicom_folder, keyring, one_thread):
    for p in dicom_folder.rglob("*.dcm"):
        if p.name not in ("ct.dcm", "mr_be.dcm"):
            p.unlink()
    s = protect_folder(dicom_folder, tmp_path / "out", keyring,
                       ProtectOptions(method="cuda", out_format="png", progress=False, workers=1))
    assert s.failed == 2 and all("written as DICOM only" in r for _, r in s.failures)


def test_fit_pass_scales_by_levels(tmp_path):
    path = tmp_path / "mr12.dcm"
    path.write_bytes(twelve_bit(False))
    d = decode(path.read_bytes(), "DICOM")
    t = load_resized(path, "DICOM", 1 << 20, (64, 64), 1)
    assert t is not None
    assert torch.allclose(t[0], torch.from_numpy(d.pixels[:, :, 0].astype(np.float32) / 4095))


def test_images_of_another_depth_never_share_a_batch(tmp_path, keyring, one_thread):
    root = tmp_path / "in"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    sixteen, twelve = sample("MR_small.dcm"), twelve_bit(False)  # both 64 x 64 x 1
    for i in range(8):  # 18 files on one worker: chunks of 3, each mixing the two depths
        (root / f"a/{i}_16.dcm").write_bytes(sixteen)
        (root / f"a/{i}_12.dcm").write_bytes(twelve)
    (root / "b/x_16.dcm").write_bytes(sixteen)
    (root / "b/x_12.dcm").write_bytes(twelve)
    mixed = protect_folder(root, tmp_path / "mixed", keyring, ProtectOptions(progress=False, workers=1))
    alone = protect_folder(root, tmp_path / "alone", keyring, ProtectOptions(progress=False, workers=1, batch_size=1))
    assert mixed.failed == alone.failed == 0
    for p in sorted((tmp_path / "alone").rglob("*.dcm")):
        rel = p.relative_to(tmp_path / "alone")
        assert (tmp_path / "mixed" / rel).read_bytes() == p.read_bytes(), rel


def test_fit_pass_reads_dicom_sizes_from_headers(dicom_folder):
    from protect.fitpass import fit_data

    data = fit_data(discover(dicom_folder), 1 << 20, threads=1)
    assert sorted(set(data.sizes)) == [(64, 64), (100, 100), (128, 128), (1024, 256)]
