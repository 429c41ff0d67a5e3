"""Keys: the three sources, scrypt stretching, per-purpose streams, the public fingerprint."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from perturbations import Keyring
from protect import KeyMaterialError
from protect.keys import ENV_VAR, _stretch, derive_keyring, generate_key, load_keyring, resolve_key

SECRET = "an-owner-secret-0001"
OTHER = "an-owner-secret-0002"


# -- where the key comes from ----------------------------------------------------------------
def test_key_from_option():
    assert resolve_key(key=SECRET, environ={}) == SECRET


def test_key_from_file_first_non_empty_line_stripped(tmp_path):
    path = tmp_path / "owner.key"
    path.write_text(f"\n   \n  {SECRET}  \t\nsecond-line-ignored\n", encoding="utf-8")
    assert resolve_key(key_file=path, environ={}) == SECRET
    assert resolve_key(key_file=str(path), environ={}) == SECRET


def test_key_from_environment():
    assert resolve_key(environ={ENV_VAR: f" {SECRET}\n"}) == SECRET


def test_empty_environment_variable_is_no_key():
    with pytest.raises(KeyMaterialError, match="no key"):
        resolve_key(environ={ENV_VAR: ""})


def test_no_key_is_an_error():
    with pytest.raises(KeyMaterialError, match="no key.*--key.*--key-file.*PROTECT_KEY"):
        resolve_key(environ={})


@pytest.mark.parametrize(
    "sources, names",
    [
        ({"key": SECRET, "key_file": "k"}, ["--key", "--key-file"]),
        ({"key": SECRET, "env": True}, ["--key", ENV_VAR]),
        ({"key_file": "k", "env": True}, ["--key-file", ENV_VAR]),
    ],
)
def test_two_sources_is_an_error_naming_them(tmp_path, sources, names):
    key_file = None
    if "key_file" in sources:
        key_file = tmp_path / "k"
        key_file.write_text(OTHER, encoding="utf-8")
    environ = {ENV_VAR: OTHER} if sources.get("env") else {}
    with pytest.raises(KeyMaterialError) as err:
        resolve_key(key=sources.get("key"), key_file=key_file, environ=environ)
    for name in names:
        assert name in str(err.value)


def test_missing_key_file(tmp_path):
    with pytest.raises(KeyMaterialError, match="not found"):
        resolve_key(key_file=tmp_path / "nope.key", environ={})


def test_empty_key_file(tmp_path):
    path = tmp_path / "empty.key"
    path.write_text(" \n\n\t\n", encoding="utf-8")
    with pytest.raises(KeyMaterialError, match="empty"):
        resolve_key(key_file=path, environ={})


def test_load_keyring_uses_the_one_source(tmp_path):
    path = tmp_path / "owner.key"
    path.write_text(SECRET + "\n", encoding="utf-8")
    assert load_keyring(key_file=path, environ={}).fingerprint() == derive_keyring(SECRET).fingerprint()


# -- what the key gives ----------------------------------------------------------------------
def test_same_secret_same_fingerprint_and_draws():
    a, b = derive_keyring(SECRET), derive_keyring(SECRET)
    assert a.fingerprint() == b.fingerprint()
    assert torch.equal(torch.rand(16, generator=a.generator("cuda/filters")),
                       torch.rand(16, generator=b.generator("cuda/filters")))


def test_different_secret_different_fingerprint_and_draws():
    a, b = derive_keyring(SECRET), derive_keyring(OTHER)
    assert a.fingerprint() != b.fingerprint()
    assert not torch.equal(torch.rand(16, generator=a.generator("cuda/filters")),
                           torch.rand(16, generator=b.generator("cuda/filters")))


def test_purposes_give_independent_streams():
    ring = derive_keyring(SECRET)
    draws = {p: torch.rand(64, generator=ring.generator(p)) for p in ("cuda/filters", "uc/init", "cuda/mix")}
    assert not torch.equal(draws["cuda/filters"], draws["uc/init"])
    assert not torch.equal(draws["cuda/filters"], draws["cuda/mix"])
    assert len({ring.seed(p) for p in draws}) == 3
    # a fresh generator for the same purpose replays the stream exactly
    assert torch.equal(draws["uc/init"], torch.rand(64, generator=ring.generator("uc/init")))


def test_unit_depends_on_item_not_order():
    ring = Keyring.from_seed(3)
    first = [ring.unit("cuda/mix", f"a/{i}.png") for i in range(20)]
    assert [ring.unit("cuda/mix", f"a/{i}.png") for i in reversed(range(20))] == first[::-1]
    assert all(0.0 <= u < 1.0 for u in first) and len(set(first)) == 20


def test_fingerprint_reveals_neither_key_nor_kdf_output():
    ring = derive_keyring(SECRET)
    fp = ring.fingerprint()
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    material = _stretch(SECRET)
    assert SECRET not in fp and fp not in SECRET
    assert fp not in material.hex() and material.hex()[:16] != fp
    assert SECRET not in repr(ring) and material.hex() not in repr(ring)
    assert fp in repr(ring)


def test_short_key_logs_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="protect.keys"):
        derive_keyring("short")
    assert any("shorter than 12" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="protect.keys"):
        derive_keyring(SECRET)
    assert not caplog.records


def test_empty_secret_is_refused():
    with pytest.raises(KeyMaterialError):
        derive_keyring("")


def test_generate_key_is_32_hex_chars_and_random():
    keys = {generate_key() for _ in range(20)}
    assert len(keys) == 20
    assert all(re.fullmatch(r"[0-9a-f]{32}", k) for k in keys)
