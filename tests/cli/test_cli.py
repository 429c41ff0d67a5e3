"""The ``protect`` command: click's runner for the happy paths, ``main()`` for the error contract
(one line on stderr, no traceback, exit 2 for bad input, 1 when some files failed)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from tests.clitools import call_main

KEY_ENV = "PROTECT_KEY"


@pytest.fixture(autouse=True)
def no_key_in_environment(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv("PROTECT_DEBUG", raising=False)


@pytest.fixture(scope="module", autouse=True)
def real_process(tmp_path_factory):
    """The console script run for real on a missing folder, started before this module's other
    tests so that its slow start-up (importing torch) overlaps them."""
    tmp = tmp_path_factory.mktemp("real")
    script = Path(sys.executable).with_name("protect")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "cli.main"]
    env = {k: v for k, v in os.environ.items() if k not in (KEY_ENV, "PROTECT_DEBUG")}
    proc = subprocess.Popen([*command, "images", str(tmp / "missing"), str(tmp / "out"), "--key", "k" * 16],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, [str(a) for a in args], env={KEY_ENV: None, **(env or {})})


def assert_one_line_error(err: str, fragment: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and fragment in lines[0], err
    assert "Traceback" not in err


def images_run(in_dir: Path, out_dir: Path, *extra: str, key: str):
    result = invoke("images", in_dir, out_dir, "--key", key, *extra)
    assert result.exit_code == 0, result.output
    return result


# -- keygen and methods ----------------------------------------------------------------------
def test_keygen_prints_a_fresh_random_key():
    first, second = invoke("keygen"), invoke("keygen")
    assert first.exit_code == second.exit_code == 0
    assert re.fullmatch(r"[0-9a-f]{32}\n", first.stdout)
    assert first.stdout != second.stdout


def test_methods_lists_the_registry_with_defaults():
    result = invoke("methods")
    assert result.exit_code == 0
    assert result.stdout.startswith("cuda: ") and "defaults:" in result.stdout and "filter_size=auto" in result.stdout
    rows = json.loads(invoke("methods", "--json").stdout)
    cuda = next(r for r in rows if r["name"] == "cuda")
    assert cuda["needs_labels"] is True and cuda["defaults"]["padding"] == "zero"
    assert "Sadasivan" in cuda["paper"]


# -- images ----------------------------------------------------------------------------------
def test_images_with_each_key_source_gives_the_same_bytes(tmp_path, make_folder, test_key, keyring):
    inp = make_folder(per_class=2)
    key_file = tmp_path / "owner.key"
    key_file.write_text(test_key + "\n", encoding="utf-8")
    runs = {
        "key": invoke("images", inp, tmp_path / "a", "--key", test_key),
        "file": invoke("images", inp, tmp_path / "b", "--key-file", key_file),
        "env": invoke("images", inp, tmp_path / "c", env={KEY_ENV: test_key}),
    }
    for name, result in runs.items():
        assert result.exit_code == 0, (name, result.output)
        assert f"key fingerprint {keyring.fingerprint()}" in result.stdout
        assert "done 4, skipped 0" in result.stdout
    outputs = [{p.relative_to(d): p.read_bytes() for d in [tmp_path / n] for p in d.rglob("*.png")} for n in "abc"]
    assert len(outputs[0]) == 4 and outputs[0] == outputs[1] == outputs[2]


def test_images_json_summary(tmp_path, make_folder, test_key, keyring):
    inp = make_folder(per_class=3)
    result = images_run(inp, tmp_path / "out", "--json", key=test_key)
    summary = json.loads(result.stdout)
    assert (summary["total"], summary["done"], summary["failed"], summary["skipped"]) == (6, 6, 0, 0)
    assert summary["key_fingerprint"] == keyring.fingerprint() and summary["method"] == "cuda"
    assert summary["class_map"] == {"airplane": 0, "automobile": 1}
    assert summary["failures"] == [] and summary["psnr_mean"] > 10
    again = json.loads(images_run(inp, tmp_path / "out", "--json", key=test_key).stdout)
    assert (again["done"], again["skipped"]) == (0, 6)


def test_images_method_options_reach_the_method(tmp_path, make_folder, test_key):
    inp = make_folder(per_class=1)
    result = images_run(inp, tmp_path / "out", "--json", "--filter-size", "5", "--blur", "0.2",
                        "--padding", "faithful", "--param", "universal=true", key=test_key)
    params = json.loads(result.stdout)["params"]
    assert (params["filter_size"], params["blur"], params["padding"], params["universal"]) == (5, 0.2, "zero", True)


def test_some_failed_files_exit_1(tmp_path, make_folder, test_key, capsys):
    inp = make_folder(per_class=2)
    (inp / "airplane" / "broken.png").write_bytes(b"definitely not a png")
    code, out, err = call_main(capsys, "images", inp, tmp_path / "out", "--key", test_key)
    assert code == 1
    assert "failed 1" in out and "failed: airplane/broken.png: not a readable image" in out
    assert "airplane/broken.png" in err and "Traceback" not in err
    assert len(list((tmp_path / "out").rglob("*.png"))) == 4
    shown = invoke("inspect", tmp_path / "out")
    assert "run complete; 1 file(s) failed" in shown.stdout  # a rerun would not help: not "INCOMPLETE"


def test_jpeg_output_prints_a_warning(tmp_path, make_folder, test_key):
    from PIL import Image

    inp = make_folder(per_class=1)
    for f in list(inp.rglob("*.png")):
        with Image.open(f) as im:
            im.save(f.with_suffix(".jpg"), quality=95)
        f.unlink()
    result = images_run(inp, tmp_path / "out", key=test_key)
    assert "warning: 2 output(s) written as JPEG" in result.stdout and "--format png" in result.stdout
    converted = images_run(inp, tmp_path / "png", "--format", "png", key=test_key)
    assert "JPEG" not in converted.stdout
    assert sorted(p.name for p in (tmp_path / "png").rglob("*")) == ["0000.png", "0000.png", "airplane", "automobile"]


# -- the error contract ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "case, fragment",
    [
        ("unknown method", "unknown method 'nope'"),
        ("no key", "no key"),
        ("two keys", "several keys given (--key, --key-file)"),
        ("out inside in", "must not be, contain, or lie inside"),
        ("missing input", "input folder not found"),
        ("filter size 4", "filter size must be an odd integer"),
        ("mix 0", "mix must be in (0, 1]"),
        ("labels missing", "label file not found"),
        ("bad option", "No such option"),
        ("bad format", "'gif' is not one of"),
        ("bad param", "expected NAME=VALUE"),
        ("unknown param", "has no parameter colour"),
        ("batch size 0", "0 is not in the range x>=1"),
        ("jpeg quality 0", "JPEG quality must be in 1..100"),
        ("unknown device", "unknown device 'tpu'"),
    ],
)
def test_every_error_is_one_line_and_exit_2(tmp_path, make_folder, test_key, capsys, case, fragment):
    inp = make_folder(per_class=1)
    out = tmp_path / "out"
    key_file = tmp_path / "k"
    key_file.write_text(test_key, encoding="utf-8")
    base = ["images", inp, out, "--key", test_key]
    args = {
        "unknown method": [*base, "--method", "nope"],
        "no key": ["images", inp, out],
        "two keys": [*base, "--key-file", key_file],
        "out inside in": ["images", inp, inp / "protected", "--key", test_key],
        "missing input": ["images", tmp_path / "nope", out, "--key", test_key],
        "filter size 4": [*base, "--filter-size", "4"],
        "mix 0": [*base, "--mix", "0"],
        "labels missing": [*base, "--labels", tmp_path / "nope.csv"],
        "bad option": [*base, "--bogus"],
        "bad format": [*base, "--format", "gif"],
        "bad param": [*base, "--param", "universal"],
        "unknown param": [*base, "--param", "colour=1"],
        "batch size 0": [*base, "--batch-size", "0"],
        "jpeg quality 0": [*base, "--jpeg-quality", "0"],
        "unknown device": [*base, "--device", "tpu"],
    }[case]
    code, stdout, err = call_main(capsys, *args)
    assert code == 2
    assert_one_line_error(err, fragment)
    assert stdout == ""
    assert not out.exists() and not (inp / "protected").exists() and not (tmp_path / "out.protect").exists()


# -- inspect ---------------------------------------------------------------------------------
@pytest.fixture
def protected(tmp_path, make_folder, test_key):
    out = tmp_path / "out"
    images_run(make_folder(per_class=2), out, key=test_key)
    return out


def test_inspect_shows_method_fingerprint_and_fidelity(protected, keyring):
    result = invoke("inspect", protected)
    assert result.exit_code == 0, result.output
    assert "4 image(s) protected with cuda" in result.stdout
    assert f"key fingerprint: {keyring.fingerprint()}" in result.stdout
    assert "PSNR mean" in result.stdout and "run complete" in result.stdout
    info = json.loads(invoke("inspect", protected, "--json").stdout)
    assert info["method"] == "cuda" and info["files"] == 4 and info["complete"] is True
    assert info["key_fingerprint"] == keyring.fingerprint()


def test_inspect_check_detects_a_modified_output(protected):
    ok = invoke("inspect", protected, "--check")
    assert ok.exit_code == 0 and "outputs intact" in ok.stdout
    victim = sorted(protected.rglob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")
    bad = invoke("inspect", protected, "--check")
    assert bad.exit_code == 1 and "0 output(s) missing, 1 changed" in bad.stdout
    info = json.loads(invoke("inspect", protected, "--check", "--json").stdout)
    assert info["check"]["changed"] == [str(victim.relative_to(protected))]
    sorted(protected.rglob("*.png"))[1].unlink()
    assert "1 output(s) missing, 1 changed" in invoke("inspect", protected, "--check").stdout


def test_inspect_says_whether_a_key_matches(protected, test_key):
    right = invoke("inspect", protected, "--key", test_key)
    assert right.exit_code == 0 and "(matches the given key)" in right.stdout
    wrong = invoke("inspect", protected, "--key", "some-other-key-123456")
    assert wrong.exit_code == 0 and "does NOT match the given key" in wrong.stdout
    assert json.loads(invoke("inspect", protected, "--json", "--key", "some-other-key-123456").stdout)["key_matches"] is False


def test_inspect_without_a_record_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    code, _, err = call_main(capsys, "inspect", tmp_path / "plain")
    assert code == 2
    assert_one_line_error(err, "no run record")


def test_a_damaged_manifest_is_one_line_exit_2(protected, capsys):
    (protected.parent / "out.protect" / "manifest.json").write_text("{torn", encoding="utf-8")
    code, _, err = call_main(capsys, "inspect", protected)
    assert code == 2
    assert_one_line_error(err, "manifest.json")


def test_an_internal_error_has_its_own_exit_code(tmp_path, capsys, monkeypatch):
    """A bug is not a user's mistake: exit 3 (not 1, which means some images failed), one line."""
    import protect

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(protect, "inspect_run", broken)
    code, _, err = call_main(capsys, "inspect", tmp_path)
    assert code == 3
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("internal error: ZeroDivisionError: a bug"), err


def test_memory_option(tmp_path, make_folder, test_key, capsys):
    inp = make_folder(per_class=2)
    code, _, err = call_main(capsys, "images", inp, tmp_path / "o", "--key", test_key, "--memory", "lots")
    assert code == 2
    assert_one_line_error(err, "memory size")
    code, out, _ = call_main(capsys, "images", inp, tmp_path / "o", "--key", test_key, "--memory", "64MB", "--json")
    assert code == 0 and json.loads(out)["done"] == 4


# -- last, so that the real process had the whole module to start up -------------------------
def test_error_contract_in_a_real_process(real_process):
    proc = real_process
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("error: input folder not found")
    assert "Traceback" not in stderr
