"""The ``protect import-npz`` command: a MedMNIST-style npz file to PNG class folders."""

from __future__ import annotations

import click


@click.command("import-npz")
@click.argument("npz_file", type=click.Path(dir_okay=False, path_type=str))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--class-names", metavar="A,B,...",
              help="Folder name of each label number, in label order (default: the numbers).")
def import_npz(npz_file: str, out_dir: str, class_names: str | None) -> None:
    """Write the images of NPZ_FILE (train/val/test images and labels) as
    OUT_DIR/<split>/<class>/<split>_<index>.png, ready for `protect images`."""
    from protect.npz import import_npz as run

    names = class_names.split(",") if class_names is not None else None
    counts = run(npz_file, out_dir, names)
    parts = ", ".join(f"{split} {n}" for split, n in counts.items())
    click.echo(f"wrote {sum(counts.values())} image(s) to {out_dir} ({parts})")
