"""Fidelity is measured on the file as written, and lossy outputs follow the input's own settings.

A JPEG output's recorded PSNR/SSIM/max_delta are those of the decoded file on disk against the
decoded input; "auto" quality (``jpeg_quality=None``) writes a JPEG at the quality estimated from the
input's quantisation tables and with its chroma subsampling; an explicit quality overrides (4:4:4).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from protect import ProtectOptions, inspect_run, protect_folder
from protect.fidelity import max_delta, measure
from protect.imageio import decode, estimate_jpeg_quality
from protect.work import Budget, Context, Spec, Task

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
PARAMS = {"filter_size": 3, "blur": 0.3}


def photo_folder(root: Path, **save) -> Path:
    """Two classes of 192 x 160 crops of the bundled Kodak photos, saved as JPEG with ``save``."""
    for cls, name in (("a", "kodim05.png"), ("b", "kodim09.png")):
        with Image.open(SAMPLES / "kodak" / name) as im:
            im = im.convert("RGB")
            for i, box in enumerate([(0, 0, 192, 160), (200, 240, 392, 400)]):
                (root / cls).mkdir(parents=True, exist_ok=True)
                im.crop(box).save(root / cls / f"{i}.jpg", "JPEG", **save)
    return root


def entries(out: Path) -> dict[str, dict]:
    manifest = json.loads((out.parent / (out.name + ".protect") / "manifest.json").read_text())
    return {e["path"]: e for e in manifest["files"]}


def file_fidelity(inp: Path, out: Path) -> tuple[float, float, int]:
    """PSNR, SSIM and largest change of the file on disk against the input, both decoded as inputs."""
    a = decode(inp.read_bytes(), "JPEG").pixels
    b = decode(out.read_bytes(), "JPEG").pixels
    ta, tb = (torch.from_numpy(np.ascontiguousarray(p)).permute(2, 0, 1)[None] for p in (a, b))
    ps, ss = measure(ta, tb, 255)
    return ps[0], ss[0], max_delta(ta, tb)[0]


def run(inp: Path, out: Path, keyring, **options):
    # CUDA named: labelled colour photos default to the photo default (UC under a dE floor)
    options.setdefault("method", "cuda")
    return protect_folder(inp, out, keyring, ProtectOptions(params=dict(PARAMS), progress=False, device="cpu",
                                                             **options))


def test_jpeg_fidelity_is_that_of_the_written_file(tmp_path, keyring):
    inp = photo_folder(tmp_path / "in", quality=90)
    psnrs = {}
    for q in (95, 70):
        out = tmp_path / f"q{q}"
        run(inp, out, keyring, jpeg_quality=q)
        rows = entries(out)
        for rel, e in rows.items():
            p, s, m = file_fidelity(inp / rel, out / rel)
            assert e["psnr"] == pytest.approx(p, abs=0.01)
            assert e["ssim"] == pytest.approx(s, abs=1e-4)
            assert e["max_delta"] == m
            assert e["quality"] == q and e["subsampling"] == "4:4:4"
        psnrs[q] = [rows[k]["psnr"] for k in sorted(rows)]
        info = inspect_run(out)
        assert info["max_delta_max"] == max(e["max_delta"] for e in rows.values())
        assert info["quality_min"] == info["quality_max"] == q and info["subsampling"] == ["4:4:4"]
    # the encoder's loss is in the numbers: before, both qualities reported the same (pre-encoding) PSNR
    assert any(abs(a - b) > 0.01 for a, b in zip(psnrs[95], psnrs[70]))


def test_png_output_is_measured_on_the_protected_pixels(tmp_path, keyring):
    inp = photo_folder(tmp_path / "in", quality=90)
    out = tmp_path / "png"
    run(inp, out, keyring, out_format="png", jpeg_quality=95)
    for rel, e in entries(out).items():
        a = decode((inp / rel).read_bytes(), "JPEG").pixels
        b = decode((out / e["output"]).read_bytes(), "PNG").pixels
        ta, tb = (torch.from_numpy(np.ascontiguousarray(p)).permute(2, 0, 1)[None] for p in (a, b))
        assert e["psnr"] == pytest.approx(measure(ta, tb, 255)[0][0], abs=1e-3)
        assert e["max_delta"] == max_delta(ta, tb)[0] > 0
        assert e["quality"] is None and e["subsampling"] is None


def _context(tmp_path: Path, inp: Path, keyring, quality: int | None) -> Context:
    out = tmp_path / f"out-{quality}"
    out.mkdir()
    spec = Spec("cuda", {"num_classes": 2, **PARAMS}, {}, keyring, str(inp), str(out), "keep", quality,
                1 << 27, 8, False, "cpu", "test", 1 << 30)
    return Context(spec, Budget(1 << 30))


def _tasks(inp: Path) -> list[Task]:
    return [Task(f"{c}/{i}.jpg", "JPEG", f"{c}/{i}.jpg", n, c, None) for n, c in enumerate("ab") for i in range(2)]


def test_auto_quality_follows_a_quality_75_420_input(tmp_path, keyring):
    """Through the per-file work directly (``jpeg_quality=None`` is "auto" there)."""
    inp = photo_folder(tmp_path / "in", quality=75, subsampling=2)
    ctx = _context(tmp_path, inp, keyring, None)
    try:
        results = ctx.run(_tasks(inp))
    finally:
        ctx.close()
    assert [r.kind for r in results] == ["done"] * 4
    total_in = total_out = 0
    for r in results:
        e = json.loads(r.entry.line)
        assert e["quality"] == 75 and e["subsampling"] == "4:2:0"
        path = Path(ctx.spec.out_dir) / e["output"]
        with Image.open(path) as im:
            assert abs(estimate_jpeg_quality(im.quantization) - 75) <= 1
            assert JpegImagePlugin.get_sampling(im) == 2
        total_in += (inp / e["path"]).stat().st_size
        total_out += path.stat().st_size
        assert e["psnr"] == pytest.approx(file_fidelity(inp / e["path"], path)[0], abs=0.01)
    assert total_out <= 1.3 * total_in


def test_explicit_quality_overrides_the_input(tmp_path, keyring):
    inp = photo_folder(tmp_path / "in", quality=75, subsampling=2)
    ctx = _context(tmp_path, inp, keyring, 95)
    try:
        results = ctx.run(_tasks(inp))
    finally:
        ctx.close()
    for r in results:
        e = json.loads(r.entry.line)
        assert e["quality"] == 95 and e["subsampling"] == "4:4:4"
        with Image.open(Path(ctx.spec.out_dir) / e["output"]) as im:
            assert estimate_jpeg_quality(im.quantization) == 95 and JpegImagePlugin.get_sampling(im) == 0


@pytest.mark.skipif(ProtectOptions().jpeg_quality is not None, reason="ProtectOptions.jpeg_quality does not "
                    "default to None (auto) yet")
def test_auto_is_the_pipeline_default(tmp_path, keyring):
    inp = photo_folder(tmp_path / "in", quality=75, subsampling=2)
    out = tmp_path / "out"
    run(inp, out, keyring)
    assert {(e["quality"], e["subsampling"]) for e in entries(out).values()} == {(75, "4:2:0")}


def test_old_records_without_max_delta_read_as_none(tmp_path, keyring):
    inp = photo_folder(tmp_path / "in", quality=90)
    out = tmp_path / "out"
    run(inp, out, keyring, jpeg_quality=90)
    journal = out.parent / (out.name + ".protect") / "journal.jsonl"
    lines = journal.read_text().splitlines()
    old = [lines[0]]
    for line in lines[1:]:
        item = json.loads(line)
        for k in ("max_delta", "quality", "subsampling"):
            item.pop(k)
        old.append(json.dumps(item, sort_keys=True))
    journal.write_text("\n".join(old) + "\n")
    info = inspect_run(out)
    assert info["max_delta_max"] is None and info["max_delta_missing"] == 4
    assert info["quality_min"] is None and info["subsampling"] == []
    assert info["psnr_mean"] is not None


@pytest.mark.parametrize("quality", [50, 75, 90, 95])
def test_estimator_is_exact_on_pillow_files(quality):
    im = Image.open(SAMPLES / "kodak" / "kodim05.png").convert("RGB").crop((0, 0, 64, 64))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    with Image.open(buf) as back:
        assert estimate_jpeg_quality(back.quantization) == quality


def test_delta_e_is_recorded_per_image_and_summarised(tmp_path, keyring):
    from protect.fidelity import delta_e

    inp = photo_folder(tmp_path / "in", quality=90)
    out = tmp_path / "out"
    summary = run(inp, out, keyring, jpeg_quality=80)
    rows = entries(out)
    for rel, e in rows.items():  # measured on the written JPEG against the decoded input
        a, b = (torch.from_numpy(np.ascontiguousarray(decode(p.read_bytes(), "JPEG").pixels)).permute(2, 0, 1)[None]
                for p in (inp / rel, out / rel))
        assert e["delta_e"] == pytest.approx(delta_e(a, b, 255)[0], abs=2e-3) and e["delta_e"] > 0
    values = [e["delta_e"] for e in rows.values()]
    assert summary.delta_e_mean == pytest.approx(sum(values) / len(values), abs=1e-3)
    info = inspect_run(out)
    assert info["delta_e_max"] == max(values) and info["delta_e_mean"] == pytest.approx(summary.delta_e_mean, abs=1e-3)
    # a record written before dE existed reads as None, not as 0
    journal = out.parent / (out.name + ".protect") / "journal.jsonl"
    lines = journal.read_text().splitlines()
    old = [lines[0]] + [json.dumps({k: v for k, v in json.loads(line).items() if k != "delta_e"}, sort_keys=True)
                        for line in lines[1:]]
    journal.write_text("\n".join(old) + "\n")
    (out.parent / (out.name + ".protect") / "manifest.json").unlink()
    info = inspect_run(out)
    assert info["delta_e_mean"] is None and info["delta_e_max"] is None and info["psnr_mean"] is not None
