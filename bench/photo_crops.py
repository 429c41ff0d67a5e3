"""What a photographer sees: protect the Kodak photos as one flat, unlabelled folder with the
Quickstart's command (no --method: the label-free default, offline) and write before/after crops.

    python bench/photo_crops.py [--out docs/img] [--name photo-before-after] [--work /dev/shm/protect-photos] [-- EXTRA OPTIONS]

``docs/img/photo-before-after.png`` is the default (UC under the photo floor --max-delta-e 2);
``docs/img/photo-before-after-off.png`` is ``--name photo-before-after-off -- --max-delta-e off``
(UC's whole 16/255 change, its colour blotches).

Writes ``photo-before-after.png`` (for each of two photos: a 1:1 crop of the original, the same crop
protected, their difference amplified 8x around grey, and both whole photos as 256-px thumbnails)
and prints, per photo and as means, PSNR and SSIM of the written files and the low-frequency colour
difference: the mean CIELAB dE76 between original and protected after a Gaussian blur of sigma =
shorter side / 256 (what the eye sees as colour blotches; about 2.3 is a just-noticeable difference).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import CLI, ROOT, env_for, stage_kodak  # noqa: E402


def low_frequency_delta_e(a: np.ndarray, b: np.ndarray) -> float:
    """Mean CIELAB dE76 between two HxWx3 uint8 photos after a Gaussian blur of sigma = short side / 256."""
    import kornia

    x = torch.from_numpy(np.stack([a, b])).permute(0, 3, 1, 2).float() / 255
    sigma = min(a.shape[:2]) / 256
    size = int(2 * round(3 * sigma) + 1)
    x = kornia.filters.gaussian_blur2d(x, (size, size), (sigma, sigma), border_type="reflect")
    lab = kornia.color.rgb_to_lab(x)
    return float((lab[0] - lab[1]).pow(2).sum(0).sqrt().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    ap.add_argument("--work", type=Path, default=Path("/dev/shm/protect-photos"))
    ap.add_argument("--name", default="photo-before-after", help="file name of the sheet, without .png")
    ap.add_argument("--photos", default="kodim05,kodim15", help="two photos of the set, shown in the sheet")
    ap.add_argument("extra", nargs="*", help="more `protect images` options (after --)")
    args = ap.parse_args()

    photos = stage_kodak(args.work)
    out = args.work / "photos-protected"
    env = env_for(args.work)
    cmd = [*CLI, "images", "--json", "--quiet", *args.extra, str(photos), str(out)]
    print("$", " ".join(cmd), flush=True)
    summary = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
    print(f"method {summary['method']} ({summary.get('method_note', '')}); mean PSNR {summary['psnr_mean']} dB, "
          f"mean SSIM {summary['ssim_mean']}")

    rows, des = [], []
    for f in sorted(photos.glob("*.png")):
        a = np.asarray(Image.open(f).convert("RGB"))
        b = np.asarray(Image.open(out / f.name).convert("RGB"))
        de = low_frequency_delta_e(a, b)
        des.append(de)
        diff = np.abs(a.astype(int) - b.astype(int))
        print(f"{f.stem}: low-frequency dE {de:.2f}, largest change {diff.max()} levels")
        if f.stem in args.photos.split(","):
            rows.append((f.stem, a, b, de))
    print(f"mean low-frequency dE over {len(des)} photos: {np.mean(des):.2f} (min {min(des):.2f}, max {max(des):.2f})")

    crop, thumb, gap = 256, 256, 8
    sheet = Image.new("RGB", (3 * crop + thumb * 2 + 5 * gap, len(rows) * (crop + 24 + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (name, a, b, de) in enumerate(rows):
        h, w = a.shape[:2]
        y0, x0 = (h - crop) // 2, (w - crop) // 2
        ca, cb = a[y0:y0 + crop, x0:x0 + crop], b[y0:y0 + crop, x0:x0 + crop]
        amp = np.clip(128 + 8 * (cb.astype(int) - ca.astype(int)), 0, 255).astype(np.uint8)
        top = gap + i * (crop + 24 + gap)
        tiles = [Image.fromarray(ca), Image.fromarray(cb), Image.fromarray(amp),
                 ImageOps.contain(Image.fromarray(a), (thumb, thumb)), ImageOps.contain(Image.fromarray(b), (thumb, thumb))]
        labels = [f"{name} original (1:1)", "protected (1:1)", "difference x8", "original", f"protected (dE {de:.1f})"]
        x = gap
        for tile, label in zip(tiles, labels):
            draw.text((x, top), label, fill="black")
            sheet.paste(tile, (x, top + 16))
            x += tile.width + gap
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}.png"
    sheet.save(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
