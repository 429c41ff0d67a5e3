"""verify.relabel and `protect verify --relabel/--labels/--test-labels`: the attacker's labelling.

Most tests replace the surrogate training by a stub (no model is trained: they check maps, keys,
chance and files); one runs the real CLI end to end on the bundled samples (about 3 s)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

import verify.cells as vcells
import verify.run as vrun

from perturbations.errors import ConfigError, InputError
from verify import defenses
from verify.certificate import chance_level, load_certificate
from verify.data import load_folder
from verify.recipes import get_recipe, parse_training
from verify.relabel import RELABEL_SEED, Labelling, natural_key, parse_relabel
from verify.store import cell_key
from verify.train import CellResult
from tests.clitools import call_main

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples" / "cifar10"
COARSE = SAMPLES / "coarse.json"
CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
VEHICLES = {"airplane", "automobile", "ship", "truck"}

pytestmark = pytest.mark.usefixtures("one_thread")


def _map(tmp_path: Path, blob: object | str, name: str = "map.json") -> Path:
    path = tmp_path / name
    path.write_text(blob if isinstance(blob, str) else json.dumps(blob), encoding="utf-8")
    return path




class FakeTrainer:
    """Stands in for verify.cells.train_cell: records what each cell was given and returns fixed
    accuracies (clean 0.9, protected 0.7; balanced accuracy 0.85 and 0.65, AUC 0.95 and 0.75) without
    training anything."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, train, test, recipe, training, defense, seed, device, progress=False, label="", val=None, read=True):
        self.calls.append({"label": label, "classes": list(train.classes), "test_classes": list(test.classes),
                           "counts": train.counts(), "test_counts": test.counts(),
                           "val_classes": list(val.classes) if val is not None else None, "read": read})
        acc = 0.9 if "] clean " in label else 0.7
        bal, auc = acc - 0.05, acc + 0.05
        y = test.y.tolist()  # right on the first round(acc * n) test images
        pred = [t if i < round(acc * len(y)) else (t + 1) % test.num_classes for i, t in enumerate(y)]
        return CellResult(training.name, defense.name, seed, [acc], acc, acc, 1, 1.0, 0.1, 0.0, 1, [0.0],
                          [len(test)], len(train), len(test), "cpu", curve_balanced=[bal], curve_auc=[auc],
                          final_balanced_acc=bal, peak_balanced_acc=bal, peak_balanced_epoch=1, final_auc=auc,
                          peak_auc=auc, selected_epoch=1, acc=acc, balanced_acc=bal, auc=auc, selection="validation",
                          n_val=len(val) if val is not None else 0, val_curve=[acc], val_curve_balanced=[bal],
                          test_pred=pred)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeTrainer:
    trainer = FakeTrainer()
    monkeypatch.setattr(vcells, "train_cell", trainer)
    return trainer


# -- the map -----------------------------------------------------------------------------------
def test_coarse_map_is_animals_vs_vehicles_in_name_order() -> None:
    assert sorted(p.name for p in (SAMPLES / "train").iterdir() if p.is_dir()) == CIFAR
    lab = parse_relabel(COARSE).resolve(CIFAR)
    assert lab.classes == ["animal", "vehicle"]  # indices 0 and 1, in name order
    assert lab.mapping == {c: "vehicle" if c in VEHICLES else "animal" for c in CIFAR}
    assert lab.source == {"kind": "file", "path": str(COARSE),
                          "sha256": hashlib.sha256(COARSE.read_bytes()).hexdigest()}
    data = load_folder(SAMPLES / "test", max_per_class=2)
    out = lab.apply(data)
    assert out.classes == ["animal", "vehicle"] and out.counts() == [12, 8] and out.x is data.x
    assert [out.classes[int(y)] == ("vehicle" if data.classes[int(x)] in VEHICLES else "animal")
            for x, y in zip(data.y, out.y)] == [True] * 20
    assert out.sha256 != data.sha256 and out.rels == data.rels


def test_attacker_classes_are_in_natural_order(tmp_path: Path) -> None:
    lab = parse_relabel(_map(tmp_path, {"a": "group10", "b": "group2", "c": "group2", "d": 7})).resolve(list("abcd"))
    assert lab.classes == ["7", "group2", "group10"] and lab.mapping["d"] == "7"
    assert sorted(["10", "2", "b", "a1", "a10", "a2"], key=natural_key) == ["2", "10", "a1", "a2", "a10", "b"]


