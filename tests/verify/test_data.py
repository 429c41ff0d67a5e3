"""verify.data.load_folder: shapes, labels, hashing, subsets and the errors a user can act on."""

from __future__ import annotations

import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from perturbations.errors import InputError, ProtectError
from verify.data import TensorSet, load_folder

SAMPLES = Path(__file__).parents[2] / "samples" / "cifar10"


def _write(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path) if mode else Image.fromarray(arr).save(path)


def _copy_classes(dst: Path, classes: list[str], n: int = 3) -> Path:
    for c in classes:
        (dst / c).mkdir(parents=True)
        for f in sorted((SAMPLES / "train" / c).glob("*.png"))[:n]:
            shutil.copy(f, dst / c / f.name)
    return dst


def test_loads_the_bundled_samples() -> None:
    s = load_folder(SAMPLES / "test")
    assert isinstance(s, TensorSet)
    assert s.x.dtype == torch.uint8 and tuple(s.x.shape) == (200, 3, 32, 32)
    assert s.y.dtype == torch.int64 and s.counts() == [20] * 10
    assert s.classes == sorted(p.name for p in (SAMPLES / "test").iterdir() if p.is_dir())
    assert s.rels == sorted(s.rels) and s.rels[0] == "airplane/0000.png"
    # Pixels equal Pillow's decode, in C x H x W order, and the label is the class folder.
    k = s.rels.index("cat/0003.png")
    ref = np.array(Image.open(SAMPLES / "test" / "cat" / "0003.png").convert("RGB"))
    assert torch.equal(s.x[k].permute(1, 2, 0), torch.from_numpy(ref))
    assert s.classes[int(s.y[k])] == "cat"
    assert s.describe()["count"] == 200 and s.describe()["shape"] == [3, 32, 32]


def test_hash_is_stable_and_sensitive(tmp_path: Path) -> None:
    root = _copy_classes(tmp_path / "d", ["cat", "dog"])
    a = load_folder(root)
    assert load_folder(root).sha256 == a.sha256
    f = root / "dog" / "0001.png"
    arr = np.array(Image.open(f))
    arr[0, 0, 0] ^= 1  # one bit of one pixel
    Image.fromarray(arr).save(f)
    b = load_folder(root)
    assert b.sha256 != a.sha256
    assert int((b.x.int() - a.x.int()).abs().sum()) == 1


def test_max_per_class_keeps_first_in_sorted_order() -> None:
    s = load_folder(SAMPLES / "train", max_per_class=3)
    assert len(s) == 30 and s.counts() == [3] * 10
    assert [r for r in s.rels if r.startswith("bird/")] == ["bird/0000.png", "bird/0001.png", "bird/0002.png"]
    assert s.sha256 != load_folder(SAMPLES / "train", max_per_class=4).sha256


def test_select_classes_relabels() -> None:
    s = load_folder(SAMPLES / "test").select_classes(["ship", "cat"])
    assert s.classes == ["cat", "ship"] and len(s) == 40 and s.counts() == [20, 20]
    assert all(r.startswith(("cat/", "ship/")) for r in s.rels)
    assert all(s.classes[int(y)] == r.split("/")[0] for y, r in zip(s.y, s.rels))


def test_classes_must_match(tmp_path: Path) -> None:
    root = _copy_classes(tmp_path / "t", ["cat", "dog"])
    load_folder(root, classes=["cat", "dog"])  # equal: fine
    with pytest.raises(InputError, match=r"class folders differ: train has \['cat', 'dog', 'ship'\], test has \['cat', 'dog'\]"):
        load_folder(root, classes=["cat", "dog", "ship"], name="test", expected_name="train")


