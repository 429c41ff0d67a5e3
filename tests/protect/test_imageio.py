"""Formats and odd image kinds through the pipeline, and the decode/encode/atomic-write helpers.

Lossless outputs are checked pixel for pixel against the CUDA method applied directly to the
decoded input and quantised once with rounding.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

import perturbations
from protect import InputError, ProtectOptions, protect_folder
from protect.imageio import ImageError, decode, output_name
from tests import corpus

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
CIFAR = SAMPLES / "cifar10" / "train"
PARAMS = {"filter_size": 3, "blur": 0.3}


def cifar(cls: str, i: int = 0) -> Image.Image:
    with Image.open(CIFAR / cls / f"{i:04d}.png") as im:
        return im.convert("RGB")


def run(in_dir: Path, out_dir: Path, keyring, **options):
    # on the CPU, the reference path: outputs are compared bit for bit with a CPU computation
    return protect_folder(in_dir, out_dir, keyring,
                          ProtectOptions(params=dict(PARAMS), progress=False, device="cpu", **options))


def reference(keyring, pixels: np.ndarray, label: int, num_classes: int) -> np.ndarray:
    """CUDA applied to H x W x C pixels (uint8 or uint16), quantised once with rounding."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    peak = 65535.0 if pixels.dtype == np.uint16 else 255.0
    method = perturbations.get("cuda")(keyring, num_classes=num_classes, **PARAMS)
    x = torch.from_numpy(pixels.astype(np.int32)).permute(2, 0, 1)[None].float().div(peak)
    y = method.apply(x, torch.tensor([label]))
    q = y.mul(peak).round().clamp(0, peak)[0].permute(1, 2, 0).to(torch.int32).numpy().astype(pixels.dtype)
    return q[:, :, 0] if q.shape[2] == 1 else q


def pixels_of(path: Path, mode: str | None = None) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert(mode) if mode else im).copy()


def save(im: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kwargs)
    return path


