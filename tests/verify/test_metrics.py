"""verify.metrics (balanced accuracy, rank-based AUC, the imbalance rule), verify.evaluation, and
the certificate/report on imbalanced test sets; two tiny end-to-end runs on BreastMNIST samples
(an imbalanced test copy scores with balanced accuracy, a balanced one with accuracy; ~10 s)."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import verify.run as vrun
from perturbations.errors import RecordError
from verify.certificate import build_certificate, cell_entry, load_certificate, save_certificate, score
from verify.evaluation import evaluate_metrics
from verify.metrics import (
    average_ranks,
    balanced_accuracy,
    binary_auc,
    is_imbalanced,
    macro_auc,
    score_basis,
    softmax_log_odds,
)
from verify.recipes import get_recipe, parse_trainings
from verify.report import plot_curves, report_markdown, write_report
from verify.train import CellResult

BREAST = Path(__file__).resolve().parents[2] / "samples" / "breastmnist"

pytestmark = pytest.mark.usefixtures("one_thread")


# -- brute-force references ------------------------------------------------------------------------
def brute_auc(scores: list[float], positive: list[bool]) -> float:
    """Every (positive, negative) pair: 1 when the positive scores higher, 1/2 on a tie."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def brute_ranks(values: list[float]) -> list[float]:
    return [sum(v < x for v in values) + (sum(v == x for v in values) + 1) / 2 for x in values]


# -- balanced accuracy -----------------------------------------------------------------------------
@pytest.mark.parametrize("counts", [[90, 10], [62, 38], [25, 25], [50, 30, 20], [5, 0, 7, 100]])
def test_a_constant_answer_has_balanced_accuracy_one_over_k(counts: list[int]) -> None:
    y = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    present = sum(n > 0 for n in counts)
    majority = max(range(len(counts)), key=lambda k: counts[k])
    for answer in (majority, next(k for k, n in enumerate(counts) if n > 0 and k != majority)):
        pred = torch.full_like(y, answer)
        assert balanced_accuracy(pred, y, len(counts)) == pytest.approx(1 / present)
    assert balanced_accuracy(y, y, len(counts)) == 1.0


def test_balanced_accuracy_is_the_mean_recall_of_the_present_classes() -> None:
    y = torch.tensor([0, 0, 0, 0, 1, 1, 3, 3, 3])  # class 2 absent: not averaged
    pred = torch.tensor([0, 0, 0, 1, 1, 0, 3, 2, 2])
    assert balanced_accuracy(pred, y, 4) == pytest.approx((3 / 4 + 1 / 2 + 1 / 3) / 3)


# -- AUC -------------------------------------------------------------------------------------------
def test_auc_of_perfect_inverted_constant_and_random_scores() -> None:
    g = torch.Generator().manual_seed(0)
    positive = torch.rand(500, generator=g) < 0.3
    s = positive.float() + 0.1 * torch.rand(500, generator=g)
    assert binary_auc(s, positive) == 1.0
    assert binary_auc(-s, positive) == 0.0
    assert binary_auc(torch.zeros(500), positive) == 0.5  # all tied
    noise = torch.rand(20000, generator=g)
    labels = torch.rand(20000, generator=g) < 0.2
    assert abs(binary_auc(noise, labels) - 0.5) < 0.03  # measured 0.4997 (std about 0.0025)
    assert math.isnan(binary_auc(s, torch.ones(500, dtype=torch.bool)))  # no negatives
    assert math.isnan(binary_auc(torch.tensor([0.1, float("nan")]), torch.tensor([True, False])))


def test_auc_with_ties_matches_the_brute_force_pair_count() -> None:
    g = torch.Generator().manual_seed(1)
    checked = 0
    for trial in range(300):
        n = int(torch.randint(2, 30, (1,), generator=g))
        levels = int(torch.randint(1, 6, (1,), generator=g))  # few levels: many ties
        scores = torch.randint(0, levels, (n,), generator=g).float() / 3
        positive = torch.rand(n, generator=g) < 0.4
        if positive.all() or not positive.any():
            continue
        ranks = average_ranks(scores)
        assert ranks.tolist() == pytest.approx(brute_ranks(scores.tolist()))
        assert binary_auc(scores, positive) == pytest.approx(brute_auc(scores.tolist(), positive.tolist()), abs=1e-12)
        checked += 1
    assert checked > 200


