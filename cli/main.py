"""The ``protect`` command: thin click commands over the library.

Every error is one line on stderr and a non-zero exit code:
0 success; 1 some images failed (the rest were written), or ``inspect --check`` found changed
outputs; 2 bad input or option; 3 internal error (a bug: rerun with PROTECT_DEBUG=1 and report
it); 130 interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from perturbations.errors import ProtectError

from .common import setup_logging, with_key

EXIT_FAILED_FILES, EXIT_ERROR, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 2, 3, 130


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="protect", prog_name="protect")
def cli() -> None:
    """Turn image folders into unlearnable datasets, and certify that it worked.

    The key comes from exactly one of --key, --key-file or the PROTECT_KEY environment variable.
    """


@cli.command()
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False),
              help="Write the key to this new file, readable by you only (0600); never overwrites.")
def keygen(output: str | None) -> None:
    """Make a fresh random 128-bit key: `protect keygen -o owner.key` (keep it secret)."""
    from protect.keys import generate_key, write_key_file

    key = generate_key()
    if output is None:
        click.echo(key)
        return
    path = write_key_file(output, key)
    click.echo(f"wrote a new key to {path} (mode 0600); keep it secret and keep a copy: without it the "
               "protected images cannot be reproduced or extended", err=True)


def _floor(value: str) -> float | str:
    """``--max-delta-e``: a number, ``auto`` (the default) or ``off``."""
    if value.lower() in ("auto", "off", "none"):
        return "off" if value.lower() == "none" else value.lower()
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a number, 'auto' or 'off'", param_hint="--max-delta-e") from None


def _parse_params(pairs: tuple[str, ...]) -> dict[str, Any]:
    from perturbations.base import parse_assignments

    try:
        return parse_assignments(pairs)
    except ProtectError as exc:
        raise click.BadParameter(str(exc), param_hint="--param") from None


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=str), metavar="IN_DIR|FILE...")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=str))
@with_key
@click.option("--method", help="Protection method (see `protect methods`); default: the recorded method on a rerun, "
                               "else cuda for labelled images that are not colour photos, and the label-free uc for photos and folders without labels; compose with '+': cuda+uc applies UC to CUDA's output.")
@click.option("--labels", "labels_csv", type=click.Path(dir_okay=False), help="CSV 'path,label' for an input folder without class sub-folders.")
@click.option("--filter-size", type=int, help="CUDA: odd filter size k (default: 3 below 128 px, else 9).")
@click.option("--blur", type=float, help="CUDA: off-peak filter bound p_b (default follows the filter size).")
@click.option("--padding", type=click.Choice(["reflect", "replicate", "zero", "faithful"]), help="CUDA: border handling (default zero = the paper's code, strongest; reflect leaves no dark border).")
@click.option("--mix", type=float, help="CUDA: fraction of images protected, chosen by the key.")
@click.option("--clusters", type=click.IntRange(min=1), help="UC: number of clusters K (default 10). CUDA: label-agnostic CUDA, one filter per surrogate cluster.")
@click.option("--surrogate", metavar="SPEC", help="UC / clustered CUDA: feature extractor: clip:ARCH[/PRETRAINED] (default: clip:RN50/openai where its weights are on this machine, else the bundled cifar-resnet20), cifar-resnet20|32|44|56[:PATH] (resnet20 bundled), torchvision:NAME:PATH, random:ARCH.")
@click.option("--surrogate-weights", type=click.Path(dir_okay=False), help="Local weights file for --surrogate (nothing is downloaded offline).")
@click.option("--eps", metavar="BOUND", help="UC / SALM / waves: L-inf bound of the perturbation, e.g. 16/255 (UC's and waves' default), 8/255 (SALM's) or 0.03.")
@click.option("--mask-ratio", type=float, help="SALM: share of pixel positions perturbed per image (default 0.1; 1 = dense error-minimising noise).")
@click.option("--robust", metavar="RHO", help="UC / SALM: robust perturbations against adversarial training of radius RHO, e.g. 4/255 (slower fit; default off).")
@click.option("--state", "state_from", type=click.Path(file_okay=False), help="Reuse the fitted method of a finished run (its record folder, e.g. out.protect) with the same key: new images join its clusters.")
@click.option("--param", "extra", multiple=True, metavar="NAME=VALUE", help="Any other method parameter; STAGE.NAME=VALUE for one stage of a composed method.")
@click.option("--format", "out_format", type=click.Choice(["keep", "png"]), default="keep", show_default=True, help="Output format: keep each file's own, or write PNG.")
@click.option("--jpeg-quality", type=int, help="Quality of JPEG outputs (default: each input's own quality and chroma subsampling, estimated from its tables; a given quality writes 4:4:4).")
@click.option("--max-delta-e", metavar="DE|off", default="auto",
              help="Fidelity floor: scale back each image's change until its low-frequency colour difference "
                   "(CIELAB dE, blurred) is at most DE (2.3 is about just noticeable); the scale is noted per image. "
                   "Default: 2 for the photo default (no --method; no labels, or labelled colour photos), off otherwise; off: no floor.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), help="Worker processes (default: the CPU cores; with --engine ray: the cluster's).")
@click.option("--memory", metavar="SIZE", help="Image working memory of all workers together, e.g. 2GB (default: a quarter of RAM, at most 1.5GB).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where the images are protected: worker processes here, or Ray actors (RAY_ADDRESS, else a "
                   "local Ray cluster; pip install 'protect[ray]').")
@click.option("--record", "record_dir", type=click.Path(file_okay=False), help="Private run record folder (default OUT_DIR.protect).")
@click.option("--overwrite", is_flag=True, help="Redo every image instead of resuming.")
@click.option("--prune", is_flag=True, help="Delete outputs whose input was removed or now fails (only if unchanged).")
@click.option("--strict", is_flag=True, help="Stop at the first unreadable image.")
@click.option("--max-pixels", type=click.IntRange(min=1), help="Largest image accepted (decompression-bomb guard).")
@click.option("--allow-reprotect", is_flag=True, help="Protect images that are already the output of a protect run (refused otherwise).")
@click.option("--preview", type=click.IntRange(min=1), metavar="N",
              help="Protect only N images (spread over the folder) into a temporary folder and write a "
                   "before/after/difference sheet OUT_DIR.preview.png; nothing is written to OUT_DIR.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or warnings.")
def images(inputs: tuple[str, ...], out_dir: str, key: str | None, key_file: str | None, method: str, labels_csv: str | None,
           filter_size: int | None, blur: float | None, padding: str | None, mix: float | None, clusters: int | None,
           surrogate: str | None, surrogate_weights: str | None, eps: str | None, mask_ratio: float | None,
           robust: str | None, state_from: str | None,
           extra: tuple[str, ...],
           out_format: str, jpeg_quality: int | None, max_delta_e: str, device: str, batch_size: int,
           workers: int | None, memory: str | None, engine: str, record_dir: str | None, overwrite: bool, prune: bool, strict: bool, max_pixels: int | None,
           allow_reprotect: bool, preview: int | None, as_json: bool,
           quiet: bool) -> None:
    """Protect every image under IN_DIR (or the image FILEs given) into OUT_DIR (same names, same formats)."""
    from protect import ProtectOptions, load_keyring, protect_folder
    from protect.engine import parse_size
    from protect.imageio import DEFAULT_MAX_PIXELS

    setup_logging(quiet or as_json)
    keyring = load_keyring(key, key_file)
    if surrogate_weights:
        surrogate_weights = os.path.abspath(surrogate_weights)
    params = {"filter_size": filter_size, "blur": blur, "padding": padding, "mix": mix, "clusters": clusters,
              "surrogate": surrogate, "surrogate_weights": surrogate_weights, "eps": eps,
              "mask_ratio": mask_ratio, "robust": robust}
    params = {k: v for k, v in params.items() if v is not None} | _parse_params(extra)
    options = ProtectOptions(
        method=method, params=params, labels_csv=labels_csv, out_format=out_format, device=device,
        batch_size=batch_size, workers=workers, memory=parse_size(memory) if memory else None, engine=engine,
        record_dir=record_dir, state_from=state_from, fit_progress=_FitBars(quiet or as_json), overwrite=overwrite, prune=prune, strict=strict,
        max_pixels=max_pixels or DEFAULT_MAX_PIXELS, jpeg_quality=jpeg_quality, max_delta_e=_floor(max_delta_e),
        progress=not quiet,
        allow_reprotect=allow_reprotect, on_phase=None if (quiet or as_json) else _phase_line,
    )

    def bar(total: int) -> Any:
        from tqdm import tqdm

        return tqdm(total=total, unit="img", desc="protect", disable=quiet or as_json or None,
                    file=sys.stderr, dynamic_ncols=True)

    source = inputs[0] if len(inputs) == 1 and os.path.isdir(inputs[0]) else list(inputs)
    if preview is not None:
        from protect.preview import preview_folder

        try:
            shown = preview_folder(source, out_dir, keyring, options, preview)
        finally:
            options.fit_progress.close()  # type: ignore[union-attr]
        if as_json:
            _echo_json(shown)
            return
        click.echo(f"preview: {len(shown['images'])} image(s) protected with {shown['method']}"
                   + (f" (fitted on these {len(shown['images'])} only; the whole run fits on every image)"
                      if shown["fitted_on"] else ""))
        click.echo(f"  fidelity: mean PSNR {shown['psnr_mean']:.2f} dB, mean SSIM {shown['ssim_mean']:.3f}, mean "
                   f"low-frequency colour difference dE {shown['delta_e_mean']:.2f} (2.3 is just noticeable)")
        click.echo(f"  sheet: {shown['sheet']} (original, protected, difference x8, 1:1 centre crops)")
        click.echo(f"  nothing was written to {out_dir}: run the same command without --preview to protect the folder")
        return
    try:
        summary = protect_folder(source, out_dir, keyring, options, on_start=bar)
    finally:
        options.fit_progress.close()  # type: ignore[union-attr]
    if as_json:
        _echo_json(summary.to_dict())
    else:
        _print_summary(summary)
    if summary.failed:
        sys.exit(EXIT_FAILED_FILES)


def _phase_line(line: str) -> None:
    """One line on stderr as a phase of the run starts or ends (safe beside a progress bar)."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