def png16_rgb(width: int = 8, height: int = 8) -> bytes:
    """A 16-bit RGB PNG built by hand (Pillow cannot write one)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    arr = np.random.default_rng(0).integers(0, 65536, (height, width, 3)).astype(">u2")
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


# -- every format ----------------------------------------------------------------------------
FORMATS = [
    ("PNG", ".png", {}),
    ("JPEG", ".jpg", {"quality": 90}),
    ("WEBP", ".webp", {"lossless": True}),
    ("BMP", ".bmp", {}),
    ("TIFF", ".tif", {}),
]


@pytest.mark.parametrize("fmt, ext, kwargs", FORMATS, ids=[f[0] for f in FORMATS])
def test_each_format_keeps_path_name_format_and_size(tmp_path, keyring, fmt, ext, kwargs):
    inp, out = tmp_path / "in", tmp_path / "out"
    classes = ["cat", "dog"]
    for cls in classes:
        for i in range(2):
            save(cifar(cls, i), inp / cls / f"img {i}{ext}", format=fmt, **kwargs)
    summary = run(inp, out, keyring)
    assert (summary.done, summary.failed) == (4, 0)
    for label, cls in enumerate(classes):
        for i in range(2):
            src, dst = inp / cls / f"img {i}{ext}", out / cls / f"img {i}{ext}"
            with Image.open(dst) as im, Image.open(src) as orig:
                assert (im.format, im.size, im.mode) == (fmt, orig.size, "RGB")
            got, expected = pixels_of(dst), reference(keyring, pixels_of(src, "RGB"), label, 2)
            if fmt == "JPEG":  # lossy: close to the protected image, far from the input
                err = np.abs(got.astype(int) - expected).mean()
                assert err < 3 < np.abs(got.astype(int) - pixels_of(src)).mean()
            else:
                assert np.array_equal(got, expected)
    jpeg_warnings = [w for w in summary.warnings if "JPEG" in w and "weakens" in w]
    assert len(jpeg_warnings) == (1 if fmt == "JPEG" else 0)


def test_out_format_png_converts_names_and_is_lossless(tmp_path, keyring):
    inp, out = tmp_path / "in", tmp_path / "out"
    save(cifar("cat"), inp / "cat" / "a.jpg", quality=90)
    save(cifar("cat", 1), inp / "cat" / "b.webp", lossless=True)
    save(cifar("dog"), inp / "dog" / "c.BMP")
    save(cifar("dog", 1), inp / "dog" / "d.png")
    summary = run(inp, out, keyring, out_format="png")
    assert summary.done == 4
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "cat/a.png", "cat/b.png", "dog/c.png", "dog/d.png"]
    for src, label in [("cat/a.jpg", 0), ("cat/b.webp", 0), ("dog/c.BMP", 1), ("dog/d.png", 1)]:
        dst = out / output_name(src, "X", "png")
        with Image.open(dst) as im:
            assert im.format == "PNG"
        assert np.array_equal(pixels_of(dst), reference(keyring, pixels_of(inp / src, "RGB"), label, 2))
    assert not any("JPEG" in w for w in summary.warnings)


def test_out_format_png_refuses_name_collisions(tmp_path, keyring):
    inp = tmp_path / "in"
    save(cifar("cat"), inp / "cat" / "a.jpg")
    save(cifar("cat"), inp / "cat" / "a.png")
    with pytest.raises(InputError, match="both be written"):
        run(inp, tmp_path / "out", keyring, out_format="png")
    assert not (tmp_path / "out").exists()


# -- odd image kinds -------------------------------------------------------------------------
def test_grayscale_stays_single_channel(tmp_path, keyring, make_folder):
    inp = make_folder(classes=2, per_class=2, source="breastmnist/train")
    out = tmp_path / "out"
    assert run(inp, out, keyring).done == 4
    for label, cls in enumerate(sorted(p.name for p in inp.iterdir())):
        for src in (inp / cls).iterdir():
            dst = out / cls / src.name
            with Image.open(dst) as im:
                assert im.mode == "L"
            assert np.array_equal(pixels_of(dst), reference(keyring, pixels_of(src), label, 2))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_kept_byte_identical(tmp_path, keyring, mode):
    inp, out = tmp_path / "in", tmp_path / "out"
    base = cifar("cat").convert("RGB" if mode == "RGBA" else "L")
    alpha = Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 7 % 256).astype(np.uint8))
    save(Image.merge(mode, [*base.split(), alpha]), inp / "a" / "x.png")
    save(cifar("dog").convert(mode), inp / "b" / "y.png")
    assert run(inp, out, keyring).done == 2
    src, dst = pixels_of(inp / "a" / "x.png"), pixels_of(out / "a" / "x.png")
    with Image.open(out / "a" / "x.png") as im:
        assert im.mode == mode
    assert np.array_equal(dst[..., -1], src[..., -1])
    assert np.array_equal(dst[..., :-1].squeeze(-1) if mode == "LA" else dst[..., :-1],
                          reference(keyring, src[..., :-1], 0, 2))


@pytest.mark.parametrize("transparent", [False, True], ids=["P", "P+transparency"])
def test_palette_is_converted(tmp_path, keyring, transparent):
    inp, out = tmp_path / "in", tmp_path / "out"
    pal = cifar("cat").convert("P")
    save(pal, inp / "a" / "p.png", **({"transparency": 0} if transparent else {}))
    save(cifar("dog"), inp / "b" / "y.png")
    summary = run(inp, out, keyring)
    assert summary.done == 2
    want = "RGBA" if transparent else "RGB"
    with Image.open(out / "a" / "p.png") as im:
        assert (im.format, im.mode) == ("PNG", want)
    src, dst = pixels_of(inp / "a" / "p.png", want), pixels_of(out / "a" / "p.png")
    assert np.array_equal(dst[..., :3], reference(keyring, src[..., :3], 0, 2))
    if transparent:
        assert (src[..., 3] == 0).any()
        assert np.array_equal(dst[..., 3], src[..., 3])
    assert any(f"palette image converted to {want}" in w for w in summary.warnings)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_16bit_grayscale_stays_16bit_and_is_perturbed(tmp_path, keyring, ext):
    inp, out = tmp_path / "in", tmp_path / "out"
    gray = np.asarray(cifar("cat").convert("L")).astype(np.uint16) * 257
    gray16 = gray + np.arange(32, dtype=np.uint16)[None, :]  # use the low byte too
    save(Image.fromarray(gray16), inp / "a" / f"x{ext}")
    save(Image.fromarray(gray16[::-1].copy()), inp / "b" / f"y{ext}")
    summary = run(inp, out, keyring)
    assert (summary.done, summary.failed) == (2, 0), summary.failures
    with Image.open(out / "a" / f"x{ext}") as im:
        assert im.mode == "I;16"
    got = pixels_of(out / "a" / f"x{ext}")
    assert got.dtype == np.uint16 and not np.array_equal(got, gray16)
    assert np.array_equal(got, reference(keyring, gray16, 0, 2))


def test_16bit_colour_png_is_refused_with_a_reason(tmp_path, keyring, make_folder):
    inp = make_folder(classes=2, per_class=2)
    (inp / next(inp.iterdir()).name / "deep.png").write_bytes(png16_rgb())
    summary = run(inp, tmp_path / "out", keyring)
    assert (summary.done, summary.failed) == (4, 1)
    [(rel, reason)] = summary.failures
    assert rel.endswith("deep.png") and "16-bit colour PNG" in reason


def test_cmyk_jpeg_is_refused_with_a_reason(tmp_path, keyring, make_folder):
    inp = make_folder(classes=2, per_class=1)
    save(cifar("cat").convert("CMYK"), inp / "airplane" / "cmyk.jpg")
    summary = run(inp, tmp_path / "out", keyring)
    assert (summary.done, summary.failed) == (2, 1)
    assert summary.failures[0][0] == "airplane/cmyk.jpg" and "CMYK" in summary.failures[0][1]
    assert not (tmp_path / "out" / "airplane" / "cmyk.jpg").exists()


def test_exif_orientation_is_applied(tmp_path, keyring):
    inp, out = tmp_path / "in", tmp_path / "out"
    wide = cifar("cat").crop((0, 0, 32, 16))  # 32 wide, 16 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    save(wide, inp / "a" / "r.jpg", exif=exif.tobytes(), quality=95)
    save(cifar("dog"), inp / "b" / "y.png")
    summary = run(inp, out, keyring, out_format="png")
    assert summary.done == 2
    with Image.open(inp / "a" / "r.jpg") as im:
        upright = np.asarray(im.transpose(Image.Transpose.ROTATE_270).convert("RGB"))
    with Image.open(out / "a" / "r.png") as im:
        assert im.size == (16, 32)
        assert im.getexif().get(0x0112, 1) == 1
    assert np.array_equal(pixels_of(out / "a" / "r.png"), reference(keyring, upright, 0, 2))
    assert any("EXIF orientation applied" in w for w in summary.warnings)
    run(inp, tmp_path / "kept", keyring)  # as JPEG: upright pixels, orientation tag reset
    with Image.open(tmp_path / "kept" / "a" / "r.jpg") as im:
        assert im.format == "JPEG" and im.size == (16, 32) and im.getexif().get(0x0112, 1) == 1


@pytest.mark.parametrize("ext", [".png", ".jpg", ".tif"])
def test_icc_profile_is_kept(tmp_path, keyring, ext):
    inp, out = tmp_path / "in", tmp_path / "out"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    save(cifar("cat"), inp / "a" / f"x{ext}", icc_profile=icc)
    save(cifar("dog"), inp / "b" / f"y{ext}")
    assert run(inp, out, keyring).done == 2
    with Image.open(out / "a" / f"x{ext}") as im:
        assert im.info.get("icc_profile") == icc
    with Image.open(out / "b" / f"y{ext}") as im:
        assert not im.info.get("icc_profile")


def _bad_files(folder: Path) -> dict[str, str]:
    """Write one file of each broken kind into ``folder``; {name: expected reason fragment}."""
    good = (CIFAR / "cat" / "0000.png").read_bytes()
    (folder / "zero.png").write_bytes(b"")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage " * 40)
    (folder / "noise.webp").write_bytes(bytes(range(256)) * 4)
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "mislabelled.jpg").write_bytes(good)
    frames = [cifar("cat"), cifar("dog")]
    frames[0].save(folder / "animated.png", save_all=True, append_images=frames[1:])
    return {
        "zero.png": "empty",
        "corrupt.png": "not a readable image",
        "noise.webp": "not a readable image",
        "truncated.png": "truncated",
        "mislabelled.jpg": "content is PNG but the extension says JPEG",
        "animated.png": "2 frames",
    }


def test_broken_files_are_reported_by_name_and_the_rest_completes(tmp_path, keyring, make_folder):
    inp, out = make_folder(classes=2, per_class=3), tmp_path / "out"
    bad = {f"automobile/{k}": v for k, v in _bad_files(inp / "automobile").items()}
    summary = run(inp, out, keyring)
    assert (summary.total, summary.done, summary.failed) == (6 + len(bad), 6, len(bad))
    reasons = dict(summary.failures)
    assert set(reasons) == set(bad)
    for rel, fragment in bad.items():
        assert fragment in reasons[rel], (rel, reasons[rel])
        assert not (out / rel).exists()
    assert len(list(out.rglob("*.png"))) == 6
    manifest = json.loads((tmp_path / "out.protect" / "manifest.json").read_text(encoding="utf-8"))
    assert {f["path"] for f in manifest["failures"]} == set(bad)
    assert len(manifest["files"]) == 6


def test_strict_stops_at_the_first_broken_file(tmp_path, keyring, make_folder):
    inp = make_folder(classes=2, per_class=2)
    _bad_files(inp / "automobile")
    with pytest.raises(InputError, match=r"automobile/animated\.png: .*--strict"):
        run(inp, tmp_path / "out", keyring, strict=True)


def test_pixel_limit_gives_a_clear_failure(tmp_path, keyring):
    inp, out = tmp_path / "in", tmp_path / "out"
    save(cifar("cat"), inp / "a" / "big.png")
    save(cifar("dog").resize((16, 16)), inp / "b" / "small.png")
    summary = run(inp, out, keyring, max_pixels=500)
    assert (summary.done, summary.failed) == (1, 1)
    [(rel, reason)] = summary.failures
    assert rel == "a/big.png"
    assert "1024 pixels" in reason and "decompression-bomb" in reason and "--max-pixels" in reason
    assert (out / "b" / "small.png").is_file()


# -- helpers ---------------------------------------------------------------------------------
BOMBS = {  # a tiny file that declares a huge size: refused from the header, nothing decoded
    "png": (corpus.png_bomb, "PNG", "100000x100000 = 10000000000 pixels"),
    "bmp": (corpus.bmp_bomb, "BMP", "60000x60000 = 3600000000 pixels"),
    "jpeg": (corpus.jpeg_bomb, "JPEG", "60000x60000 = 3600000000 pixels"),
    "webp": (corpus.webp_bomb, "WEBP", "16383x16383 = 268402689 pixels"),  # Pillow would allocate at open
    "tiff": (corpus.tiff_bomb, "TIFF", "100000x100000 = 10000000000 pixels"),
}


@pytest.mark.parametrize("kind", sorted(BOMBS))
def test_decompression_bombs_are_refused_with_the_limit(kind):
    build, fmt, fragment = BOMBS[kind]
    data = build()
    assert len(data) < 1000
    with pytest.raises(ImageError) as info:
        decode(data, fmt)
    assert fragment in str(info.value) and "above the limit of 178956970" in str(info.value)
    assert "--max-pixels" in str(info.value)
    with pytest.raises(ImageError, match="above the limit of 1000 "):
        decode(data, fmt, max_pixels=1000)


def test_max_pixels_above_pillows_limit_is_honoured(monkeypatch):
    """Pillow refuses above 2 x Image.MAX_IMAGE_PIXELS inside Image.open, before our own check:
    "raise it with --max-pixels" must really work. (Pillow's limit is lowered here so that a
    32 x 32 image stands for a photo above its real limit of 178956970 pixels.)"""
    data = (CIFAR / "cat" / "0000.png").read_bytes()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses above 200 pixels
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    d = decode(data, "PNG", max_pixels=2000)
    assert d.pixels.shape == (32, 32, 3)
    assert decode(data, "PNG").pixels.shape == (32, 32, 3)  # the default does not follow Pillow's global
    with pytest.raises(ImageError, match=r"32x32 = 1024 pixels is above the limit of 1000 .*--max-pixels"):
        decode(data, "PNG", max_pixels=1000)
    # outside decode(), Pillow's own check is untouched
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(io.BytesIO(data)).close()


def test_pixel_limit_is_per_thread(monkeypatch):
    """decode() runs in threads: its limit must not leak into concurrent Image.open calls (a
    mutated global would), nor theirs into it."""
    from concurrent.futures import ThreadPoolExecutor

    data = (CIFAR / "cat" / "0000.png").read_bytes()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)

    def plain_open(_):
        try:
            Image.open(io.BytesIO(data)).close()
        except Image.DecompressionBombError:
            return "refused"
        return "opened"

    def decoded(i):
        limit = 2000 if i % 2 else 1000
        try:
            return decode(data, "PNG", max_pixels=limit).pixels.shape == (32, 32, 3) and limit == 2000
        except ImageError:
            return limit == 1000

    with ThreadPoolExecutor(8) as pool:
        plain = [pool.submit(plain_open, i) for i in range(200)]
        ours = [pool.submit(decoded, i) for i in range(200)]
        assert {f.result() for f in plain} == {"refused"}
        assert all(f.result() for f in ours)


def test_16bit_files_pillow_reads_at_8_bits_are_refused():
    with pytest.raises(ImageError, match="16-bit colour PNG"):
        decode(corpus.png16(2), "PNG")
    with pytest.raises(ImageError, match="16-bit colour PNG"):
        decode(corpus.png16(6), "PNG")
    with pytest.raises(ImageError, match="16-bit grayscale\\+alpha PNG"):  # Pillow makes it 8-bit RGBA
        decode(corpus.png16(4), "PNG")
    rgb16 = np.random.default_rng(0).integers(0, 65536, (4, 5, 3))
    with pytest.raises(ImageError, match="16-bit RGB TIFF"):  # Pillow keeps the high byte only
        decode(corpus.tiff(rgb16, 16, 2), "TIFF")
    gray = decode(corpus.tiff(rgb16[:, :, 0], 16, 1), "TIFF")
    assert gray.pixels.dtype == np.uint16 and np.array_equal(gray.pixels[:, :, 0], rgb16[:, :, 0])


@pytest.mark.parametrize("mode", ["L", "RGB", "1"])
def test_transparent_colour_becomes_alpha(mode):
    im = cifar("cat").convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG", transparency=im.getpixel((0, 0)))
    d = decode(buf.getvalue(), "PNG")
    assert d.alpha is not None and (d.alpha == 0).any() and (d.alpha == 255).any()
    assert d.pixels.shape[2] == (3 if mode == "RGB" else 1)
    assert any("transparent colour" in n for n in d.notes)


def test_images_without_pixels_and_content_mismatch():
    empty = corpus.png_raw(np.zeros((0, 4, 3)), 8, 2)
    with pytest.raises(ImageError):
        decode(empty, "PNG")
    png = (CIFAR / "cat" / "0000.png").read_bytes()
    with pytest.raises(ImageError, match="content is PNG but the extension says TIFF"):
        decode(png, "TIFF")
    buf = io.BytesIO()
    cifar("cat").save(buf, format="GIF")
    with pytest.raises(ImageError, match="content is GIF, which is not supported"):
        decode(buf.getvalue(), "PNG")
    with pytest.raises(ImageError, match="not a readable image"):
        decode(bytes(range(256)) * 3, "BMP")


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt TIFF tags
def test_decoder_failures_are_always_image_errors():
    """Seeded mutations (truncation, bit flips, overwritten runs) of small files in every format:
    decode() either succeeds or raises ImageError, never another exception (a TIFF with a
    flipped bit used to raise TypeError: Missing dimensions, an internal error of the CLI)."""
    import random

    base = cifar("cat").resize((24, 24))
    sources = []
    for fmt, kwargs in [("PNG", {}), ("JPEG", {"quality": 90}), ("JPEG", {"progressive": True}),
                        ("WEBP", {"lossless": True}), ("WEBP", {"quality": 80}), ("BMP", {}), ("TIFF", {}),
                        ("TIFF", {"compression": "tiff_lzw"}), ("TIFF", {"compression": "tiff_adobe_deflate"})]:
        buf = io.BytesIO()
        base.save(buf, format=fmt, **kwargs)
        sources.append((fmt, buf.getvalue()))
    rnd = random.Random(0)
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(1500):
        fmt, data = rnd.choice(sources)
        data = bytearray(data)
        op = rnd.randrange(3)
        if op == 0:
            data = data[:rnd.randrange(len(data))]
        elif op == 1:
            for _ in range(rnd.randint(1, 4)):
                data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
        else:
            i = rnd.randrange(len(data))
            data[i:i + 8] = bytes(rnd.randrange(256) for _ in range(8))
        try:
            decode(bytes(data), fmt)
            outcomes["ok"] += 1
        except ImageError as exc:
            assert str(exc)
            outcomes["refused"] += 1
    assert min(outcomes.values()) > 100


def test_decode_splits_alpha_and_keeps_16_bits():
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 5), 40000, np.uint16)).save(buf, format="PNG")
    d = decode(buf.getvalue(), "PNG")
    assert d.pixels.shape == (4, 5, 1) and d.pixels.dtype == np.uint16 and d.bits == 16
    assert int(d.pixels.max()) == 40000 and d.alpha is None
    buf = io.BytesIO()
    cifar("cat").convert("RGBA").save(buf, format="PNG")
    d = decode(buf.getvalue(), "PNG")
    assert d.pixels.shape == (32, 32, 3) and d.alpha.shape == (32, 32) and d.key == (3, 32, 32, 8)


def test_output_name():
    assert output_name("a/b c.jpg", "JPEG", "keep") == "a/b c.jpg"
    assert output_name("a/b c.JPG", "JPEG", "png") == "a/b c.png"
    assert output_name("a/x.png", "PNG", "png") == "a/x.png"


@pytest.mark.parametrize("mode, options, bands", [("P", {}, 3), ("P", {"transparency": 0}, 4), ("L", {}, 1),
                                                  ("L", {"transparency": 0}, 2), ("RGBA", {}, 4)])
def test_on_header_gives_the_decoded_size_before_decoding(mode, options, bands):
    buf = io.BytesIO()
    cifar("cat").convert(mode).save(buf, format="PNG", **options)
    seen = []
    d = decode(buf.getvalue(), "PNG", on_header=lambda *args: seen.append(args))
    assert seen == [(32, 32, bands, 8)]
    assert d.pixels.shape[2] + (d.alpha is not None) == bands
    with pytest.raises(ImageError):
        decode(corpus.png_bomb(), "PNG", on_header=lambda *args: seen.append(args))
    assert len(seen) == 1  # never called for a refused header
