"""The default surrogate of UC and clustered CUDA: CLIP RN50/openai where its weights are on the
machine, else the bundled cifar-resnet20, chosen when the parameters are resolved (issue 17)."""

from __future__ import annotations

import time

import pytest

import perturbations
from perturbations import Keyring, WeightsError
from perturbations.surrogates import BUNDLED_DEFAULT, CLIP_DEFAULT, default_surrogate, load_surrogate


@pytest.fixture
def no_clip(tmp_path, monkeypatch):
    """Empty Hugging Face and open_clip URL caches, offline (the default mode)."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def test_without_clip_weights_the_bundled_surrogate_is_chosen_fast_and_says_why(no_clip):
    start = time.monotonic()
    spec, reason = default_surrogate()
    assert time.monotonic() - start < 2
    assert spec == BUNDLED_DEFAULT == "cifar-resnet20"
    assert reason == ("surrogate: cifar-resnet20 (bundled; CLIP RN50/openai weights not found locally, "
                      "see --surrogate-weights)")


def test_clip_weights_in_either_cache_choose_clip(no_clip, monkeypatch):
    url_cache = no_clip / "home" / ".cache" / "clip"
    url_cache.mkdir(parents=True)
    (url_cache / "RN50.pt").write_bytes(b"stand-in")
    spec, reason = default_surrogate()
    assert spec == CLIP_DEFAULT == "clip:RN50/openai" and "found locally" in reason
    (url_cache / "RN50.pt").unlink()
    # the Hugging Face cache layout: models--ORG--NAME/{refs/main, snapshots/REV/FILE}
    repo = no_clip / "hf" / "models--timm--resnet50_clip.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "open_clip_model.safetensors").write_bytes(b"stand-in")
    assert default_surrogate()[0] == CLIP_DEFAULT


def test_a_weights_file_or_allowed_downloads_keep_clip(no_clip, monkeypatch):
    assert default_surrogate("RN50.pt")[0] == CLIP_DEFAULT
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    spec, reason = default_surrogate()
    assert spec == CLIP_DEFAULT and "HF_HUB_OFFLINE=0" in reason


def test_the_declared_rn50_entry_is_open_clips():
    import open_clip

    from perturbations.clip import RN50_OPENAI

    cfg = open_clip.get_pretrained_cfg("RN50", "openai")
    assert {k: cfg[k] for k in RN50_OPENAI} == RN50_OPENAI


def test_resolved_parameters_hold_the_concrete_spec(no_clip):
    uc = perturbations.get("uc")
    assert uc.defaults()["surrogate"] is None
    assert uc.resolve_params({})["surrogate"] == "cifar-resnet20"
    assert uc.resolve_params({"surrogate": "random:tiny"})["surrogate"] == "random:tiny"
    assert uc.resolve_params({"surrogate_weights": "RN50.pt"})["surrogate"] == "clip:RN50/openai"
    cuda = perturbations.get("cuda")
    assert cuda.resolve_params({})["surrogate"] is None  # class-wise CUDA takes no surrogate
    assert cuda.resolve_params({"clusters": 4})["surrogate"] == "cifar-resnet20"
    chain = perturbations.get("cuda+uc").resolve_params({"clusters": 4})
    assert chain["cuda.surrogate"] == chain["uc.surrogate"] == "cifar-resnet20"
    assert perturbations.get("cuda+uc").resolve_params({})["cuda.surrogate"] is None


def test_the_method_says_why_its_surrogate_was_chosen(no_clip):
    cls = perturbations.get("uc")
    method = cls(Keyring.from_seed(0), **cls.resolve_params({}))
    assert method.surrogate_choice.startswith("surrogate: cifar-resnet20 (bundled;")
    assert method.notes() == [method.surrogate_choice]
    assert cls(Keyring.from_seed(0)).surrogate_choice == method.surrogate_choice  # built directly: the same
    given = cls(Keyring.from_seed(0), surrogate="random:tiny")
    assert given.surrogate_choice == "surrogate: random:tiny (as given)"
    cuda = perturbations.get("cuda")
    assert cuda(Keyring.from_seed(0)).surrogate_choice is None and cuda(Keyring.from_seed(0)).notes() == []
    clustered = cuda(Keyring.from_seed(0), clusters=3)
    assert clustered.clusters.spec == "cifar-resnet20" and "bundled" in clustered.surrogate_choice
    chain = perturbations.get("cuda+uc")
    notes = chain(Keyring.from_seed(0), **chain.resolve_params({"clusters": 3})).notes()
    assert notes == [f"cuda: {clustered.surrogate_choice}", f"uc: {clustered.surrogate_choice}"]


def test_missing_clip_weights_name_the_options_that_work_offline(no_clip):
    with pytest.raises(WeightsError) as e:
        load_surrogate("clip:RN50/openai")
    msg = str(e.value)
    assert "\n" not in msg
    assert "--surrogate cifar-resnet20" in msg and "--surrogate-weights FILE" in msg
    assert "open_clip.create_model" not in msg  # no Python one-liner to type


def test_a_label_free_run_without_clip_weights_uses_the_bundled_surrogate(no_clip, make_folder, keyring):
    from protect import ProtectOptions, protect_folder
    from protect.record import RunRecord

    inp = make_folder(classes=2, per_class=2)
    out = no_clip / "out"
    summary = protect_folder(inp, out, keyring, ProtectOptions(method="uc", params={"steps": 2, "batch": 2},
                                                               workers=1))
    assert summary.failed == 0 and summary.done == 4
    assert summary.params["surrogate"] == "cifar-resnet20"
    assert summary.fit_report["surrogate"].startswith("surrogate: cifar-resnet20 (bundled;")
    header = RunRecord.find(no_clip / "out.protect").header
    assert header["params"]["surrogate"] == "cifar-resnet20"  # the concrete spec, not "auto"


def test_declared_measurements_cite_a_docs_section_that_holds_their_psnr():
    """The numbers ``protect methods`` prints are declared, not parsed: check they match the docs."""
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[2] / "docs" / "BENCHMARKS.md").read_text(encoding="utf-8")
    headings = [line.lstrip("#").strip() for line in docs.splitlines() if line.startswith("#")]
    for name in perturbations.available():
        for m in perturbations.get(name).measured:
            prefix, _, section = m["source"].partition(": ")
            assert prefix == "docs/BENCHMARKS.md", m
            for part in section.split(" / "):
                assert any(h.startswith(part) for h in headings), (name, part)
            if m["psnr_db"] is not None:
                assert f"{m['psnr_db']:.1f}" in docs, (name, m)