class _FitBars:
    """One progress bar per stage of a method's fit (features, optimisation, ...), on a terminal."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.bar, self.stage = quiet, None, ""

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if stage != self.stage or self.bar is None:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=f"fit: {stage}", unit="", file=sys.stderr, dynamic_ncols=True,
                            disable=None)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _print_summary(s: Any) -> None:
    from perturbations.base import format_params

    click.echo(f"protected {s.out_dir} with {s.method} (key fingerprint {s.key_fingerprint}) "
               f"in {s.seconds:.1f} s ({s.images_per_second:.0f} images/s on {s.device}, {s.workers} worker(s))")
    if s.method_note:
        click.echo(f"  method: {s.method} ({s.method_note})")
    if s.fit_seconds >= 0.5:
        click.echo(f"  fitted the method in {s.fit_seconds:.1f} s before protecting")
    click.echo(f"  done {s.done}, skipped {s.skipped} (already protected), failed {s.failed}, of {s.total}"
               + (f"; pruned {s.pruned} orphaned output(s)" if s.pruned else "")
               + (f"; {s.unread} file(s) not read (see the warnings)" if s.unread else ""))
    if s.psnr_mean is not None:
        click.echo(f"  fidelity: mean PSNR {s.psnr_mean:.2f} dB, mean SSIM {s.ssim_mean:.3f}"
                   + ("" if s.delta_e_mean is None else f", mean low-frequency colour difference dE {s.delta_e_mean:.2f}"
                      " (2.3 is just noticeable)"))
    click.echo(f"  parameters: {format_params(s.params, skip=('size_rule',))}")
    for note in s.notes:
        click.echo(f"  note: {note}")
    click.echo(f"  private record: {s.record_dir} (keep it; do not publish it)")
    for warning in s.warnings:
        click.echo(f"  warning: {warning}")
    for rel, reason in s.failures:
        click.echo(f"  failed: {rel}: {reason}")


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--record", "record_dir", type=click.Path(file_okay=False), help="Run record folder (default OUT_DIR.protect).")
@click.option("--check", is_flag=True, help="Re-hash every output and report missing or changed files.")
@with_key
@click.option("--json", "as_json", is_flag=True)
def inspect(out_dir: str, record_dir: str | None, check: bool, key: str | None, key_file: str | None, as_json: bool) -> None:
    """Show what was done to OUT_DIR: method, parameters, key fingerprint, fidelity."""
    from protect import inspect_run, load_keyring

    keyring = load_keyring(key, key_file) if (key or key_file) else None
    info = inspect_run(out_dir, record_dir, check_files=check, keyring=keyring)
    if as_json:
        _echo_json(info)
    else:
        click.echo(f"{info['out_dir']}: {info['files']} image(s) protected with {info['method']} ({info['paper']})")
        click.echo(f"  key fingerprint: {info['key_fingerprint']}"
                   + ("" if keyring is None else ("  (matches the given key)" if info["key_matches"] else "  (does NOT match the given key)")))
        params = ", ".join(f"{k}={v}" for k, v in (info["params"] or {}).items() if k != "size_rule")
        click.echo(f"  parameters: {params}")
        if info["class_map"]:
            click.echo(f"  classes ({info['label_source']}): {', '.join(info['class_map'])}")
        if info["psnr_mean"] is not None:
            click.echo(f"  fidelity: PSNR mean {info['psnr_mean']:.2f} dB (min {info['psnr_min']:.2f}), "
                       f"SSIM mean {info['ssim_mean']:.3f} (min {info['ssim_min']:.3f})"
                       + ("" if info.get("delta_e_mean") is None else
                          f", low-frequency colour dE mean {info['delta_e_mean']:.2f} (max {info['delta_e_max']:.2f})"))
        if info.get("max_delta_max") is not None:
            click.echo(f"  as written: largest change {info['max_delta_max']} level(s)"
                       + (f"; JPEG quality {info['quality_min']}" + (f"-{info['quality_max']}" if info["quality_max"] != info["quality_min"] else "")
                          + (f", {'/'.join(info['subsampling'])}" if info.get("subsampling") else "")
                          if info.get("quality_min") is not None else ""))
        click.echo(f"  run {'complete' if info['complete'] else 'INCOMPLETE: rerun the same command to resume'}"
                   + (f"; {len(info['failures'])} file(s) failed" if info["failures"] else ""))
        if info["orphans"]:
            click.echo(f"  {len(info['orphans'])} orphaned output(s) (input removed or now failing; "
                       "`protect images ... --prune` deletes them):")
            for o in info["orphans"][:20]:
                click.echo(f"    {o.get('output')}: {o.get('reason')}")
            if len(info["orphans"]) > 20:
                click.echo(f"    ... and {len(info['orphans']) - 20} more (see --json)")
        if check:
            c = info["check"]
            click.echo("  outputs intact" if c["ok"] else f"  {len(c['missing'])} output(s) missing, {len(c['changed'])} changed")
    if check and not info["check"]["ok"]:
        sys.exit(EXIT_FAILED_FILES)


from .verify_cmd import verify  # noqa: E402
from .import_cmd import import_npz  # noqa: E402
from .tune_cmd import tune  # noqa: E402
from .methods_cmd import methods  # noqa: E402

cli.add_command(verify)
cli.add_command(import_npz)
cli.add_command(tune)
cli.add_command(methods)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the click group and turn every error into one line."""
    debug = bool(os.environ.get("PROTECT_DEBUG"))
    try:
        cli.main(args=argv, prog_name="protect", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:  # click turns Ctrl-C inside a command into Abort
        click.echo("interrupted: rerun the same command to resume", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        hint = ""
        ctx = getattr(exc, "ctx", None)
        if ctx is not None:
            hint = f" (see `{ctx.command_path} --help`)"
        click.echo(f"error: {exc.format_message()}{hint}".replace("\n", " "), err=True)
        sys.exit(EXIT_ERROR)
    except ProtectError as exc:
        click.echo(f"error: {exc}".replace("\n", " "), err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted: rerun the same command to resume", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: never a traceback
        if debug:
            raise
        click.echo(f"internal error: {exc.__class__.__name__}: {exc} (a bug: rerun with PROTECT_DEBUG=1 for "
                   "details and report it)".replace("\n", " "), err=True)
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":
    main()
