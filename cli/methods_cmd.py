"""``protect methods``: the registered protection methods, what each needs and what it measured.

For every method: its summary, paper and defaults (budgets as fractions of 255, ``eps=16/255``;
parameters chosen from the data or the machine as ``auto``, with what they resolve to here),
whether it needs labels, which pretrained weights it needs and whether they are here, the GPU
(optional for every method), the fewest images a fit accepts, and the fidelity and speed declared
from docs/BENCHMARKS.md (``Perturbation.measured``). ``--json`` keeps the raw values (floats).
"""

from __future__ import annotations

import json
from typing import Any

import click

GPU = "optional"
COMPOSE = ("compose methods with '+': --method cuda+uc runs UC on CUDA's output (parameters: --param uc.eps=8/255; "
           "a plain name goes to every stage that takes it)")


def method_rows() -> list[dict[str, Any]]:
    """One dict per registered method (what ``--json`` prints)."""
    import perturbations
    from perturbations.errors import ConfigError

    rows = []
    for name in perturbations.available():
        cls = perturbations.get(name)
        try:
            resolved = cls.resolve_params({})
        except ConfigError:
            resolved = cls.defaults()
        rows.append({"name": name, "summary": cls.summary, "paper": cls.paper,
                     "needs_labels": cls.needs_labels, "labels_note": cls.labels_note,
                     "defaults": cls.defaults(), "resolved_defaults": resolved,
                     "weights": cls.weights_info(), "gpu": GPU, "min_images": cls.min_images,
                     "measured": [dict(m) for m in cls.measured], "measured_note": cls.measured_note})
    return rows


def _short(x: float) -> str:
    """Two significant digits, never in exponent form (``0.35``, ``7.7``, ``130``)."""
    return f"{x:.0f}" if x >= 100 else f"{x:.2g}"


def _per_image(images_per_second: float) -> str:
    seconds = 1.0 / images_per_second
    if seconds < 1.0:
        return f"{_short(seconds * 1000)} ms per image ({images_per_second:g} images/s)"
    return f"{_short(seconds)} s per image ({images_per_second:g} images/s)"


def _defaults(row: dict[str, Any]) -> str:
    from perturbations.base import format_value

    parts = []
    for k, v in row["defaults"].items():
        here = row["resolved_defaults"].get(k)
        if v is None:
            parts.append(f"{k}=auto" + (f" (here: {format_value(here)})" if here is not None else ""))
        else:
            parts.append(f"{k}={format_value(v)}")
    return ", ".join(parts)


def _measured(m: dict[str, Any]) -> str:
    fidelity = f"PSNR {m['psnr_db']:.1f} dB" if m.get("psnr_db") is not None else "PSNR not measured"
    speed = _per_image(m["images_per_second"]) if m.get("images_per_second") else "time not measured"
    return f"{fidelity}, {speed}: {m['setting']}; {m['data']} [{m['source']}]"


def print_rows(rows: list[dict[str, Any]]) -> None:
    """The text listing of :func:`method_rows`."""
    for row in rows:
        click.echo(f"{row['name']}: {row['summary']}")
        click.echo(f"  paper: {row['paper']}")
        click.echo(f"  defaults: {_defaults(row)}")
        labels = "yes" if row["needs_labels"] else "no"
        click.echo(f"  needs labels: {labels}" + (f" ({row['labels_note']})" if row["labels_note"] else ""))
        w = row["weights"]
        click.echo(f"  weights: {w['needs']}")
        click.echo(f"  GPU: {row['gpu']} (every method runs on the CPU; --device cuda uses a GPU where there is one)")
        click.echo(f"  fewest images: {row['min_images']} for a fit; more later with --state RECORD")
        if not row["measured"]:
            click.echo("  measured: nothing yet")
        for m in row["measured"]:
            click.echo(f"  measured: {_measured(m)}")
        if row["measured_note"]:
            click.echo(f"  note: {row['measured_note']}")
    click.echo(COMPOSE)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def methods(as_json: bool) -> None:
    """List the protection methods: defaults, what each needs (labels, weights, images) and measured cost."""
    rows = method_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True, default=str))
        return
    print_rows(rows)
