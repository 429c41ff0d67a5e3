"""`protect verify`: train surrogate models on a protected folder and print a certificate."""

from __future__ import annotations

import json
import sys

import click


@click.command()
@click.argument("protected_dir", type=click.Path(file_okay=False))
@click.option("--test", "test_dir", type=click.Path(file_okay=False), help="Clean test images (same classes: class sub-folders or --test-labels); or --holdout.")
@click.option("--holdout", type=float, metavar="F",
              help="With --clean and no --test: hold out a keyed, stratified share F (e.g. 0.2) of the clean images "
                   "as the test set; their protected copies leave the training set.")
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
              help="quick: fastcnn ~10 epochs, fast AT with fastcnn_wide 40 epochs; standard: ResNet-18 40 epochs; "
                   "paper: the CUDA paper's recipe.")
@click.option("--training", "trainings", help="Regimes, e.g. erm,linf,l2 (linf4 = 4/255; l2@EPS); with --defenses, "
                                               "their full product.  [default: erm with every default defense, and linf]")
@click.option("--defenses", help="Breakers, e.g. none,grayscale,jpeg10,jpeg75,ueraser,coin (jpegQ: any JPEG quality).  [default: none,grayscale,jpeg10 "
                                 "and the breakers published against the method]")
@click.option("--method", help="The method that protected PROTECTED_DIR (default: read from its run record "
                               "PROTECTED_DIR.protect): the default grid adds its published breakers.")
@click.option("--seeds", type=int, help="Train every cell with N seeds; report mean and spread.  [default: 3 under "
                                        "2,000 training images, else 1]")
@click.option("--val", "val_dir", type=click.Path(file_okay=False),
              help="Validation images (same classes) that choose each cell's epoch.  [default: a keyed 20% of the "
                   "test images; the rest is scored]")
@click.option("--resolution", metavar="R,...|native",
              help="Attacker resolutions: train every attacker at each R x R (the shorter side resized to R, bilinear, "
                   "antialiased, then centre-cropped, as attackers' pipelines do; folders of mixed sizes certify) "
                   "and/or native; the headline is the lowest score over the resolutions.  [default: quick 32,64 where they "
                   "downscale, plus native for one size up to 64 px; standard 224 likewise]")
@click.option("--allow-overlap", is_flag=True,
              help="Accept test images whose pixels are also in the protected or clean folder (refused by default).")
@click.option("--model", help="Override the tier's surrogate model (e.g. resnet18, resnet20, fastcnn).")
@click.option("--epochs", type=int, help="Override the tier's epochs (and turn off the quick tier's small-set adaptation).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Train the cells here one after another, or each as a Ray task (one CPU, or one GPU with "
                   "--device cuda; RAY_ADDRESS, else a local Ray cluster; pip install 'protect[ray]').")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), help="Report folder (default PROTECTED_DIR.verify); finished cells are saved in its cells/ folder.")
@click.option("--baseline-per-defense", is_flag=True, help="Train the clean baseline under every defense too.")
@click.option("--max-per-class", type=int, help="Use only the first N images per class of the protected and clean "
                                                "folders, before --relabel (quick subsets); the test set stays whole.")
@click.option("--no-cache", is_flag=True, help="Retrain clean baselines even when cached.")
@click.option("--fresh", is_flag=True,
              help="Retrain every cell: ignore the finished cells an earlier run left in the report folder "
                   "(and the clean-baseline cache).")
