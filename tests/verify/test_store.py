"""verify.store: the keys of saved cells and baselines, atomic files, unreadable files ignored."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from perturbations.errors import RecordError
from verify import defenses
from verify.data import TensorSet
from verify.recipes import get_recipe, parse_training
from verify.store import BaselineCache, CellStore, cell_key
from verify.train import CellResult


def _set(tag: str) -> TensorSet:
    return TensorSet(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"], Path("/x"),
                     tag * 64, ["a/0.png", "b/0.png"])


def _result(seed: int = 0) -> CellResult:
    return CellResult("erm", "none", seed, [0.25, 0.5], 0.5, 0.5, 2, 0.75, 0.6, 1.5, 2, [0.7, 0.8], [4, 4], 2, 4, "cpu")


def test_cell_key_covers_everything_that_determines_a_cell() -> None:
    train, test, recipe = _set("a"), _set("b"), get_recipe("quick", epochs=2)
    linf, none = parse_training("linf", recipe), defenses.get("none")
    base = cell_key(train, test, recipe, linf, none, 0, role="protected")
    variants = {
        "train data": cell_key(_set("c"), test, recipe, linf, none, 0, role="protected"),
        "test data": cell_key(train, _set("c"), recipe, linf, none, 0, role="protected"),
        "recipe field": cell_key(train, test, get_recipe("quick", epochs=3), linf, none, 0, role="protected"),
        "attack mode": cell_key(train, test, get_recipe("quick", epochs=2, attack_eval_mode=True), linf, none, 0,
                                role="protected"),
        "grad clip": cell_key(train, test, get_recipe("quick", epochs=2, grad_clip=5.0), linf, none, 0,
                              role="protected"),
        "eps": cell_key(train, test, recipe, parse_training("linf4", recipe), none, 0, role="protected"),
        "regime": cell_key(train, test, recipe, parse_training("l2", recipe), none, 0, role="protected"),
        "defense": cell_key(train, test, recipe, linf, defenses.get("grayscale"), 0, role="protected"),
        "defense parameter": cell_key(train, test, recipe, linf, defenses.get("jpeg10", quality=20), 0,
                                      role="protected"),
        "seed": cell_key(train, test, recipe, linf, none, 1, role="protected"),
        "role": cell_key(train, test, recipe, linf, none, 0, role="clean"),
    }
    assert len(set(variants.values()) | {base}) == len(variants) + 1, variants
    # ... and nothing else: the free-text description and a fresh but equal recipe give the same key
    same = get_recipe("quick", epochs=2, description="another text")
    assert cell_key(train, test, same, linf, defenses.get("none"), 0, role="protected") == base
    jpeg = cell_key(train, test, recipe, linf, defenses.get("jpeg10"), 0, role="protected")
    assert cell_key(train, test, recipe, linf, defenses.get("jpeg10", quality=10), 0, role="protected") == jpeg


def test_cell_store_round_trip_and_damaged_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)  # whatever level an earlier test (a CLI run) left on the root logger
    store = CellStore(tmp_path / "cells")
    assert store.get("k" * 64) is None
    store.put("k" * 64, _result(), {"role": "protected", "cached": False})
    result, meta = store.get("k" * 64)
    assert result == _result() and meta == {"role": "protected", "cached": False}
    assert [p.name for p in (tmp_path / "cells").iterdir()] == ["k" * 40 + ".json"]  # no temporary files left
    blob = json.loads((tmp_path / "cells" / ("k" * 40 + ".json")).read_text())
    assert blob["schema"] == "protect.verify-cell/1" and blob["key"] == "k" * 64
    # a half-written or foreign file is ignored with a warning (the cell is trained again)
    (tmp_path / "cells" / ("j" * 40 + ".json")).write_text('{"key": "jjj')
    (tmp_path / "cells" / ("i" * 40 + ".json")).write_text(json.dumps({**blob, "key": "i" * 63 + "x"}))
    assert store.get("j" * 64) is None and store.get("i" * 64) is None
    assert "ignoring unreadable saved cell" in caplog.text
    assert CellStore(None).get("k" * 64) is None
    CellStore(None).put("k" * 64, _result(), {})  # keeps nothing
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(RecordError, match="cannot save a finished cell"):
        CellStore(blocked / "cells").put("k" * 64, _result(), {})


def test_baseline_cache_counts_and_keeps_its_key_layout(tmp_path: Path) -> None:
    train, test, recipe = _set("a"), _set("b"), get_recipe("quick", epochs=2)
    erm = parse_training("erm", recipe)
    key = BaselineCache.key(train, test, recipe, erm, "none", 0)
    assert key == cell_key(train, test, recipe, erm, "none", 0)  # shared by every run, not per report
    assert key != cell_key(train, test, recipe, erm, defenses.get("none"), 0, role="clean")
    cache = BaselineCache(tmp_path)
    assert cache.get(key) is None and (cache.hits, cache.misses) == (0, 1)
    cache.put(key, _result(), {"tier": "quick"})
    assert cache.get(key) == _result() and (cache.hits, cache.misses) == (1, 1)
    off = BaselineCache(None)
    assert off.get(key) is None and (off.hits, off.misses) == (0, 0)


def test_results_of_older_versions_are_never_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Version 2 results carry balanced accuracy and AUC; a cell or baseline saved under version 1
    (without them) has another key, so it is trained again instead of reused."""
    import verify.store as vstore

    train, test, recipe = _set("a"), _set("b"), get_recipe("quick", epochs=2)
    erm = parse_training("erm", recipe)
    assert vstore.CACHE_VERSION >= 2
    new_keys = (cell_key(train, test, recipe, erm, "none", 0),
                cell_key(train, test, recipe, erm, defenses.get("none"), 0, role="clean"))
    monkeypatch.setattr(vstore, "CACHE_VERSION", 1)
    old_keys = (cell_key(train, test, recipe, erm, "none", 0),
                cell_key(train, test, recipe, erm, defenses.get("none"), 0, role="clean"))
    old = CellResult.from_dict({k: v for k, v in _result().to_dict().items() if "balanced" not in k and "auc" not in k})
    BaselineCache(tmp_path / "cache").put(old_keys[0], old)
    CellStore(tmp_path / "cells").put(old_keys[1], old, {})
    monkeypatch.undo()
    assert set(new_keys).isdisjoint(old_keys)
    assert BaselineCache(tmp_path / "cache").get(new_keys[0]) is None
    assert CellStore(tmp_path / "cells").get(new_keys[1]) is None
    assert old.peak_balanced_acc is None and not old.has_medical_metrics  # old files still parse