@pytest.mark.parametrize("blob, message", [
    ({c: "vehicle" if c in VEHICLES else "animal" for c in CIFAR if c != "truck"},
     r"does not map class\(es\) \['truck'\] of the data"),
    ({**{c: "x" for c in CIFAR[1:]}, "airplain": "y"},
     r"does not map class\(es\) \['airplane'\] of the data and maps class\(es\) \['airplain'\] that the data"),
    ({}, "is empty"),
    ('{"airplane": "vehicle",}', "is not valid JSON: .* at line 1 column"),
    ('["airplane"]', "must be a JSON object"),
    ('{"cat": "animal", "cat": "pet", "dog": "animal"}', "class 'cat' is listed twice"),
    ({c: "thing" for c in CIFAR}, "the attacker needs at least 2 classes"),
    ({"cat": ["animal"], "dog": "animal"}, "class 'cat' maps to \\[\"animal\"\\]"),
    ({"cat": " ", "dog": "animal"}, "attacker classes are non-empty names"),
])
def test_bad_maps_are_one_line_errors(tmp_path: Path, blob: object, message: str) -> None:
    with pytest.raises(InputError, match=message) as info:
        parse_relabel(_map(tmp_path, blob)).resolve(CIFAR)
    assert "\n" not in str(info.value)


def test_a_long_list_of_unmapped_classes_stays_short() -> None:
    many = [f"c{i}" for i in range(100)]
    with pytest.raises(InputError, match=r"\['c2', .*, \.\.\. 92 more\]") as info:
        Labelling({"c0": "a", "c1": "b"}, {"kind": "file", "path": "m.json"}).check(many)
    assert len(str(info.value)) < 400


# -- random:N --------------------------------------------------------------------------------
def test_random_groups_are_deterministic_non_empty_and_recorded() -> None:
    lab = parse_relabel("random:3").resolve(CIFAR)
    assert lab.mapping == parse_relabel("random:3").resolve(CIFAR).mapping  # the fixed default seed
    assert lab.mapping == parse_relabel(f"random:3:{RELABEL_SEED}").resolve(CIFAR).mapping
    assert lab.source == {"kind": "random", "spec": "random:3", "groups": 3, "seed": 0}
    assert lab.classes == ["group0", "group1", "group2"]
    sizes = sorted(list(lab.mapping.values()).count(g) for g in lab.classes)
    assert sizes == [3, 3, 4]  # dealt round-robin: K // N or K // N + 1 classes each
    seeds = {json.dumps(parse_relabel(f"random:3:{s}").resolve(CIFAR).mapping, sort_keys=True) for s in range(5)}
    assert len(seeds) > 1  # the seed matters
    for n in range(2, 10):
        groups = parse_relabel(f"random:{n}").resolve(CIFAR).classes
        assert groups == [f"group{i}" for i in range(n)]  # natural order: group9 before group10 would be too
        mapping = parse_relabel(f"random:{n}").resolve(CIFAR).mapping
        assert set(mapping) == set(CIFAR) and set(mapping.values()) == set(groups)  # every group non-empty


