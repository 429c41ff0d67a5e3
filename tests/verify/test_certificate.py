"""verify.certificate (score, verdict, seeds, schema round trip) and verify.report (files)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from perturbations.errors import RecordError
from verify.certificate import (
    SCHEMA,
    build_certificate,
    cell_entry,
    chance_level,
    load_certificate,
    save_certificate,
    score,
    summarize_runs,
    verdict,
)
from verify.recipes import get_recipe, parse_trainings
from verify.report import report_markdown, write_report
from verify.train import CellResult

CHANCE = 0.1


def run(training: str, defense: str, curve: list[float], seed: int = 0, train_acc: float = 0.9,
        chosen: int | None = None) -> CellResult:
    """A hand-built result: the test curve, the epoch chosen on validation (default: the peak's)."""
    peak = max(range(len(curve)), key=lambda i: curve[i])
    epoch = peak if chosen is None else chosen
    return CellResult(training, defense, seed, curve, curve[-1], curve[peak], peak + 1, train_acc, 0.5,
                      12.5, len(curve), [6.0, 6.5], [100] * len(curve), 1000, 100, "cpu",
                      selected_epoch=epoch + 1, acc=curve[epoch], selection="validation", n_val=25,
                      val_curve=list(curve))


def grid(with_clean: bool = True, model: str | None = None) -> dict:
    """2 regimes x 2 defenses, one seed; linf/grayscale has the highest protected peak (0.41)."""
    protected = {
        ("erm", "none"): [0.21, 0.33, 0.30],
        ("erm", "grayscale"): [0.25, 0.38, 0.36],
        ("linf", "none"): [0.20, 0.30, 0.29],
        ("linf", "grayscale"): [0.30, 0.41, 0.40],
    }
    clean = {"erm": [0.50, 0.70, 0.76], "linf": [0.30, 0.45, 0.47]}
    cells = []
    for (t, d), curve in protected.items():
        cells.append(cell_entry(t, d, [run(t, d, curve)], [run(t, "none", clean[t])] if with_clean else None,
                                CHANCE, baseline_defense="none"))
    recipe = get_recipe("quick", epochs=3, model=model)
    return build_certificate(
        recipe=recipe, trainings=parse_trainings("erm,linf", recipe), defenses=["none", "grayscale"], seeds=[0],
        classes=[f"c{i}" for i in range(10)], cells=cells,
        data={"train": {"root": "/p", "count": 1000, "sha256": "ab" * 32}, "test": {"root": "/t", "count": 100, "sha256": "cd" * 32}},
        device="cpu", wall_s=50.0,
    )


def test_score_arithmetic() -> None:
    assert score(0.76, 0.30, 0.1) == pytest.approx(0.46 / 0.66)
    assert score(0.76, 0.76, 0.1) == pytest.approx(0.0)
    assert score(0.76, 0.1, 0.1) == pytest.approx(1.0)
    assert score(0.5, 0.6, 0.1) == pytest.approx(-0.25)  # protected data trains a better model
    assert score(None, 0.3, 0.1) is None and score(0.1, 0.05, 0.1) is None  # no baseline / baseline at chance


def test_cells_and_verdict_score_the_best_attacker_against_the_clean_erm_reference() -> None:
    cert = grid()
    assert cert["schema"] == SCHEMA and cert["tier"] == "quick" and cert["model"] == "fastcnn" and cert["epochs"] == 3
    cell = next(c for c in cert["cells"] if (c["training"], c["defense"]) == ("erm", "none"))
    assert cell["protected"]["acc"] == 0.33 and cell["protected"]["final_acc"] == 0.30
    assert cell["clean"]["acc"] == 0.76 and cell["clean"]["defense"] == "none"
    assert cell["effect"] == pytest.approx((0.76 - 0.33) / (0.76 - 0.1), abs=1e-4) and "score" not in cell
    v = cert["verdict"]
    assert (v["best_attacker"]["training"], v["best_attacker"]["defense"]) == ("linf", "grayscale")
    assert v["best_attacker"]["acc"] == 0.41
    # the headline: the best attacker against plain training on the clean images (erm, 0.76), not
    # against its own (linf) baseline, which an adversarially trained model caps at 0.47
    assert v["score"] == pytest.approx((0.76 - 0.41) / (0.76 - 0.1), abs=1e-4)
    assert v["best_attacker"]["effect"] == pytest.approx((0.47 - 0.41) / (0.47 - 0.1), abs=1e-4)
    assert v["reference"]["acc"] == 0.76 and v["accuracy_drop"] == pytest.approx(0.35)
    assert (v["smallest_effect"]["training"], v["smallest_effect"]["defense"]) == ("linf", "grayscale")
    assert v["conclusive"] is True and v["interval"] is None  # hand-built: no predictions, no interval
    assert cert["fast_at"] is True and cert["chance"] == 0.1
    # a balanced test set (here: none given) scores with plain accuracy
    assert cert["score_metric"] == "accuracy" and cert["score_chance"] == 0.1 and v["score_metric"] == "accuracy"
    assert cell["score_metric"] == "accuracy" and cell["protected"]["peak_balanced_acc"] is None  # not measured
    assert {"torch", "kornia", "protect"} <= set(cert["versions"])


def test_the_headline_uses_the_validation_chosen_epoch_and_keeps_the_oracle_beside_it() -> None:
    # the protected model peaks at 0.40 by luck in epoch 1, validation chose epoch 3 (0.25)
    cells = [cell_entry("erm", "none", [run("erm", "none", [0.40, 0.2, 0.25], chosen=2)],
                        [run("erm", "none", [0.5, 0.7, 0.76])], CHANCE)]
    v = verdict(cells, CHANCE)
    assert v["best_attacker"]["acc"] == 0.25 and v["best_attacker"]["peak_acc"] == 0.40
    assert v["score"] == pytest.approx((0.76 - 0.25) / 0.66, abs=1e-4)
    assert v["oracle"]["score"] == pytest.approx((0.76 - 0.40) / 0.66, abs=1e-4)


def _random_cell(rng, training: str, defense: str) -> dict:
    prot = [float(a) for a in rng.uniform(0.1, 0.8, size=3)]
    clean = [float(a) for a in rng.uniform(0.3, 0.9, size=3)]
    return cell_entry(training, defense, [run(training, defense, prot, chosen=int(rng.integers(3)))],
                      [run(training, "none", clean, chosen=int(rng.integers(3)))], CHANCE)


def test_adding_an_attacker_never_raises_the_headline_score() -> None:
    """The issue's counter-example: with each cell scored against its own baseline, adding a
    breaker raised the verdict from 0.045 to 0.258. Against the fixed clean ERM reference, adding
    any cell (hand-built, random) leaves the score the same or lower."""
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(200):
        cells = [_random_cell(rng, "erm", "none")]
        last = verdict(cells, CHANCE)["score"]
        for i in range(6):
            cells.append(_random_cell(rng, ["erm", "linf", "l2"][i % 3], f"d{i}"))
            now = verdict(cells, CHANCE)["score"]
            assert now is not None and last is not None and now <= last + 1e-12
            last = now
    # the old rule's case from docs/BENCHMARKS.md: own-baseline scores would rise with a strong breaker
    base = [cell_entry("erm", "none", [run("erm", "none", [0.30])], [run("erm", "none", [0.67])], CHANCE),
            cell_entry("linf", "none", [run("linf", "none", [0.442])], [run("linf", "none", [0.459])], CHANCE)]
    more = base + [cell_entry("erm", "rskff", [run("erm", "rskff", [0.525])], [run("erm", "none", [0.67])], CHANCE)]
    assert verdict(more, CHANCE)["score"] < verdict(base, CHANCE)["score"]
    assert verdict(base, CHANCE)["smallest_effect"]["defense"] == "none"  # linf/none: effect 0.05


def test_no_clean_baseline_means_no_score() -> None:
    cert = grid(with_clean=False)
    assert all("clean" not in c and c["effect"] is None for c in cert["cells"])
    v = cert["verdict"]
    assert v["score"] is None and v["best_attacker"]["acc"] == 0.41 and v["conclusive"] is False
    assert "no clean reference" in v["summary"] and "41.0%" in v["summary"]


def test_a_reference_at_chance_is_named_as_the_reason_for_no_score() -> None:
    cells = [cell_entry("erm", "none", [run("erm", "none", [0.3, 0.4])], [run("erm", "none", [0.5, 0.55])], 0.6)]
    v = verdict(cells, 0.6)
    assert v["score"] is None and "no clean reference" not in v["summary"]
    assert "the clean reference is not above chance, so no protection score" in v["summary"]


def test_a_weak_reference_or_an_interval_around_zero_is_inconclusive() -> None:
    weak = [cell_entry("erm", "none", [run("erm", "none", [0.12])], [run("erm", "none", [0.18])], CHANCE)]
    v = verdict(weak, CHANCE)
    assert v["score"] is not None and v["conclusive"] is False and "within 10 points of chance" in v["inconclusive_reason"]
    assert v["summary"].startswith("Inconclusive: protection score")
    cells = [cell_entry("erm", "none", [run("erm", "none", [0.6])], [run("erm", "none", [0.7])], CHANCE)]
    assert verdict(cells, CHANCE, interval=(-0.05, 0.4))["conclusive"] is False
    ok = verdict(cells, CHANCE, interval=(0.05, 0.3))
    assert ok["conclusive"] is True and ok["interval"] == [0.05, 0.3] and "95% interval 0.05 to 0.30" in ok["summary"]


def test_seeds_are_averaged_with_spread() -> None:
    p = [run("erm", "none", [0.2, 0.30], seed=0), run("erm", "none", [0.3, 0.40], seed=1)]
    c = [run("erm", "none", [0.6, 0.70], seed=0), run("erm", "none", [0.7, 0.80], seed=1)]
    s = summarize_runs(p)
    assert s["acc"] == pytest.approx(0.35) and s["acc_std"] == pytest.approx(math.sqrt(0.005), abs=1e-4)
    assert s["curve"] == [pytest.approx(0.25), pytest.approx(0.35)] and len(s["per_seed"]) == 2
    cell = cell_entry("erm", "none", p, c, CHANCE, clean_cached=[True, False])
    assert cell["effect"] == pytest.approx((0.75 - 0.35) / 0.65, abs=1e-4)
    assert cell["effect_per_seed"] == [pytest.approx(0.4 / 0.6, abs=1e-4), pytest.approx(0.4 / 0.7, abs=1e-4)]
    assert [r["cached"] for r in cell["clean"]["per_seed"]] == [True, False]


def test_round_trip(tmp_path: Path) -> None:
    cert = grid()
    path = save_certificate(cert, tmp_path / "out" / "certificate.json")
    back = load_certificate(path)
    assert back == json.loads(json.dumps(cert))
    assert back["cells"][0]["protected"]["curve"] == [0.21, 0.33, 0.30]


def test_load_rejects_other_files(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="not found"):
        load_certificate(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RecordError, match="cannot read"):
        load_certificate(bad)
    cert = grid()
    for mutate, msg in [
        (lambda c: c.update(schema="protect.certificate/0"), "schema"),
        (lambda c: c.pop("cells"), "cells"),
        (lambda c: c["cells"][0]["protected"].update(peak_acc=76.0), "accuracy in"),
        (lambda c: c.update(schema="protect.certificate/1"), "older version"),
        (lambda c: c["verdict"].pop("best_attacker"), "best_attacker"),
    ]:
        broken = json.loads(json.dumps(cert))
        mutate(broken)
        bad.write_text(json.dumps(broken))
        with pytest.raises(RecordError, match=msg):
            load_certificate(bad)


def test_non_finite_numbers_are_written_as_null(tmp_path: Path) -> None:
    cert = grid()
    cert["wall_s"] = float("nan")
    back = load_certificate(save_certificate(cert, tmp_path / "c.json"))
    assert back["wall_s"] is None


def test_report_files_and_smallest_effect(tmp_path: Path) -> None:
    cert = grid()
    files = write_report(cert, tmp_path / "rep")
    assert files["report"].is_file() and files["curves"].is_file()
    assert files["curves"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = files["report"].read_text()
    assert "Tier **quick**" in md and "fastcnn" in md and "3 epochs" in md and "fast AT" in md
    assert "**Smallest effect:** linf / grayscale" in md and "**Best attacker:** linf / grayscale: 41.0%" in md
    assert "| linf | 30.0% (clean 47.0%) · 0.46 | 41.0% (clean 47.0%) · 0.16 |" in md  # regime x defense table
    assert "Protection score 0.53" in md and "**Reference:** plain training (ERM, no defense) on the clean images: 76.0%" in md
    assert "Smallest effect" not in report_markdown(grid(with_clean=False))


def test_warns_when_adversarial_training_used_a_small_model() -> None:
    (warning,) = grid(model="fastcnn")["warnings"]  # --model fastcnn: every regime's learner
    assert "adversarial training (linf) used the small model 'fastcnn'" in warning and "--tier standard" in warning
    assert grid(model="resnet18")["warnings"] == [] and grid()["warnings"] == []  # the quick tier's own AT learner


def test_warns_when_a_clean_baseline_barely_beats_chance() -> None:
    assert grid(model="resnet18")["warnings"] == []
    cells = [cell_entry(t, d, [run(t, d, [0.12, 0.15])], [run(t, "none", [0.11, 0.16])], CHANCE, baseline_defense="none")
             for t, d in (("erm", "none"), ("erm", "grayscale"))]
    recipe = get_recipe("quick", epochs=2)
    cert = build_certificate(
        recipe=recipe, trainings=parse_trainings("erm", recipe), defenses=["none", "grayscale"], seeds=[0],
        classes=[f"c{i}" for i in range(10)], cells=cells, data={}, device="cpu", wall_s=1.0,
    )
    (warning,) = cert["warnings"]  # one baseline, named once
    assert "erm/none reached only 16.0%" in warning and "chance 10.0%" in warning
    assert f"**Warning:** {warning}." in report_markdown(cert)


def test_chance_is_the_majority_class_rate_of_the_test_set() -> None:
    assert chance_level([20, 20, 20]) == (pytest.approx(1 / 3), None)  # balanced: 1/K, no class named
    assert chance_level([15, 5], ["airplane", "frog"]) == (0.75, "airplane")
    assert chance_level([2, 6, 6], ["a", "b", "c"]) == (pytest.approx(6 / 14), "b")  # first of the tied majority
    assert chance_level([0, 0]) == (0.5, None)


def test_imbalanced_test_set_scores_against_the_majority_rate() -> None:
    """On a 75/25 test set a baseline that always answers the majority class scores 75%: with chance
    1/K = 50% it would get a meaningful-looking score; against the majority rate it gets none."""
    chance, name = chance_level([30, 10], ["airplane", "frog"])
    stuck = cell_entry("erm", "none", [run("erm", "none", [0.70, 0.72])], [run("erm", "none", [0.74, 0.75])],
                       chance, baseline_defense="none")
    assert stuck["effect"] is None  # the baseline learned nothing beyond the majority class
    assert cell_entry("erm", "none", [run("erm", "none", [0.70, 0.72])], [run("erm", "none", [0.74, 0.75])],
                      0.5, baseline_defense="none")["effect"] == pytest.approx(0.12)  # what 1/K claimed
    learned = cell_entry("erm", "grayscale", [run("erm", "grayscale", [0.76, 0.8])],
                         [run("erm", "none", [0.85, 0.95])], chance, baseline_defense="none")
    assert learned["effect"] == pytest.approx((0.95 - 0.8) / (0.95 - 0.75))
    recipe = get_recipe("quick", epochs=2)
    cert = build_certificate(
        recipe=recipe, trainings=parse_trainings("erm", recipe), defenses=["none", "grayscale"], seeds=[0],
        classes=["airplane", "frog"], cells=[stuck, learned], device="cpu", wall_s=1.0,
        data={"train": {"per_class": [50, 50]}, "test": {"per_class": [30, 10], "count": 40}},
    )  # chance taken from the test set's counts
    assert cert["chance"] == 0.75 and cert["chance_class"] == "airplane" and "majority" in cert["chance_definition"]
    assert "majority-class rate" in cert["score_definition"] and cert["verdict"]["chance"] == 0.75
    assert cert["verdict"]["score"] is None  # the reference (erm/none, 0.75) is not above chance
    assert any("chance 75.0%" in w for w in cert["warnings"])  # the stuck baseline is flagged
    md = report_markdown(cert)
    assert "Chance is 75.0%: the majority-class rate of the test set (always answering 'airplane')." in md
    assert grid()["chance"] == 0.1 and grid()["chance_class"] is None  # no counts given: 1/K


def test_the_attackers_reading_of_the_answers_is_recorded_per_seed() -> None:
    """Renamed answers and a decision threshold at the chosen epoch are counted over seeds and
    written per seed, so a reader sees which numbers came from reading the answers."""
    read = dataclasses.replace(run("erm", "none", [0.2, 0.8], seed=0), answer_map=[1, 0], remapped_epochs=2,
                               threshold=-1.25, thresholded_epochs=1)
    own = run("erm", "none", [0.2, 0.3], seed=1)
    shifted = dataclasses.replace(run("erm", "none", [0.2, 0.4], seed=2), offsets=[-1.5, 0.0, 0.25], offset_epochs=3)
    s = summarize_runs([read, own, shifted])
    assert s["answers_remapped"] == 1 and s["answers_thresholded"] == 1 and s["answers_offset"] == 1
    assert s["answers_read"] == 0  # none of these hand-built runs scored both readings
    assert s["per_seed"][2]["offsets"] == [-1.5, 0.0, 0.25] and s["per_seed"][2]["offset_epochs"] == 3
    s["per_seed"] = s["per_seed"][:2]
    assert [(e["answer_map"], e["threshold"], e["thresholded_epochs"]) for e in s["per_seed"]] == [
        ([1, 0], -1.25, 1), (None, None, 0)]
    cert = grid()
    assert "read off the validation images" not in report_markdown(cert)
    entry = cert["cells"][0]["protected"]["per_seed"][0]
    entry.update(threshold=0.3, answer_map=[1, 0], own_score=0.2, read_score=0.2)  # read, but not better: own kept
    assert "read off the validation images" not in report_markdown(cert)
    entry.update(read_score=0.35)
    assert ("↳ protected: a decision threshold read off the validation images scored higher than the model's own "
            "answers in 1 of 1 seed(s)") in report_markdown(cert)