@click.option("--json", "as_json", is_flag=True, help="Print the certificate as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def verify(protected_dir: str, test_dir: str | None, holdout: float | None, clean_dir: str | None, labels_csv: str | None,
           test_labels_csv: str | None, relabel: str | None, tier: str, trainings: str | None,
           defenses: str | None, method: str | None, seeds: int | None, val_dir: str | None, resolution: str | None, allow_overlap: bool, model: str | None,
           epochs: int | None, device: str, engine: str, report_dir: str | None, baseline_per_defense: bool,
           max_per_class: int | None, no_cache: bool, fresh: bool, as_json: bool, quiet: bool) -> None:
    """Certify PROTECTED_DIR: train surrogates on it and measure clean test accuracy.

    Each cell of the regime x defense grid trains a fresh model from scratch on the protected
    images; the epoch with the best score on the validation images is scored on the clean test
    images. The protection score compares the best attacker of all cells with plain training on the
    clean images (--clean), so adding an attacker can only lower it, with a 95% bootstrap interval;
    "inconclusive" when the interval contains 0. A cell's effect compares it with clean images under
    its own regime.
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
        labels_csv=labels_csv, test_labels_csv=test_labels_csv, engine=engine, val_dir=val_dir,
        allow_overlap=allow_overlap, method=method, holdout=holdout, resolution=resolution,
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
    balanced = cert.get("score_metric") == "balanced_accuracy"
    field = "balanced_acc" if balanced else "acc"
    multi = len(cert.get("resolutions") or ()) > 1
    click.echo(f"{'training':<10} {'defense':<10} " + (f"{'res':>6} " if multi else "")
               + f"{'protected':>9} {'epoch':>5} {'peak*':>6} {'balanced':>8} {'AUC':>5} {'clean':>6} {'effect':>6}")
    for cell in cert["cells"]:
        clean = cell.get("clean") or {}
        prot = cell["protected"]
        effect = cell.get("effect")
        auc = prot.get("auc")
        epoch = prot.get("selected_epoch")
        epoch = "-" if epoch is None else (str(epoch) if isinstance(epoch, int) else "/".join(map(str, epoch)))
        res = f"{(cell.get('attacker') or {}).get('resolution', 'native'):>6} " if multi else ""
        click.echo(f"{cell['training']:<10} {cell['defense']:<10} {res}{_pct(prot.get('acc')):>9} {epoch:>5} "
                   f"{_pct(prot.get('peak_acc')):>6} {_pct(prot.get('balanced_acc')):>8} "
                   f"{'  -  ' if auc is None else f'{auc:.3f}':>5} {_pct(clean.get(field)):>6} "
                   f"{'  -' if effect is None else f'{effect:6.2f}'}")
    click.echo("protected/clean: clean-test accuracy (%) at the epoch chosen on validation; peak*: the best "
               "epoch chosen with the test labels (optimistic); effect: against clean data under the same regime")
    chance = f"chance {_pct(cert.get('chance')).strip()} %: the majority-class rate of the test set"
    if cert.get("chance_class"):
        chance += f" (always answering '{cert['chance_class']}')"
    click.echo(chance)
    if balanced:
        click.echo(f"score metric: balanced accuracy (the test set is imbalanced), chance "
                   f"{_pct(cert.get('score_chance')).strip()} % = 1/K")
    verdict = cert.get("verdict") or {}
    best = verdict.get("best_attacker") or {}
    ref = verdict.get("reference") or {}
    if best:
        what = "balanced accuracy" if balanced else "accuracy"
        learner = (best.get("attacker") or {}).get("learner")
        res = (best.get("attacker") or {}).get("resolution")
        click.echo(f"best attacker: {best.get('training')} + {best.get('defense')}"
                   + (f" ({learner}{'' if res in (None, 'native') else f' at {res} px'})" if learner else "")
                   + f", {_pct(best.get(field)).strip()} % "
                   f"{what}" + (f" (clean reference, plain training: {_pct(ref.get(field)).strip()} %)" if ref else ""))
        small = verdict.get("smallest_effect") or {}
        if small.get("effect") is not None:
            click.echo(f"smallest effect: {small['training']} + {small['defense']}, effect {small['effect']:.2f}")
        for p in verdict.get("per_resolution") or []:
            pb = p.get("best_attacker") or {}
            score_text = "-" if p.get("score") is None else f"{p['score']:.2f}"
            click.echo(f"at {p['resolution']}{'' if p['resolution'] == 'native' else ' px'}: score {score_text}, "
                       f"best {pb.get('training')} + {pb.get('defense')} "
                       f"{_pct(pb.get(field)).strip()} % against clean "
                       f"{_pct(p.get('reference_balanced' if balanced else 'reference')).strip()} %"
                       + (f" (left out: {p['excluded']})" if p.get("excluded") else "")
                       + (" <- headline" if p["resolution"] == verdict.get("resolution") else ""))
        if verdict.get("score") is not None:
            ci = verdict.get("interval")
            ci_text = f" (95% interval {ci[0]:.2f} to {ci[1]:.2f})" if ci else ""
            head = "protection score" if verdict.get("conclusive") else "inconclusive: protection score"
            click.echo(f"verdict: {head} {verdict['score']:.2f}{ci_text} (1 = chance level, 0 = no protection)"
                       + ("" if verdict.get("conclusive") else f"; {verdict.get('inconclusive_reason')}"))
        else:
            click.echo(f"verdict: no protection score ({verdict.get('inconclusive_reason')})")
    breakers = cert.get("breakers") or {}
    if breakers.get("method"):
        line = f"breakers known against {breakers['method']}: {', '.join(breakers.get('known') or [])}"
        if breakers.get("left_out"):
            line += f"; not in this grid: {', '.join(breakers['left_out'])}"
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
