"""`protect verify`: train surrogate models on a protected folder and print a certificate."""

from __future__ import annotations

import json
import sys

import click


@click.command()
@click.argument("protected_dir", type=click.Path(file_okay=False))
@click.option("--test", "test_dir", required=True, type=click.Path(file_okay=False), help="Clean test images (same classes: class sub-folders or --test-labels).")
@click.option("--clean", "clean_dir", type=click.Path(file_okay=False), help="Clean training images: trains the baselines and gives the score.")
@click.option("--labels", "labels_csv", type=click.Path(dir_okay=False), metavar="CSV",
              help="CSV 'path,label' for protected and clean folders without class sub-folders (the file given "
                   "to `protect images --labels`; it labels both, paths relative to each folder).")
@click.option("--test-labels", "test_labels_csv", type=click.Path(dir_okay=False), metavar="CSV",
              help="CSV 'path,label' for a test folder without class sub-folders.")
@click.option("--relabel", metavar="MAP",
              help="Train and score the attacker on other labels, in all three sets: a JSON file "
                   "{\"class\": \"attacker class\"} mapping every class (e.g. samples/cifar10/coarse.json), or "
                   "random:N[:SEED], the classes dealt at random into N non-empty groups "
                   "(2 <= N < number of classes; SEED 0 by default).")
@click.option("--tier", type=click.Choice(["quick", "standard", "paper"]), default="quick", show_default=True,
              help="quick: fastcnn ~10 epochs, fast AT; standard: ResNet-18 40 epochs; paper: the CUDA paper's recipe.")
@click.option("--training", "trainings", help="Regimes, e.g. erm,linf,l2 (linf4 = 4/255; l2@EPS).  [default: erm,linf]")
@click.option("--defenses", help="Breakers, e.g. none,grayscale,jpeg10,ueraser,coin.  [default: none,grayscale,jpeg10]")
@click.option("--seeds", type=int, default=1, show_default=True, help="Train every cell with N seeds; report mean and spread.")
@click.option("--model", help="Override the tier's surrogate model (e.g. resnet18, resnet20, fastcnn).")
@click.option("--epochs", type=int, help="Override the tier's epochs (and turn off the quick tier's small-set adaptation).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Train the cells here one after another, or each as a Ray task (one CPU, or one GPU with "
                   "--device cuda; RAY_ADDRESS, else a local Ray cluster; pip install 'protect[ray]').")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), help="Report folder (default PROTECTED_DIR.verify); finished cells are saved in its cells/ folder.")
@click.option("--baseline-per-defense", is_flag=True, help="Train the clean baseline under every defense too.")
@click.option("--max-per-class", type=int, help="Use only the first N images per class of the data, before --relabel (quick subsets).")
@click.option("--no-cache", is_flag=True, help="Retrain clean baselines even when cached.")
@click.option("--fresh", is_flag=True,
              help="Retrain every cell: ignore the finished cells an earlier run left in the report folder "
                   "(and the clean-baseline cache).")
@click.option("--json", "as_json", is_flag=True, help="Print the certificate as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def verify(protected_dir: str, test_dir: str, clean_dir: str | None, labels_csv: str | None,
           test_labels_csv: str | None, relabel: str | None, tier: str, trainings: str | None,
           defenses: str | None, seeds: int, model: str | None, epochs: int | None, device: str, engine: str,
           report_dir: str | None, baseline_per_defense: bool, max_per_class: int | None, no_cache: bool,
           fresh: bool, as_json: bool, quiet: bool) -> None:
    """Certify PROTECTED_DIR: train surrogates on it and measure clean test accuracy.

    Each cell of the regime x defense grid trains a fresh model from scratch on the protected
    images and evaluates it every epoch on the clean test set; the verdict uses the best attacker.
    Finished cells are saved in the report folder as they finish: after an interruption, the same
    command trains only the missing ones (--fresh retrains everything). Progress: a bar per cell on
    a terminal, a line when a cell starts and ends otherwise (logs, CI); either way a line per phase
    and, after every cell, the run's total (cells done, elapsed, estimated time left).

    Labels come from class sub-folders, or from --labels / --test-labels CSV files. With --relabel
    the attacker trains and is scored on remapped labels (chance, baselines and scores too): a test
    of label-agnostic protections such as Unlearnable Clusters; the certificate records the map.
    """
    from verify import distributed
    from verify.run import verify_folder

    cert = verify_folder(
        protected_dir, test_dir, clean_dir, tier=tier, trainings=trainings, defenses=defenses, seeds=seeds,
        model=model, epochs=epochs, device=device, report_dir=report_dir,
        cache_dir=False if no_cache else None, baseline_per_defense=baseline_per_defense,
        max_per_class=max_per_class, progress=not (quiet or as_json), fresh=fresh, relabel=relabel,
        labels_csv=labels_csv, test_labels_csv=test_labels_csv, engine=engine,
    )
    if not distributed.is_main():  # under torchrun only rank 0 reports
        return
    if as_json:
        click.echo(json.dumps(cert, indent=2, sort_keys=True, default=str))
        return
    _print_certificate(cert)