@pytest.mark.parametrize("spec, classes, message", [
    ("random:1", CIFAR, "N must be at least 2"),
    ("random:x", CIFAR, "expected random:N or random:N:SEED"),
    ("random:3:", CIFAR, "expected random:N or random:N:SEED"),
    ("random:3:-1", CIFAR, "SEED must be >= 0"),
    ("random:10", CIFAR, r"does not fit 10 classes: use 2 <= N <= 9"),
    ("random:2", ["a", "b"], "does not fit 2 classes: it needs at least 3 classes"),
])
def test_random_bad_specs(spec: str, classes: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_relabel(spec).resolve(classes)
    assert "\n" not in str(info.value)


# -- chance, keys, certificate ---------------------------------------------------------------
def test_chance_is_the_majority_rate_of_the_remapped_test_set() -> None:
    test = load_folder(SAMPLES / "test", max_per_class=5)
    assert chance_level(test.counts(), test.classes) == (0.1, None)
    coarse = parse_relabel(COARSE).resolve(CIFAR).apply(test)
    assert chance_level(coarse.counts(), coarse.classes) == (0.6, "animal")  # 30 animals, 20 vehicles
    grouped = parse_relabel("random:3").resolve(CIFAR).apply(test)
    assert chance_level(grouped.counts(), grouped.classes)[0] == 0.4  # the 4-class group, 20 of 50


def test_cell_keys_cover_the_labelling() -> None:
    train, test = load_folder(SAMPLES / "test", max_per_class=1), load_folder(SAMPLES / "test", max_per_class=2)
    recipe = get_recipe("quick", epochs=1)
    erm, none = parse_training("erm", recipe), defenses.get("none")
    coarse = parse_relabel(COARSE).resolve(CIFAR)
    rand2 = parse_relabel("random:2").resolve(CIFAR)
    keys = {name: (cell_key(lab.apply(train) if lab else train, lab.apply(test) if lab else test, recipe, erm,
                            none, 0, role="clean"),
                   cell_key(lab.apply(train) if lab else train, lab.apply(test) if lab else test, recipe, erm,
                            "none", 0))
            for name, lab in [("original", None), ("coarse", coarse), ("random:2", rand2)]}
    flat = [k for pair in keys.values() for k in pair]
    assert len(set(flat)) == len(flat), keys  # cells and baselines both
    # the map, not its source, is the key: the same map from another file trains the same cells
    same = Labelling(dict(coarse.mapping), {"kind": "file", "path": "elsewhere.json"})
    assert cell_key(same.apply(train), same.apply(test), recipe, erm, "none", 0) == keys["coarse"][1]


def test_relabelled_runs_never_reuse_cells_or_baselines_of_other_labels(tmp_path: Path, fake: FakeTrainer) -> None:
    kw = {"tier": get_recipe("quick", epochs=1), "trainings": "erm", "defenses": "none", "device": "cpu",
          "max_per_class": 2, "progress": False, "report_dir": tmp_path / "report", "cache_dir": tmp_path / "cache",
          "seeds": 1}
    train, test = SAMPLES / "train", SAMPLES / "test"

    def run(**extra) -> dict:
        fake.calls.clear()
        return vrun.verify_folder(train, test, train, **{**kw, **extra})

    cert = run()
    assert len(fake.calls) == 2 and cert["labelling"]["attacker"] == "original" and cert["num_classes"] == 10
    # the attacker reads the protected model's answers; the clean baseline keeps its own
    assert sorted((" clean " in c["label"], c["read"]) for c in fake.calls) == [(False, True), (True, False)]
    cert = run(relabel=COARSE)
    assert len(fake.calls) == 2, "a relabelled run reused cells or a baseline trained on the original labels"
    assert cert["resume"]["reused"] == 0 and cert["baseline_cache"]["hits"] == 0
    assert [c["classes"] for c in fake.calls] == [["animal", "vehicle"]] * 2
    # --max-per-class cuts the training folders only: the test set stays whole (16 scored and 4
    # validation images per class of 10, dealt to 6 animal and 4 vehicle classes)
    assert [c["counts"] for c in fake.calls] == [[12, 8]] * 2 and fake.calls[0]["test_counts"] == [96, 64]
    assert fake.calls[0]["val_classes"] == ["animal", "vehicle"]
    cert = run(relabel="random:2")
    assert len(fake.calls) == 2 and cert["resume"]["reused"] == 0 and cert["baseline_cache"]["hits"] == 0
    cert = run(relabel=shutil.copy(COARSE, tmp_path / "same-map.json"))  # the same map: everything reused
    assert fake.calls == [] and cert["resume"]["reused"] == 2
    assert run()["resume"]["reused"] == 2 and fake.calls == []  # the original cells are still there
    # another report folder: the clean baseline of each labelling comes from the shared cache only
    cert = run(relabel=COARSE, report_dir=tmp_path / "other")
    assert [c["label"].split("] ")[1] for c in fake.calls] == ["protected erm/none seed 0"]
    assert cert["baseline_cache"]["hits"] == 1
    cert = run(relabel="random:3", report_dir=tmp_path / "other")
    assert len(fake.calls) == 2 and cert["baseline_cache"] == {**cert["baseline_cache"], "hits": 0, "misses": 1}
    metas = [json.loads(p.read_text())["meta"]["labels"] for p in (tmp_path / "report" / "cells").glob("*.json")]
    assert sorted(set(metas)) == sorted({"original", parse_relabel(COARSE).resolve(CIFAR).fingerprint,
                                         parse_relabel("random:2").resolve(CIFAR).fingerprint})


def test_certificate_and_report_record_the_map(tmp_path: Path, fake: FakeTrainer) -> None:
    cert = vrun.verify_folder(SAMPLES / "train", SAMPLES / "test", SAMPLES / "train",
                              tier=get_recipe("quick", epochs=1), trainings="erm", defenses="none", device="cpu", max_per_class=2, progress=False,
                              report_dir=tmp_path / "report", cache_dir=False, relabel=COARSE, seeds=1)
    saved = load_certificate(tmp_path / "report" / "certificate.json")
    lab = saved["labelling"]
    assert lab["attacker"] == "remapped" and lab["map"] == json.loads(COARSE.read_text())
    digest = hashlib.sha256(COARSE.read_bytes()).hexdigest()
    assert lab["source"] == {"kind": "file", "path": str(COARSE), "sha256": digest}
    assert lab["groups"] == {"animal": ["bird", "cat", "deer", "dog", "frog", "horse"],
                             "vehicle": ["airplane", "automobile", "ship", "truck"]}
    assert lab["data_classes"] == CIFAR and len(lab["sha256"]) == 64 and "remapped" in lab["description"]
    assert saved["classes"] == ["animal", "vehicle"] and saved["num_classes"] == 2
    assert saved["chance"] == 0.6 and saved["chance_class"] == "animal"
    assert saved["data"]["test"]["per_class"] == [96, 64] and saved["data"]["validation"]["per_class"] == [24, 16]
    cell = saved["cells"][0]
    # 96/64 animal/vehicle is imbalanced (60%): the score uses balanced accuracy, chance 1/2
    assert saved["score_metric"] == "balanced_accuracy" and saved["score_chance"] == 0.5
    assert cell["effect"] == pytest.approx((0.85 - 0.65) / (0.85 - 0.5), abs=1e-4) and cert["verdict"]["chance"] == 0.6
    assert saved["verdict"]["score"] == cell["effect"]  # one erm cell: the headline is its effect
    assert cell["protected"]["n_val"] == 40 and cell["protected"]["selection"] == "validation"
    # the interval resamples the scored images' predictions: the stub's protected model is right on a
    # subset of the images its clean baseline gets right, so every resample shows an effect above 0
    v = saved["verdict"]
    lo, hi = v["interval"]
    assert 0 < lo <= hi and v["conclusive"] and v["summary"].startswith("Protection score")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "**Attacker labels.** The attacker trained and was scored on 2 remapped classes (animal, vehicle)" in md
    assert f"map file {COARSE}" in md and "vehicle ← airplane, automobile, ship, truck" in md
    assert "Chance is 60.0%: the majority-class rate of the test set (always answering 'animal')" in md
    assert (tmp_path / "report" / "samples.png").is_file()


# -- the CLI ---------------------------------------------------------------------------------
@pytest.mark.parametrize("blob, message", [
    ({"airplane": "vehicle", "cat": "animal"}, "does not map class(es) ['automobile', 'bird', 'deer'"),
    ({}, "is empty: map every class"),
    ("{not json", "is not valid JSON"),
    ("random:1", "N must be at least 2"),
    ("random:10", "does not fit 10 classes: use 2 <= N <= 9"),
])
def test_cli_relabel_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture, fake: FakeTrainer,
                                                blob: object, message: str) -> None:
    spec = blob if isinstance(blob, str) and blob.startswith("random:") else _map(tmp_path, blob)
    code, out, err = call_main(capsys, "verify", SAMPLES / "train", "--test", SAMPLES / "test", "--relabel", spec,
                               "--max-per-class", "1", "--device", "cpu", "--no-cache", "--report", tmp_path / "r")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err and fake.calls == [] and out == ""