def test_macro_auc_averages_the_classes_with_positives_and_negatives() -> None:
    g = torch.Generator().manual_seed(2)
    scores = torch.randint(0, 4, (40, 4), generator=g).float()  # ties across rows
    y = torch.randint(0, 3, (40,), generator=g)  # class 3 has no positives: skipped
    expected = [brute_auc(scores[:, k].tolist(), (y == k).tolist()) for k in range(3)]
    assert macro_auc(scores, y) == pytest.approx(sum(expected) / 3)
    two = torch.randn(30, 2, generator=g)
    y2 = torch.randint(0, 2, (30,), generator=g)
    assert macro_auc(two, y2) == pytest.approx(brute_auc(two[:, 1].tolist(), (y2 == 1).tolist()))  # the positive class
    assert math.isnan(macro_auc(two, torch.zeros(30, dtype=torch.long)))  # one class only
    with pytest.raises(ValueError, match="N x K"):
        macro_auc(two[:, 0], y2)


def test_softmax_log_odds_rank_like_the_probabilities_without_saturating() -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(200, 5, generator=g, dtype=torch.float64) * 4
    p = logits.softmax(1)
    want = (p / (1 - p)).log()  # float64 reference, far from saturation at this scale
    got = softmax_log_odds(logits.float())
    assert got.dtype == torch.float32 and torch.allclose(got.double(), want, atol=1e-4)
    for k in range(5):  # the same order as the probabilities, column by column
        assert torch.equal(got[:, k].argsort(), p[:, k].argsort())
    big = torch.tensor([[0.0, 30.0], [0.0, 40.0], [0.0, -30.0], [5.0, 5.0]])
    odds = softmax_log_odds(big)  # float32 softmax is exactly 1 or 0 in the first three rows
    assert odds[:, 1].tolist() == pytest.approx([30.0, 40.0, -30.0, 0.0]) and torch.equal(odds[:, 0], -odds[:, 1])
    assert softmax_log_odds(torch.ones(3, 1)).tolist() == [[0.0]] * 3


# -- the rule --------------------------------------------------------------------------------------
def test_imbalance_rule_and_score_basis() -> None:
    assert not is_imbalanced([25, 25]) and not is_imbalanced([1000] * 10)
    assert not is_imbalanced([55, 45])  # exactly 10% from the mean: still balanced
    assert is_imbalanced([56, 44]) and is_imbalanced([25, 9])
    assert is_imbalanced([1000] * 9 + [800])  # one rare class is enough
    assert not is_imbalanced([0, 25, 25]) and not is_imbalanced([7])  # absent classes do not count
    assert score_basis([25, 25]) == ("accuracy", 0.5)
    assert score_basis([0, 25, 25]) == ("accuracy", 0.5)
    assert score_basis([234, 390]) == ("balanced_accuracy", 0.5)  # PneumoniaMNIST test: 62.5% pneumonia
    assert score_basis([42, 114]) == ("balanced_accuracy", 0.5)  # BreastMNIST test: 73% normal/benign
    assert score_basis([10, 20, 0, 30]) == ("balanced_accuracy", pytest.approx(1 / 3))