def _pct(v: float | None) -> str:
    return "  -  " if v is None else f"{100 * v:5.1f}"


def _print_certificate(cert: dict) -> None:
    click.echo(f"tier {cert['tier']}: {cert['model']}, {cert['epochs']} epochs, seeds {cert['seeds']}"
               + (" (adversarial training uses fast FGSM-RS AT)" if cert.get("fast_at") else ""))
    labelling = cert.get("labelling") or {}
    if labelling.get("attacker") == "remapped":
        src = labelling.get("source") or {}
        origin = src.get("path") if src.get("kind") == "file" else f"{src.get('spec')} (seed {src.get('seed')})"
        click.echo(f"labels: remapped by {origin} to {len(labelling['classes'])} attacker classes "
                   f"({', '.join(labelling['classes'])}); chance, baselines and scores use them")
    click.echo(f"{'training':<10} {'defense':<10} {'protected peak':>14} {'final':>6} {'balanced':>8} {'AUC':>5} "
               f"{'clean peak':>10} {'balanced':>8} {'score':>6}")
    for cell in cert["cells"]:
        clean = cell.get("clean") or {}
        prot = cell["protected"]
        score = cell.get("score")
        auc = prot.get("peak_auc")
        click.echo(f"{cell['training']:<10} {cell['defense']:<10} {_pct(prot['peak_acc']):>14} "
                   f"{_pct(prot['final_acc']):>6} {_pct(prot.get('peak_balanced_acc')):>8} "
                   f"{'  -  ' if auc is None else f'{auc:.3f}':>5} {_pct(clean.get('peak_acc')):>10} "
                   f"{_pct(clean.get('peak_balanced_acc')):>8} {'  -' if score is None else f'{score:6.2f}'}")
    chance = f"chance {_pct(cert.get('chance')).strip()} %: the majority-class rate of the test set"
    if cert.get("chance_class"):
        chance += f" (always answering '{cert['chance_class']}')"
    click.echo(chance)
    if cert.get("score_metric") == "balanced_accuracy":
        click.echo(f"score metric: balanced accuracy (the test set is imbalanced), chance "
                   f"{_pct(cert.get('score_chance')).strip()} % = 1/K")
    verdict = cert.get("verdict") or {}
    best = verdict.get("best_attacker") or {}
    if best:
        line = (f"verdict: the best attacker ({best.get('training')} + {best.get('defense')}) reached "
                f"{_pct(best.get('peak_acc')).strip()} % clean test accuracy")
        if verdict.get("score_metric") == "balanced_accuracy":
            line += f", {_pct(best.get('peak_balanced_acc')).strip()} % balanced accuracy"
        if verdict.get("score") is not None:
            line += f"; protection score {verdict['score']:.2f} (1 = chance level, 0 = no protection)"
        click.echo(line)
    for warning in cert.get("warnings", []):
        click.echo(f"warning: {warning}", err=True)
    for difference in (cert.get("reference") or {}).get("differences", []):
        click.echo(f"note: differs from the reference recipe: {difference}", err=True)
    resume = cert.get("resume") or {}
    if resume.get("reused"):
        click.echo(f"resumed: {resume['reused']} finished cell(s) reused, {resume.get('trained', 0)} trained "
                   "(--fresh retrains all)")
    if cert.get("report_dir"):
        click.echo(f"report: {cert['report_dir']}")
    sys.stdout.flush()