def test_empty_and_unlabelled_and_missing_folders(tmp_path: Path) -> None:
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(InputError, match="no images"):
        load_folder(tmp_path / "empty")
    flat = tmp_path / "flat"
    _write(flat / "a.png", np.zeros((8, 8, 3), np.uint8))
    _write(flat / "b.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(InputError, match="no labels"):
        load_folder(flat)
    with pytest.raises(InputError, match="not found"):
        load_folder(tmp_path / "nope")
    one = tmp_path / "one"
    _write(one / "cat" / "a.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(InputError, match="at least 2"):
        load_folder(one)


def test_mixed_sizes_name_the_odd_file(tmp_path: Path) -> None:
    root = tmp_path / "m"
    _write(root / "a" / "0.png", np.zeros((32, 32, 3), np.uint8))
    _write(root / "b" / "0.png", np.zeros((32, 32, 3), np.uint8))
    _write(root / "b" / "1.png", np.zeros((32, 40, 3), np.uint8))  # 40 wide, 32 high
    with pytest.raises(InputError, match=r"b/1\.png .*40x32 RGB.*a/0\.png.*32x32 RGB"):
        load_folder(root)


def test_channel_rules(tmp_path: Path) -> None:
    gray = tmp_path / "gray"
    _write(gray / "a" / "0.png", np.full((8, 8), 7, np.uint8), "L")
    _write(gray / "b" / "0.png", np.full((8, 8), 9, np.uint8), "L")
    g = load_folder(gray)
    assert tuple(g.x.shape) == (2, 1, 8, 8) and g.x[1].unique().tolist() == [9]

    rgba = tmp_path / "rgba"
    px = np.zeros((8, 8, 4), np.uint8)
    px[..., 0], px[..., 3] = 200, 10  # alpha is dropped, not composited
    _write(rgba / "a" / "0.png", px, "RGBA")
    _write(rgba / "b" / "0.png", px, "RGBA")
    r = load_folder(rgba)
    assert tuple(r.x.shape) == (2, 3, 8, 8) and r.x[:, 0].unique().tolist() == [200]

    mixed = tmp_path / "mixed"
    _write(mixed / "a" / "0.png", np.zeros((8, 8, 3), np.uint8))
    _write(mixed / "b" / "0.png", np.zeros((8, 8), np.uint8), "L")
    with pytest.raises(InputError, match="8x8 grayscale"):
        load_folder(mixed)


def test_undecodable_image_is_an_input_error(tmp_path: Path) -> None:
    root = _copy_classes(tmp_path / "d", ["cat", "dog"], n=1)
    (root / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ProtectError, match="broken.png"):
        load_folder(root)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_with_broken_second_chunk() -> bytes:
    """A PNG whose pixel data is split over two IDAT chunks, the second with a damaged chunk type:
    Pillow opens it and then raises SyntaxError("broken PNG file") while decoding."""
    raw = b"".join(b"\0" + bytes((3 * x + y) % 256 for x in range(8 * 3)) for y in range(8))
    z = zlib.compress(raw)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", z[: len(z) // 2]) + _chunk(b"I\0AT", z[len(z) // 2:]) + _chunk(b"IEND", b""))


MALFORMED = {
    "truncated.png": lambda good: good[: len(good) // 2],
    "random.png": lambda good: np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes(),
    "syntax.png": lambda good: _png_with_broken_second_chunk(),
    "ppm-maxval.png": lambda good: b"P6\n8 8\n99999999\n" + bytes(192),  # a PPM header under a .png name
    "ppm-short.png": lambda good: b"P6\n8 8\n255\n" + bytes(10),
    "header.tif": lambda good: b"II*\x00\x08\x00\x00\x00\xff\xff" + bytes(20),
    "depth.bmp": lambda good: b"BM" + bytes(12) + struct.pack("<IiiHH", 40, 4, 4, 1, 153) + bytes(30),
    "truncated.jpg": lambda good: b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(5),
    "empty.png": lambda good: b"",
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_files_are_one_line_input_errors(tmp_path: Path, name: str) -> None:
    """Whatever Pillow raises for a damaged file (OSError, SyntaxError, ValueError, ...) becomes an
    InputError of one line that names the file."""
    root = _copy_classes(tmp_path / "d", ["cat", "dog"], n=1)
    good = (root / "cat" / "0000.png").read_bytes()
    (root / "dog" / name).write_bytes(MALFORMED[name](good))
    with pytest.raises(InputError, match=rf"cannot decode image dog/{re.escape(name)}: \S") as info:
        load_folder(root)
    assert "\n" not in str(info.value) and "0x" not in str(info.value)  # no "<_io.BytesIO object at 0x...>"


def test_syntax_error_from_pillow_is_caught(tmp_path: Path) -> None:
    """The PNG above really makes Pillow raise SyntaxError (else the test above would prove nothing)."""
    import io

    img = Image.open(io.BytesIO(_png_with_broken_second_chunk()))
    with pytest.raises(SyntaxError):
        img.load()


@pytest.mark.parametrize("error", [struct.error("unpack requires a buffer of 4 bytes"), EOFError(),
                                   Image.DecompressionBombError("Image size (1 pixels) exceeds limit"),
                                   IndexError("list index out of range"), MemoryError()])
def test_any_pillow_error_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error) -> None:
    root = _copy_classes(tmp_path / "d", ["cat", "dog"], n=1)

    def explode(*args, **kwargs):
        raise error

    monkeypatch.setattr(Image.Image, "load", explode)
    with pytest.raises(InputError, match=r"cannot decode image (cat|dog)/0000\.png: \S") as info:
        load_folder(root, workers=1)
    assert "\n" not in str(info.value)


# -- DICOM: read through protect.imageio.decode, like the protect pipeline -------------------
def _dicom(name: str) -> bytes:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)  # never a pattern: get_testdata_files hangs offline
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    return Path(path).read_bytes()


def _twelve_bit() -> bytes:
    """MR_small with 12 stored bits (values folded into 0..4095)."""
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(_dicom("MR_small.dcm")))
    ds.PixelData = (ds.pixel_array.astype(np.int64) % 4096).astype("<u2").tobytes()
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
    for tag in ("SmallestImagePixelValue", "LargestImagePixelValue"):
        if tag in ds:
            del ds[tag]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _dicom_folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_dicom_folder_loads_stored_values_scaled_by_levels(tmp_path: Path) -> None:
    from protect.imageio import decode

    mr, twelve = _dicom("MR_small.dcm"), _twelve_bit()
    root = _dicom_folder(tmp_path / "d", {"a/mr.dcm": mr, "a/mr_be.dcm": _dicom("MR_small_bigendian.dcm"),
                                          "b/mr_rle.dcm": _dicom("MR_small_RLE.dcm"), "b/mr12.dcm": twelve})
    s = load_folder(root)
    assert s.x.dtype == torch.uint8 and tuple(s.x.shape) == (4, 1, 64, 64)
    assert s.rels == ["a/mr.dcm", "a/mr_be.dcm", "b/mr12.dcm", "b/mr_rle.dcm"] and s.y.tolist() == [0, 0, 1, 1]
    for data, k in ((mr, 0), (twelve, 2)):
        d = decode(data, "DICOM")
        assert d.levels == (65535 if k == 0 else 4095)
        expected = np.rint(d.pixels[:, :, 0].astype(np.float64) * 255 / d.levels).astype(np.uint8)
        assert np.array_equal(s.x[k, 0].numpy(), expected)
    assert torch.equal(s.x[0], s.x[1]) and torch.equal(s.x[0], s.x[3])  # one image, three encodings


def test_sixteen_bit_png_and_dicom_scale_alike(tmp_path: Path) -> None:
    """A 16-bit PNG holding a DICOM's stored values loads to the same 8-bit tensor."""
    from protect.imageio import decode

    mr = _dicom("MR_small.dcm")
    px = decode(mr, "DICOM").pixels[:, :, 0]
    root = tmp_path / "d"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(px).save(root / "a" / "mr.png")  # uint16 -> 16-bit grey PNG
    (root / "b" / "mr.dcm").write_bytes(mr)
    s = load_folder(root)
    assert torch.equal(s.x[0], s.x[1])


def test_dicom_of_another_size_is_refused_like_any_image(tmp_path: Path) -> None:
    root = _dicom_folder(tmp_path / "d", {"a/mr.dcm": _dicom("MR_small.dcm"), "b/ct.dcm": _dicom("CT_small.dcm")})
    with pytest.raises(InputError, match=r"b/ct\.dcm in d is 128x128 grayscale, but a/mr\.dcm is 64x64 grayscale"):
        load_folder(root)


def test_dicom_errors_are_one_line(tmp_path: Path) -> None:
    root = _dicom_folder(tmp_path / "d", {"a/mr.dcm": _dicom("MR_small.dcm"), "b/j2k.dcm": _dicom("JPEG2000.dcm")})
    with pytest.raises(InputError, match=r"cannot decode image b/j2k\.dcm: .*JPEG 2000") as info:
        load_folder(root)
    assert "\n" not in str(info.value)
    (root / "b" / "j2k.dcm").write_bytes(b"not a dicom file at all" * 10)
    with pytest.raises(InputError, match=r"cannot decode image b/j2k\.dcm: .*not a DICOM file"):
        load_folder(root)
    (root / "b" / "j2k.dcm").unlink()
    (root / "b" / "mr.png").write_bytes(_dicom("MR_small.dcm"))
    with pytest.raises(InputError, match=r"b/mr\.png: the content is DICOM; rename the file to \.dcm"):
        load_folder(root)
