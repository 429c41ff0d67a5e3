"""The ``protect tune`` command: the fidelity/strength frontier of candidate protections on a
subset, and optionally the chosen one applied to the folder."""

from __future__ import annotations

import json
import sys

import click

from .common import setup_logging, with_key


@click.command("tune")
@click.argument("in_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--test", "test_dir", type=click.Path(file_okay=False),
              help="Clean test images with the same classes: class folders or --test-labels (what the attacker "
                   "is scored on); or --holdout.")
@click.option("--holdout", type=float, metavar="F",
              help="No test folder: certify each candidate with a keyed share F (e.g. 0.2) of the subset's "
                   "originals held out as its test set (protect verify --holdout).")
@click.option("--resolution", metavar="R,...|native",
              help="Attacker resolutions (as protect verify --resolution): subsets of mixed sizes certify; each "
                   "candidate's score is its lowest over the resolutions.")
@with_key
@click.option("--min-psnr", type=float, help="Fidelity floor in dB: candidates below it are not certified or chosen.")
@click.option("--max-delta-e", type=float, metavar="DE",
              help="Fidelity floor (as protect images --max-delta-e): every candidate, and --apply, is protected "
                   "with each image's change scaled back until its low-frequency colour difference is at most DE.")
@click.option("--candidate", "candidates", multiple=True, metavar="METHOD[:NAME=VALUE,...]",
              help="A point to try, e.g. cuda:blur=0.15 or cuda+uc:uc.eps=8/255 (repeat; default: a built-in grid "
                   "of CUDA, UC, CUDA+UC and SALM settings).")
@click.option("--per-class", type=click.IntRange(min=1), default=100, show_default=True,
              help="Images per class in the subset the candidates are tried on.")
@click.option("--surrogate", default="cifar-resnet20", show_default=True, metavar="SPEC",
              help="Feature extractor of the built-in UC candidates.")
@click.option("--tier", default="quick", show_default=True, help="Attacker recipe (protect verify --tier).")
@click.option("--training", "trainings", default="erm", show_default=True, help="Attacker trainings, e.g. erm,linf.")
@click.option("--defenses", default="none", show_default=True, help="Breakers, e.g. none,jpeg10.")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), help="Override the tier's epochs (a faster, rougher search).")
@click.option("--labels", "labels_csv", type=click.Path(dir_okay=False), help="CSV 'path,label' instead of class folders.")
@click.option("--test-labels", "test_labels_csv", type=click.Path(dir_okay=False), metavar="CSV",
              help="CSV 'path,label' for a test folder without class sub-folders (as for protect verify).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--workers", type=click.IntRange(min=1), help="Worker processes for protecting.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="Tune folder: subset, candidates, tune.json/tune.md/frontier.png (default IN_DIR.tune); a rerun resumes.")
@click.option("--apply", "apply_to", type=click.Path(file_okay=False), metavar="OUT_DIR",
              help="Protect the whole IN_DIR into OUT_DIR with the chosen candidate.")
@click.option("--json", "as_json", is_flag=True, help="Print the tune report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
def tune(in_dir: str, test_dir: str | None, holdout: float | None, resolution: str | None, key: str | None, key_file: str | None, min_psnr: float | None,
         max_delta_e: float | None, candidates: tuple[str, ...], per_class: int, surrogate: str, tier: str, trainings: str, defenses: str,
         seeds: int, epochs: int | None, labels_csv: str | None, test_labels_csv: str | None, device: str,
         workers: int | None, report_dir: str | None, apply_to: str | None, as_json: bool, quiet: bool) -> None:
    """Try candidate protections on a subset of IN_DIR and report the frontier of fidelity (PSNR)
    against strength (verdict score); with --apply, protect IN_DIR with the strongest candidate
    above --min-psnr. Refusals come before anything is written; a run that fails before its report
    removes the folders it created."""
    from protect import load_keyring
    from verify.tune import table, tune_folder

    setup_logging(quiet or as_json)
    keyring = load_keyring(key, key_file)

    def say(text: str) -> None:
        if not (quiet or as_json):
            click.echo(text, err=True)

    result = tune_folder(in_dir, test_dir, keyring, list(candidates) or None, min_psnr=min_psnr,
                         per_class=per_class, surrogate=surrogate, tier=tier, trainings=trainings,
                         defenses=defenses, seeds=seeds, epochs=epochs, device=device, workers=workers,
                         report_dir=report_dir, labels_csv=labels_csv, test_labels_csv=test_labels_csv,
                         apply_to=apply_to, progress=say, holdout=holdout, resolution=resolution,
                         max_delta_e=max_delta_e)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(table(result), nl=False)
        click.echo(f"report: {result['report_dir']}/tune.md, frontier.png")
        if result["chosen"] is None:
            click.echo("no candidate reached the floor with a score")
        else:
            chosen = result["candidates"][result["chosen"]]
            floor = result.get("max_delta_e")
            click.echo(f"chosen: {chosen['candidate']} (PSNR {chosen['psnr']:.1f} dB, score {chosen['score']:.2f}); "
                       f"protect with: protect images --method {chosen['method']}"
                       + "".join(f" --param {k}={v}" for k, v in chosen["params"].items())
                       + ("" if floor is None else f" --max-delta-e {floor:g}"))
    if apply_to is not None and result.get("applied", {}).get("failed"):
        sys.exit(1)