# -- one evaluation pass ---------------------------------------------------------------------------
class Fixed(nn.Module):
    """Returns logits stored per image (the image's first pixel indexes them)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[(x[:, 0, 0, 0] * 255).round().long()]


def test_evaluate_metrics_matches_the_definitions() -> None:
    g = torch.Generator().manual_seed(3)
    n = 50
    logits = torch.randn(n, 3, generator=g) * 3
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    model = Fixed(logits).train()
    ev = evaluate_metrics(model, x, y, batch_size=7)
    assert model.training  # mode restored
    pred = logits.argmax(1)
    assert ev.accuracy == pytest.approx((pred == y).float().mean().item())
    assert ev.balanced_accuracy == pytest.approx(balanced_accuracy(pred, y, 3))
    probs = logits.softmax(1)
    assert ev.auc == pytest.approx(sum(brute_auc(probs[:, k].tolist(), (y == k).tolist()) for k in range(3)) / 3)
    # a model that always answers the majority class: balanced accuracy 1/2, AUC 1/2 (constant scores)
    y2 = torch.tensor([0] * 40 + [1] * 10)
    const = Fixed(torch.tensor([[2.0, -1.0]]).expand(n, 2).contiguous())
    ev2 = evaluate_metrics(const, x, y2)
    assert (ev2.accuracy, ev2.balanced_accuracy, ev2.auc) == (0.8, 0.5, 0.5)
    # confident logits that saturate float32 softmax at exactly 1.0 still rank by their margins
    margin = torch.arange(n, dtype=torch.float32) + 40
    sat = Fixed(torch.stack([torch.zeros(n), margin], 1))
    y3 = (torch.arange(n) >= 25).long()
    assert torch.softmax(torch.stack([torch.zeros(n), margin], 1), 1)[:, 1].unique().numel() == 1
    assert evaluate_metrics(sat, x, y3).auc == 1.0


# -- certificate and report ------------------------------------------------------------------------
def _run(defense: str, acc: list[float], bal: list[float], auc: list[float], seed: int = 0,
         chosen: int | None = None) -> CellResult:
    """``chosen``: the (0-based) epoch validation chose; default the test peak of balanced accuracy."""
    peak = max(range(len(acc)), key=lambda i: acc[i])
    peak_b = max(range(len(bal)), key=lambda i: bal[i])
    chosen = peak_b if chosen is None else chosen
    return CellResult("erm", defense, seed, acc, acc[-1], acc[peak], peak + 1, 0.99, 0.1, 1.0, len(acc),
                      [0.5] * len(acc), [33] * len(acc), 100, 33, "cpu", curve_balanced=bal, curve_auc=auc,
                      final_balanced_acc=bal[-1], peak_balanced_acc=bal[peak_b], peak_balanced_epoch=peak_b + 1,
                      final_auc=auc[-1], peak_auc=max(auc), selected_epoch=chosen + 1, acc=acc[chosen],
                      balanced_acc=bal[chosen], auc=auc[chosen], selection="validation", n_val=8)


def _imbalanced_cert() -> dict:
    """A 25/8 test set: a protected model stuck near the majority class (high accuracy, balanced
    accuracy about 1/2) and one with a lower accuracy but more balanced accuracy, whose validation
    chose epoch 1 although its test peak is epoch 2 (the score uses the chosen epoch, the oracle the peak)."""
    clean = _run("none", [0.80, 0.85], [0.70, 0.80], [0.80, 0.90])
    stuck = _run("none", [0.76, 0.76], [0.50, 0.52], [0.55, 0.60])
    learns = _run("grayscale", [0.70, 0.72], [0.65, 0.70], [0.70, 0.75], chosen=0)
    metric, chance = score_basis([8, 25])
    cells = [cell_entry("erm", d, [r], [clean], chance, baseline_defense="none", metric=metric)
             for d, r in (("none", stuck), ("grayscale", learns))]
    recipe = get_recipe("quick", epochs=2)
    return build_certificate(
        recipe=recipe, trainings=parse_trainings("erm", recipe), defenses=["none", "grayscale"], seeds=[0],
        classes=["malignant", "normal"], cells=cells, device="cpu", wall_s=1.0, score_metric=metric,
        score_chance=chance, data={"test": {"per_class": [8, 25], "count": 33}},
    )


def test_certificate_scores_balanced_accuracy_on_an_imbalanced_test_set(tmp_path: Path) -> None:
    cert = _imbalanced_cert()
    assert cert["score_metric"] == "balanced_accuracy" and cert["score_chance"] == 0.5
    assert cert["chance"] == pytest.approx(25 / 33, abs=1e-4) and cert["chance_class"] == "normal"
    stuck, learns = cert["cells"]
    for entry in (stuck["protected"], stuck["clean"]):
        assert {"peak_balanced_acc", "final_balanced_acc", "peak_auc", "final_auc", "curve_balanced_acc",
                "curve_auc"} <= set(entry)
    assert stuck["protected"]["peak_balanced_acc"] == 0.52 and stuck["protected"]["final_auc"] == 0.6
    assert stuck["clean"]["curve_balanced_acc"] == [0.7, 0.8] and stuck["clean"]["peak_auc"] == 0.9
    assert stuck["protected"]["balanced_acc"] == 0.52 and stuck["protected"]["auc"] == 0.6
    assert stuck["effect"] == pytest.approx((0.8 - 0.52) / (0.8 - 0.5), abs=1e-4)
    assert stuck["score_metric"] == "balanced_accuracy" and stuck["balanced_accuracy_drop"] == pytest.approx(0.28)
    assert learns["protected"]["selected_epoch"] == 1 and learns["protected"]["peak_balanced_acc"] == 0.70
    assert learns["protected"]["balanced_acc"] == 0.65 and learns["protected"]["acc"] == 0.70
    assert learns["effect"] == pytest.approx((0.8 - 0.65) / (0.8 - 0.5), abs=1e-4)  # the chosen epoch, not the peak
    v = cert["verdict"]  # the best attacker by balanced accuracy, not by accuracy (which favours 'stuck')
    assert v["best_attacker"]["defense"] == "grayscale" and v["score"] == learns["effect"]  # one regime: equal
    assert v["score"] == pytest.approx((0.8 - 0.65) / (0.8 - 0.5), abs=1e-4) and v["reference"]["balanced_acc"] == 0.8
    assert v["best_attacker"]["balanced_acc"] == 0.65 and v["best_attacker"]["peak_balanced_acc"] == 0.70
    assert v["oracle"]["score"] == pytest.approx((0.8 - 0.7) / (0.8 - 0.5), abs=1e-4)  # from the test peaks
    assert v["smallest_effect"]["defense"] == "grayscale" and v["smallest_effect"]["effect"] == learns["effect"]
    assert v["score_metric"] == "balanced_accuracy" and v["score_chance"] == 0.5
    assert "clean-test balanced accuracy" in v["summary"] and "chance 50.0% = 1/K" in v["summary"]
    back = load_certificate(save_certificate(cert, tmp_path / "c.json"))
    assert back == json.loads(json.dumps(cert))
    md = report_markdown(cert)
    assert "the score uses **balanced accuracy**" in md and "protected balanced" in md
    assert "| erm | 52.0% (clean 80.0%) · 0.93 | 65.0% (clean 80.0%) · 0.50 |" in md
    assert "**Best attacker:** erm / grayscale" in md and "**Smallest effect:** erm / grayscale" in md
    assert "Oracle score (epochs chosen with the test labels, optimistic): 0.33" in md
    assert "| 52.0% | 0.600 | 85.0% | 80.0% | 0.900 |" in md  # stuck: balanced, AUC; clean: acc, balanced, AUC


def _strip_new(obj):
    """A certificate as an older version wrote it: none of the fields this version added."""
    new = {"peak_balanced_acc", "final_balanced_acc", "peak_auc", "final_auc", "curve_balanced_acc", "curve_auc",
           "peak_balanced_acc_std", "final_balanced_acc_std", "peak_auc_std", "final_auc_std", "peak_balanced_epoch",
           "score_metric", "score_chance", "score_chance_definition", "imbalance_rule", "balanced_accuracy_drop",
           "baseline_peak_balanced_acc", "baseline_peak_auc", "balanced_acc", "balanced_acc_std", "auc", "auc_std"}
    if isinstance(obj, dict):
        return {k: _strip_new(v) for k, v in obj.items() if k not in new}
    if isinstance(obj, list):
        return [_strip_new(v) for v in obj]
    return obj


def test_certificates_without_the_optional_metrics_render_and_old_ones_are_refused(tmp_path: Path) -> None:
    old = _strip_new(json.loads(json.dumps(_imbalanced_cert())))
    path = tmp_path / "old.json"
    path.write_text(json.dumps({**old, "schema": "protect.certificate/1"}))
    with pytest.raises(RecordError, match="older version.*run protect verify again"):
        load_certificate(path)  # version 1 meant other numbers (peaks, per-cell scores)
    path.write_text(json.dumps(old))
    cert = load_certificate(path)
    md = report_markdown(cert)
    assert "n/a" in md and "balanced accuracy**" not in md
    assert plot_curves(cert, tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert write_report(cert, tmp_path / "rep")["report"].is_file()
    # results saved before the new metrics load with them None; a certificate then names them missing
    legacy = CellResult.from_dict({k: v for k, v in _run("none", [0.5], [0.5], [0.5]).to_dict().items()
                                   if "balanced" not in k and "auc" not in k})
    assert not legacy.has_medical_metrics and legacy.peak_auc is None
    cell = cell_entry("erm", "none", [legacy], [legacy], 0.5, metric="balanced_accuracy")
    assert cell["effect"] is None and cell["protected"]["curve_auc"] is None
    recipe = get_recipe("quick", epochs=1)
    bare = build_certificate(recipe=recipe, trainings=parse_trainings("erm", recipe), defenses=["none"], seeds=[0],
                             classes=["a", "b"], cells=[cell], data={}, device="cpu", wall_s=1.0)
    assert bare["score_metric"] == "balanced_accuracy" and "older version" in bare["warnings"][0]


# -- end to end ------------------------------------------------------------------------------------
def _copy(dst: Path, counts: dict[str, dict[str, int]]) -> Path:
    for split, per_class in counts.items():
        for c, n in per_class.items():
            (dst / split / c).mkdir(parents=True)
            for f in sorted((BREAST / split / c).glob("*.png"))[:n]:
                shutil.copy(f, dst / split / c / f.name)
    return dst


def _verify(root: Path) -> dict:
    return vrun.verify_folder(root / "train", root / "test", root / "train", tier=get_recipe("quick", epochs=2),
                              trainings="erm", defenses="none", device="cpu", report_dir=root / "report",
                              cache_dir=False, progress=False, seeds=1)


def test_end_to_end_imbalanced_breastmnist_scores_balanced_accuracy(tmp_path: Path) -> None:
    """BreastMNIST samples made imbalanced like the real set (train 24/72, test 8/25 malignant/normal;
    the real test set is 27% malignant), the clean data as its own 'protected' copy, 2 epochs."""
    root = _copy(tmp_path, {"train": {"malignant": 24, "normal": 72}, "test": {"malignant": 8, "normal": 25}})
    cert = _verify(root)
    assert cert["data"]["test"]["per_class"] == [6, 20] and cert["data"]["validation"]["per_class"] == [2, 5]
    assert cert["score_metric"] == "balanced_accuracy" and cert["score_chance"] == 0.5
    assert cert["chance"] == pytest.approx(20 / 26, abs=1e-4)  # the majority rate of the scored images
    (cell,) = cert["cells"]
    for entry in (cell["protected"], cell["clean"]):
        for key in ("peak_balanced_acc", "final_balanced_acc", "peak_auc", "final_auc"):
            assert 0.0 <= entry[key] <= 1.0, (key, entry)
        assert len(entry["curve_balanced_acc"]) == len(entry["curve_auc"]) == len(entry["curve"]) == cert["epochs"]
        assert entry["peak_balanced_acc"] == max(entry["curve_balanced_acc"])
        assert entry["final_auc"] == entry["curve_auc"][-1]
        # the epoch validation chose (7 validation images), and the scored metrics at that epoch
        assert entry["selection"] == "validation" and entry["n_val"] == 7 and 1 <= entry["selected_epoch"] <= 2
        val_bal = entry["val_curve_balanced_acc"]  # chosen by the score metric: the first best epoch
        assert len(val_bal) == cert["epochs"] and entry["selected_epoch"] == val_bal.index(max(val_bal)) + 1
        assert entry["balanced_acc"] == entry["curve_balanced_acc"][entry["selected_epoch"] - 1]
        assert entry["acc"] == entry["curve"][entry["selected_epoch"] - 1]
        assert entry["auc"] == entry["curve_auc"][entry["selected_epoch"] - 1]
    expected = score(cell["clean"]["balanced_acc"], cell["protected"]["balanced_acc"], 0.5)
    assert cell["effect"] == (None if expected is None else pytest.approx(expected, abs=1e-4))
    saved = load_certificate(root / "report" / "certificate.json")
    assert saved["score_metric"] == "balanced_accuracy" and saved["verdict"]["score_metric"] == "balanced_accuracy"
    md = (root / "report" / "report.md").read_text()
    assert "the score uses **balanced accuracy**" in md and "protected AUC" in md
    assert (root / "report" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_end_to_end_balanced_breastmnist_scores_accuracy(tmp_path: Path) -> None:
    root = _copy(tmp_path, {"train": {"malignant": 48, "normal": 48}, "test": {"malignant": 16, "normal": 16}})
    cert = _verify(root)
    assert cert["score_metric"] == "accuracy" and cert["score_chance"] == cert["chance"] == 0.5
    assert cert["data"]["test"]["per_class"] == [13, 13] and cert["data"]["validation"]["per_class"] == [3, 3]
    (cell,) = cert["cells"]
    assert cell["protected"]["peak_auc"] is not None
    for entry in (cell["protected"], cell["clean"]):  # equal class sizes: balanced accuracy = accuracy
        assert entry["curve_balanced_acc"] == pytest.approx(entry["curve"], abs=1e-4)
        assert entry["selection"] == "validation" and entry["n_val"] == 6  # 3 of each class's 16
        val = entry["val_curve"]  # chosen by accuracy (the score metric here): the first best epoch
        assert len(val) == cert["epochs"] and entry["selected_epoch"] == val.index(max(val)) + 1
        assert entry["acc"] == entry["curve"][entry["selected_epoch"] - 1]
    expected = score(cell["clean"]["acc"], cell["protected"]["acc"], 0.5)
    assert cell["effect"] == (None if expected is None else pytest.approx(expected, abs=1e-4))
    assert "balanced accuracy**" not in (root / "report" / "report.md").read_text()


def test_best_answer_map_finds_the_renaming_an_attacker_with_labels_would_use() -> None:
    """A model that answers ``y + 1`` is renamed back exactly (exhaustive up to 8 classes, greedy
    with swaps above); a model right at least as often as any renaming keeps its own answers."""
    from verify.evaluation import EXACT_MAP_CLASSES, best_answer_map

    g = torch.Generator().manual_seed(0)
    for k in (2, 3, EXACT_MAP_CLASSES, 10):
        y = torch.randint(0, k, (400,), generator=g)
        pred = (y + 1) % k
        noisy = torch.rand(400, generator=g) < 0.2
        pred[noisy] = torch.randint(0, k, (int(noisy.sum()),), generator=g)
        m = best_answer_map(pred, y, k)
        assert m == tuple((j - 1) % k for j in range(k)), (k, m)
        assert best_answer_map(y, y, k) is None
        # a constant answer has balanced accuracy 1/K under any renaming (it only moves to the majority class)
        assert best_answer_map(torch.zeros_like(y), y, k, "balanced_accuracy") is None
    # a model above chance is scored as it is, whatever a renaming would win on these images (noise
    # on a small validation set; on the test set it would cost the attacker)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3])
    pred = torch.tensor([0, 0, 1, 1, 1, 1, 0, 0, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 3, 3])  # own 0.35, chance 0.4
    assert best_answer_map(pred, y, 4) == (0, 1, 3, 2)  # accuracy: own below the majority rate
    assert best_answer_map(pred, y, 4, "balanced_accuracy") is None  # own balanced 0.375 > 1/4
    # balanced accuracy weighs each class alike: 1 of 1 normal right against 2 of 3 pneumonia wrong
    y, pred = torch.tensor([0, 1, 1, 1]), torch.tensor([1, 0, 1, 1])
    assert best_answer_map(pred, y, 2, "accuracy") is None and best_answer_map(pred, y, 2, "balanced_accuracy") == (1, 0)


def test_remapped_answers_move_the_predictions_and_the_scores() -> None:
    from verify.evaluation import _scored, remapped

    y = torch.tensor([0, 0, 1, 1, 1])
    scores = torch.tensor([[0.2, -0.2], [-1.0, 1.0], [2.0, -2.0], [0.5, -0.5], [-0.3, 0.3]])
    ev = _scored(scores.argmax(1), scores, y, 2)
    flipped = remapped(ev, y, (1, 0))
    assert flipped.accuracy == pytest.approx(1 - ev.accuracy) and flipped.answer_map == (1, 0)
    assert flipped.auc == pytest.approx(1 - ev.auc)
    assert torch.equal(flipped.pred, 1 - ev.pred) and remapped(ev, y, None) is ev


def _log_odds(s1: torch.Tensor) -> torch.Tensor:
    """Two-class softmax log-odds of class-1 log-odds ``s1`` (as :func:`evaluate_metrics` gives)."""
    from verify.metrics import softmax_log_odds

    return softmax_log_odds(torch.stack([torch.zeros_like(s1), s1], 1))


def _best_cut(s: torch.Tensor, y: torch.Tensor) -> float:
    """Brute force: the best balanced accuracy of any threshold on ``s``."""
    best = 0.0
    for t in torch.cat([s.unique(), s.min().reshape(1) - 1]).tolist():
        pred = (s > t).long()
        best = max(best, balanced_accuracy(pred, y, 2))
    return best


def test_best_threshold_reads_a_decision_off_scores_that_rank_but_do_not_decide() -> None:
    """Two classes, 12 and 12 labelled images. A model that answers class 0 for everything but
    ranks the classes, the right way or inverted (a class-targeted poison's model), gets the cut
    a holder of the labels would choose, renamed when inverted; one that decides, or whose scores
    are too close to noise to trust (AUC within 2 null standard deviations of 1/2), keeps its own
    answers even where a cut would win on these images."""
    from verify.evaluation import _scored, auc_null_std, best_threshold, read_answers, remapped

    y = torch.tensor([0] * 12 + [1] * 12)
    g = torch.Generator().manual_seed(0)
    jitter = torch.rand(24, generator=g)
    for inverted in (False, True):
        s1 = -8.0 + (1 - y if inverted else y).double() * 2 + jitter  # all below 0: always class 0
        scores = _log_odds(s1.float())
        ev = _scored(scores.argmax(1), scores, y, 2)
        assert ev.balanced_accuracy == 0.5 and ev.auc == (0.0 if inverted else 1.0)
        amap, t, held_out = best_threshold(scores, y, "balanced_accuracy")
        assert amap == ((1, 0) if inverted else None)
        read = remapped(ev, y, amap, t)
        assert read.balanced_accuracy == 1.0 and read.threshold == t and read.auc == 1.0
        assert torch.equal(read.pred, (read.scores[:, 1] > t).long())
        # the validation answers are the held-out ones: each from a cut fitted without that image
        assert torch.equal(held_out, y)  # the groups are apart: every fold's cut separates them
        val = read_answers(ev, y, 2, "balanced_accuracy")
        assert (val.answer_map, val.threshold, val.balanced_accuracy) == (amap, t, 1.0) and torch.equal(val.pred, held_out)
        # the chosen cut is the nearest to 0 of the best ones: between the two groups, not beyond them
        lo, hi = (-(s1[y == 0]).min(), -(s1[y == 1]).max()) if inverted else (s1[y == 0].max(), s1[y == 1].min())
        assert float(lo) < t < float(hi)
    # a model that decides keeps its answers
    scores = _log_odds((y.float() * 2 - 1) + 0.1 * jitter.float())
    assert best_threshold(scores, y, "balanced_accuracy") is None and best_threshold(scores, y) is None
    # scores near noise: some cut wins by more than the margin here, but the AUC is within 2 sigma
    order = [1, 1, 1, 1, 0, 1, 0, 0, 1, 0, 1, 0, 1, 0, 0, 1, 0, 1, 0, 1, 0, 0, 1, 0]  # highest first; AUC 0.67
    yn = torch.tensor(order)
    s1 = -10.0 - torch.arange(24, dtype=torch.float64)  # all answered class 0, ranked as listed
    auc = binary_auc(s1, yn == 1)
    assert abs(auc - 0.5) < 2 * auc_null_std(12, 12) and _best_cut(s1, yn) - 0.5 > 0.1, auc
    assert best_threshold(_log_odds(s1.float()), yn, "balanced_accuracy") is None
    # the same ranking quality on 400 images is far from noise (sigma 0.029) and is read
    big = yn.repeat_interleave(17)[:400]
    sb = -10.0 - torch.arange(400, dtype=torch.float64) / 10
    assert best_threshold(_log_odds(sb.float()), big, "balanced_accuracy") is not None
    # where the best cut's interval holds the model's own threshold, it is the model's own: 0
    from verify.evaluation import _cut

    bal = lambda tp, tn, p: (tp / p.sum() + tn / (~p).sum()) / 2  # noqa: E731
    v, p = torch.tensor([-2.0, -1.0, 1.0, 2.0], dtype=torch.float64), torch.tensor([False, False, True, True])
    assert _cut(v, p, bal) == 0.0 and _cut(v + 5, p, bal) == 5.0  # else the midpoint
    assert best_threshold(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)) is None
    assert best_threshold(torch.zeros(4, 3), torch.tensor([0, 1, 2, 1])) is None  # not two classes
    with pytest.raises(ValueError, match="two classes"):
        remapped(_scored(torch.zeros(3, dtype=torch.long), torch.zeros(3, 3), torch.tensor([0, 1, 2]), 3), y[:3], None, 0.5)


def test_best_threshold_takes_the_best_cut_of_the_validation_images() -> None:
    """Against a brute-force search over every threshold: the chosen cut scores the best balanced
    accuracy there is on random collapsed-but-ranking scores (seeds 0-19)."""
    from verify.evaluation import _scored, best_threshold, remapped

    read_seeds = 0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        y = (torch.rand(60, generator=g) < 0.4).long()
        s1 = (-6.0 + 1.5 * y.double() * (1 if seed % 2 else -1) + torch.randn(60, generator=g, dtype=torch.float64))
        scores = _log_odds(s1.float())
        rule = best_threshold(scores, y, "balanced_accuracy")
        if rule is None:
            continue
        read = remapped(_scored(scores.argmax(1), scores, y, 2), y, *rule[:2])
        renamed_s1 = read.scores[:, 1].double()
        assert read.balanced_accuracy == pytest.approx(_best_cut(renamed_s1, y), abs=1e-9), seed
        read_seeds += 1
    assert read_seeds >= 15, read_seeds


def test_best_offsets_correct_a_many_class_model_that_answers_a_few_classes() -> None:
    """Ten classes; the model's scores know the classes but lean on two of them (its answers:
    about a third right). The offsets read off the labelled images undo the lean: held out (each
    image's answer from offsets fitted without it) well above the own answers, fitted close to the
    lean itself. A model that answers well is left alone, and a lean the held-out answers do not
    confirm (40 images of random scores) is not read. Measured on 1,000 images, seeds 0-7 (SSE41):
    own 0.30-0.33, held out 0.64-0.68, fitted leans -2.71 to -3.43 and -1.98 to -2.40; every fair
    and every noise case left alone."""
    from verify.evaluation import _scored, best_offsets, read_answers, remapped

    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 10, (1000,), generator=g)
        logits = torch.randn(1000, 10, generator=g) + 2.0 * F.one_hot(y, 10)
        fair = softmax_log_odds(logits)
        assert best_offsets(fair, y) is None  # answers as well as any offsets would
        logits[:, 0] += 3.0
        logits[:, 1] += 2.0
        scores = softmax_log_odds(logits)
        ev = _scored(logits.argmax(1), scores, y, 10)
        offsets, held_out = best_offsets(scores, y)
        assert ev.accuracy < 0.4 and float((held_out == y).double().mean()) > ev.accuracy + 0.25, seed
        assert offsets[0] - max(offsets[2:]) < -2.0 and offsets[1] - max(offsets[2:]) < -1.0, offsets
        read = read_answers(ev, y, 10)
        assert read.offsets == offsets and torch.equal(read.pred, held_out) and read.answer_map is None
        applied = remapped(ev, y, None, None, offsets)
        assert torch.equal(applied.pred, (torch.log(torch.sigmoid(scores.double())) + torch.tensor(offsets)).argmax(1))
        assert applied.auc == pytest.approx(ev.auc)  # a shift per class keeps every ranking
        noise = torch.randn(40, 10, generator=g)
        assert best_offsets(softmax_log_odds(noise), y[:40]) is None
    assert best_offsets(torch.zeros(3, 10), torch.tensor([0, 1, 2])) is None  # too few images
