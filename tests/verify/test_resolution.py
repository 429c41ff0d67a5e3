"""The attacker's resolution: folders of mixed sizes and orientations load at R x R as an
attacker's pipeline brings them there, and verify certifies them at that size."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from perturbations.errors import ConfigError, InputError
from verify.data import load_folder, resize_crop
from verify.recipes import get_recipe
from verify.run import verify_folder

KODAK = Path(__file__).resolve().parents[2] / "samples" / "kodak"


def mixed_folder(root: Path, per_class: int = 4) -> Path:
    """Two classes of crops of the bundled Kodak photos in mixed sizes, orientations and formats: a
    landscape PNG, a portrait JPEG, a JPEG stored sideways with an EXIF rotation, a grey PNG."""
    photos = sorted(KODAK.glob("*.png"))
    for c, cls in enumerate(("a", "b")):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            im = Image.open(photos[(2 * i + c) % len(photos)]).convert("RGB")
            im = im.crop((5 * i, 3 * i, im.width, im.height))  # every image its own pixels
            kind = i % 4
            if kind == 0:
                im.crop((0, 0, 300 + 17 * i, 200)).save(root / cls / f"{i}.png")
            elif kind == 1:
                im.crop((0, 0, 180, 260 + 9 * i)).save(root / cls / f"{i}.jpg", quality=92)
            elif kind == 2:  # stored landscape, shown portrait
                exif = Image.Exif()
                exif[0x0112] = 6
                im.crop((0, 0, 320, 240)).save(root / cls / f"{i}.jpg", quality=92, exif=exif.tobytes())
            else:
                im.crop((10, 10, 250, 410)).convert("L").save(root / cls / f"{i}.png")
    return root


def test_resize_crop_is_torchvisions_resize_and_centre_crop() -> None:
    rng = np.random.default_rng(0)
    for h, w in ((200, 300), (301, 123), (64, 64), (40, 90)):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = T.Compose([T.Resize(32), T.CenterCrop(32)])(Image.fromarray(a))
        assert np.array_equal(resize_crop(a, 32), np.asarray(ref)), (h, w)


def test_mixed_sizes_load_at_one_resolution_and_are_refused_without(tmp_path: Path) -> None:
    root = mixed_folder(tmp_path / "photos")
    with pytest.raises(InputError) as exc:
        load_folder(root)
    assert "--resolution 64" in str(exc.value) and "\n" not in str(exc.value)
    s32, s48 = load_folder(root, resolution=32), load_folder(root, resolution=48)
    assert tuple(s32.x.shape) == (8, 3, 32, 32) and tuple(s48.x.shape) == (8, 3, 48, 48)  # grey joins as colour
    assert s32.sha256 != s48.sha256 != load_folder(root, resolution=48, max_per_class=3).sha256
    # the EXIF-rotated JPEG is upright (portrait) before the crop: compare with an upright decode
    upright = np.asarray(Image.open(root / "a" / "2.jpg").transpose(Image.Transpose.ROTATE_270).convert("RGB"))
    got = s48.x[s48.rels.index("a/2.jpg")].permute(1, 2, 0).numpy().astype(int)
    assert np.abs(got - resize_crop(upright, 48).astype(int)).mean() < 4  # the JPEG is decoded at a DCT scale


def test_verify_at_a_resolution_records_it_in_every_attacker(tmp_path: Path) -> None:
    root = mixed_folder(tmp_path / "photos", per_class=8)
    with pytest.raises(ConfigError):
        verify_folder(root, None, root, holdout=0.25, resolution="tiny")
    cert = verify_folder(root, None, root, holdout=0.25, resolution=32, tier=get_recipe("quick", epochs=1, batch_size=4),
                         trainings="erm", defenses="none", seeds=1, device="cpu", report_dir=False, cache_dir=False,
                         progress=False)
    assert cert["resolution"]["size"] == 32 and "centre crop" in cert["resolution"]["rule"]
    assert all(c["attacker"]["resolution"] == "32" for c in cert["cells"])
    assert cert["data"]["train"]["shape"] == [3, 32, 32] and cert["data"]["holdout"]["test_images"] == 4


def test_the_validation_split_is_the_same_at_every_resolution(tmp_path: Path) -> None:
    from verify.uncertainty import split_validation

    root = mixed_folder(tmp_path / "photos", per_class=8)
    s32, s48 = load_folder(root, resolution=32), load_folder(root, resolution=48)
    assert s32.sha256 != s48.sha256 and s32.content_id == s48.content_id
    assert split_validation(s32)[0].rels == split_validation(s48)[0].rels
    native = load_folder(KODAK.parent / "cifar10" / "test")  # a native load: its content is its hash
    assert native.content_id == native.sha256 and native.source_sha256 == ""