def _flat(src: Path, dst: Path, n: int, suffix: str = ".png") -> list[tuple[str, str]]:
    """Copy ``n`` images of airplane and frog from class folders into one flat folder; (name, label) rows."""
    dst.mkdir(parents=True)
    rows = []
    for c in ("airplane", "frog"):
        for f in sorted((src / c).glob("*.png"))[:n]:
            name = f"{c[:3]}_{f.stem}{suffix}"
            Image.open(f).convert("RGB").save(dst / name, quality=95)
            rows.append((name, c))
    return rows


def _csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("path,label\n" + "".join(f"{n},{lab}\n" for n, lab in rows), encoding="utf-8")
    return path


def test_cli_labels_csv_covers_protected_and_clean_and_test_labels_the_test(tmp_path: Path, capsys, fake) -> None:
    """One CSV for the flat clean folder (JPEG, what `protect images --labels` read) and the flat
    protected folder (PNG, what `--format png` wrote: the CSV's x.jpg also labels x.png)."""
    rows = _flat(SAMPLES / "train", tmp_path / "clean", 3, ".jpg")
    _flat(SAMPLES / "train", tmp_path / "protected", 3, ".png")
    labels = _csv(tmp_path / "labels.csv", rows)
    test_rows = _flat(SAMPLES / "test", tmp_path / "test", 2)
    test_labels = _csv(tmp_path / "test.csv", test_rows)
    base = ["verify", tmp_path / "protected", "--test", tmp_path / "test", "--clean", tmp_path / "clean",
            "--training", "erm", "--defenses", "none", "--epochs", "1", "--seeds", "1", "--device", "cpu", "--no-cache",
            "--report", tmp_path / "r", "--json"]
    code, out, err = call_main(capsys, *base, "--labels", labels, "--test-labels", test_labels)
    assert code == 0, err
    cert = json.loads(out)
    assert cert["classes"] == ["airplane", "frog"] and cert["data"]["train"]["per_class"] == [3, 3]
    assert cert["data"]["clean"]["per_class"] == [3, 3] and cert["data"]["test"]["per_class"] == [1, 1]
    assert cert["data"]["validation"]["per_class"] == [1, 1]  # one of each class's two chooses the epoch
    assert [c["counts"] for c in fake.calls] == [[3, 3], [3, 3]]
    # without --test-labels the flat test folder is refused with a hint
    code, out, err = call_main(capsys, *base, "--labels", labels)
    assert code == 2 and "test folder" in err and "has no labels" in err and "--test-labels CSV" in err
    code, out, err = call_main(capsys, *base, "--test-labels", test_labels)
    assert code == 2 and "protected folder" in err and "--labels CSV" in err


