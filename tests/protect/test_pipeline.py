"""The folder pipeline: refusals, the record, determinism under a key, batching, mix."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from perturbations import Keyring
from protect import ConfigError, InputError, ProtectOptions, RecordError, protect_folder
from protect.discover import IMAGE_EXTENSIONS
from protect.keys import _stretch
from tests.tiny import tree

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def run(in_dir, out_dir, keyring, **options):
    return protect_folder(in_dir, out_dir, keyring, ProtectOptions(progress=False, **options))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).copy()


# -- refusals --------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["equal", "inside", "containing"])
def test_output_must_not_overlap_the_input(tmp_path, keyring, make_folder, layout):
    if layout == "containing":
        inp = make_folder("out/in")
        out = tmp_path / "out"
    else:
        inp = make_folder()
        out = inp if layout == "equal" else inp / "protected"
    before = tree(tmp_path)
    with pytest.raises(InputError, match="must not be, contain, or lie inside"):
        run(inp, out, keyring)
    assert tree(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [("out" if layout == "containing" else "in")]


@pytest.mark.parametrize("where", ["in out", "in in", "holds out"])
def test_record_must_lie_outside_input_and_output(tmp_path, keyring, make_folder, where):
    inp = make_folder()
    out = tmp_path / "out"
    record = {"in out": out / "record", "in in": inp / "record", "holds out": tmp_path}[where]
    before = tree(tmp_path)
    with pytest.raises(InputError, match="run record must lie outside"):
        run(inp, out, keyring, record_dir=record)
    assert tree(tmp_path) == before and not out.exists()


def test_missing_input_folder(tmp_path, keyring):
    with pytest.raises(InputError, match="input folder not found"):
        run(tmp_path / "nope", tmp_path / "out", keyring)
    assert not (tmp_path / "out").exists()


def test_cuda_on_a_flat_folder_needs_classes(tmp_path, keyring):
    inp = tmp_path / "flat"
    inp.mkdir()
    for f in sorted((SAMPLES / "cifar10" / "train" / "cat").glob("*.png"))[:3]:
        shutil.copyfile(f, inp / f.name)
    with pytest.raises(InputError, match="needs classes.*--labels.*label-free"):
        run(inp, tmp_path / "out", keyring, method="cuda")  # without --method a flat folder gets uc
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat"]


def test_flat_folder_with_a_label_csv(tmp_path, keyring):
    inp = tmp_path / "flat"
    inp.mkdir()
    names = [f.name for f in sorted((SAMPLES / "cifar10" / "train" / "cat").glob("*.png"))[:4]]
    for name in names:
        shutil.copyfile(SAMPLES / "cifar10" / "train" / "cat" / name, inp / name)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{n},{'ab'[i % 2]}\n" for i, n in enumerate(names)), encoding="utf-8")
    summary = run(inp, tmp_path / "out", keyring, labels_csv=labels)
    assert summary.done == 4 and summary.class_map == {"a": 0, "b": 1}
    text = (tmp_path / "out.protect" / "manifest.json").read_text(encoding="utf-8")
    manifest = json.loads(text)
    assert manifest["label_source"] == "csv"
    # readable: one line per file entry, sorted by path
    rows = [line for line in text.splitlines() if line.lstrip().startswith("{") and '"input_sha256"' in line]
    assert [json.loads(r.strip().rstrip(","))["path"] for r in rows] == sorted(names)
    assert {f["path"]: f["label"] for f in manifest["files"]} == {n: "ab"[i % 2] for i, n in enumerate(names)}


def test_unknown_method_and_parameter(tmp_path, keyring, make_folder):
    inp = make_folder()
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        run(inp, tmp_path / "out", keyring, method="nope")
    with pytest.raises(ConfigError, match="no parameter colour"):
        run(inp, tmp_path / "out", keyring, params={"colour": 1})
    with pytest.raises(ConfigError, match="filter size"):
        run(inp, tmp_path / "out", keyring, params={"filter_size": 4})
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.protect").exists()


def test_non_empty_output_without_record_needs_overwrite(tmp_path, keyring, make_folder):
    inp, out = make_folder(), tmp_path / "out"
    out.mkdir()
    (out / "someone-elses.png").write_bytes(b"precious")
    with pytest.raises(RecordError, match="not empty.*--overwrite"):
        run(inp, out, keyring)
    assert tree(out) == {"someone-elses.png": hashlib.sha256(b"precious").hexdigest()}
    summary = run(inp, out, keyring, overwrite=True)
    assert summary.done == 8


def test_resuming_with_a_different_key_is_refused(tmp_path, keyring, make_folder):
    inp, out = make_folder(), tmp_path / "out"
    run(inp, out, keyring)
    before = tree(tmp_path)
    with pytest.raises(RecordError, match="different key"):
        run(inp, out, Keyring.from_seed(1))
    # also when the published folder was emptied but its record is still there
    shutil.rmtree(out)
    with pytest.raises(RecordError, match="different key"):
        run(inp, out, Keyring.from_seed(1))
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("out/")} == {
        k: v for k, v in before.items() if not k.startswith("out/")}


# -- what a run leaves behind ----------------------------------------------------------------
def test_input_is_never_modified(tmp_path, keyring, make_folder):
    inp = make_folder(per_class=3)
    (inp / "airplane" / "broken.png").write_bytes(b"not an image")
    (inp / "airplane" / "notes.txt").write_text("hello", encoding="utf-8")
    (inp / ".hidden").mkdir()
    (inp / ".hidden" / "x.png").write_bytes((inp / "airplane" / "0000.png").read_bytes())
    before = tree(inp)
    summary = run(inp, tmp_path / "out", keyring)
    assert (summary.done, summary.failed) == (6, 1)
    assert tree(inp) == before


def test_output_holds_only_images_and_the_record_lives_beside_it(tmp_path, keyring, make_folder, test_key):
    inp, out = make_folder(per_class=3), tmp_path / "out"
    summary = run(inp, out, keyring)
    files = tree(out)
    assert sorted(files) == sorted(tree(inp))
    assert all(Path(f).suffix.lower() in IMAGE_EXTENSIONS and not Path(f).name.startswith(".") for f in files)
    record = tmp_path / "out.protect"
    assert summary.record_dir == str(record)
    assert sorted(p.name for p in record.iterdir()) == ["journal.jsonl", "lock", "manifest.json", "state.pt"]
    manifest = json.loads((record / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["method"] == "cuda" and manifest["key_fingerprint"] == keyring.fingerprint()
    assert manifest["class_map"] == {"airplane": 0, "automobile": 1}
    inputs = tree(inp)
    for entry in manifest["files"]:
        assert entry["input_sha256"] == inputs[entry["path"]]
        assert entry["output_sha256"] == files[entry["output"]]
        assert 10 < entry["psnr"] < 100 and 0 < entry["ssim"] < 1
    assert summary.psnr_mean is not None and summary.ssim_mean is not None
    # never the key, nor its stretched material, anywhere in the record
    secrets = [test_key.encode(), _stretch(test_key), _stretch(test_key).hex().encode()]
    for f in record.iterdir():
        data = f.read_bytes()
        assert not any(s in data for s in secrets), f.name


def test_any_image_size_without_resizing(tmp_path, keyring):
    inp, out = tmp_path / "in", tmp_path / "out"
    src = Image.open(SAMPLES / "cifar10" / "train" / "cat" / "0000.png").convert("RGB")
    sizes = [(32, 32), (17, 40), (64, 23), (5, 3), (1, 1)]
    for i, size in enumerate(sizes):
        for cls in ("a", "b"):
            (inp / cls).mkdir(parents=True, exist_ok=True)
            src.resize(size).save(inp / cls / f"{i}.png")
    summary = run(inp, out, keyring, batch_size=3)
    assert (summary.done, summary.failed) == (10, 0), summary.failures
    for i, size in enumerate(sizes):
        for cls in ("a", "b"):
            with Image.open(out / cls / f"{i}.png") as im:
                assert im.size == size


def test_unicode_and_spaces_end_to_end(tmp_path, keyring):
    inp, out = tmp_path / "entrée", tmp_path / "sortie protégée"
    for cls, name in [("chat noir", "été 1.png"), ("日本", "写真 2.png")]:
        (inp / cls).mkdir(parents=True)
        shutil.copyfile(SAMPLES / "cifar10" / "train" / "cat" / "0000.png", inp / cls / name)
    assert run(inp, out, keyring).done == 2
    assert sorted(tree(out)) == ["chat noir/été 1.png", "日本/写真 2.png"]


# -- determinism -----------------------------------------------------------------------------
def test_same_key_same_bytes_other_key_other_bytes(tmp_path, keyring, make_folder):
    inp = make_folder(per_class=4)
    run(inp, tmp_path / "one", keyring)
    run(inp, tmp_path / "two", keyring)
    run(inp, tmp_path / "other", Keyring.from_seed(7))
    one, two, other = tree(tmp_path / "one"), tree(tmp_path / "two"), tree(tmp_path / "other")
    assert one == two and len(one) == 8
    assert sorted(other) == sorted(one)
    assert all(other[k] != one[k] for k in one)


@pytest.mark.parametrize("kind", ["rgb", "gray16"])
def test_batch_size_does_not_change_a_byte(tmp_path, keyring, make_folder, kind):
    if kind == "rgb":
        inp = make_folder(classes=3, per_class=4)
    else:
        inp = make_folder(classes=2, per_class=3, source="breastmnist/train")
        for f in inp.rglob("*.png"):
            arr = pixels(f).astype(np.uint16) * 257 + np.arange(28, dtype=np.uint16)
            Image.fromarray(arr).save(f)
    run(inp, tmp_path / "b1", keyring, batch_size=1)
    run(inp, tmp_path / "b256", keyring, batch_size=256)
    run(inp, tmp_path / "b4", keyring, batch_size=4, workers=1)
    assert tree(tmp_path / "b1") == tree(tmp_path / "b256") == tree(tmp_path / "b4")


def test_mix_protects_a_keyed_fraction(tmp_path, keyring, make_folder):
    inp = make_folder(classes=4, per_class=10)
    run(inp, tmp_path / "a", keyring, params={"mix": 0.5})
    run(inp, tmp_path / "b", keyring, params={"mix": 0.5})
    assert tree(tmp_path / "a") == tree(tmp_path / "b")
    rels = sorted(tree(inp))
    unchanged = {r for r in rels if np.array_equal(pixels(inp / r), pixels(tmp_path / "a" / r))}
    assert 8 <= len(unchanged) <= 32  # about half of 40
    assert unchanged == {r for r in rels if keyring.unit("cuda/mix", r) >= 0.5}
    run(inp, tmp_path / "c", Keyring.from_seed(5), params={"mix": 0.5})
    other = {r for r in rels if np.array_equal(pixels(inp / r), pixels(tmp_path / "c" / r))}
    assert other != unchanged


def test_method_state_is_saved_and_reused(tmp_path, keyring, make_folder):
    inp, out = make_folder(), tmp_path / "out"
    run(inp, out, keyring)
    state = torch.load(tmp_path / "out.protect" / "state.pt", weights_only=True)
    assert state["filters"].shape == (2, 3, 3)
    assert int((state["filters"] == 1.0).sum()) == 2