def test_cli_relabel_coarse_end_to_end_on_the_samples(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The real command (real training, the smallest settings: 4 images per class, 1 epoch, erm,
    no defense) on the bundled CIFAR-10 samples with samples/cifar10/coarse.json: a 2-class certificate."""
    report = tmp_path / "report"
    code, out, err = call_main(
        capsys, "verify", SAMPLES / "train", "--test", SAMPLES / "test", "--clean", SAMPLES / "train",
        "--relabel", COARSE, "--max-per-class", "4", "--training", "erm", "--defenses", "none", "--epochs", "1",
        "--seeds", "1", "--device", "cpu", "--no-cache", "--report", report)
    assert code == 0, err
    assert f"labels: remapped by {COARSE} to 2 attacker classes (animal, vehicle)" in out
    assert "chance 60.0 %: the majority-class rate of the test set (always answering 'animal')" in out
    cert = load_certificate(report / "certificate.json")
    assert cert["num_classes"] == 2 and cert["classes"] == ["animal", "vehicle"] and cert["chance"] == 0.6
    assert cert["labelling"]["attacker"] == "remapped" and cert["labelling"]["source"]["path"] == str(COARSE)
    assert cert["data"]["train"]["per_class"] == [24, 16] and cert["data"]["test"]["per_class"] == [96, 64]
    cell = cert["cells"][0]
    assert cell["protected"]["per_seed"][0]["n_train"] == 40 and 0.0 <= cell["protected"]["peak_acc"] <= 1.0
    assert "Attacker labels" in (report / "report.md").read_text()
