"""The attacker's training resolution as a dimension of the grid.

Every attacker's pipeline first brings the images to the size it trains at (``Resize`` of the
shorter side and a centre crop, :data:`verify.data.RESIZE_RULE`), and that resize is the first
defense a protection meets: a perturbation made at 768 px and downscaled 12x to 64 px keeps only
what survives the low-pass. So ``--resolution 32,64,native`` certifies at each size.

**Parsing** (:func:`parse_resolutions`): a comma list of sizes in pixels (at least 8) and
``native`` (the images as they are), deduplicated, sizes ascending, ``native`` last.

**Defaults** (:func:`default_resolutions`, from the image sizes of the protected folder read from
the file headers, nothing decoded): the quick tier trains at 32 and 64 px, the standard and paper
tiers at 224 px, each only where it is a downscale (an attacker does not upscale a set to train on
it; a size equal to a uniform square native size is the native size), plus ``native`` when every
image shares one size whose longer side is at most the tier's largest resolution (64 quick, 224
standard). So CIFAR-10 and MedMNIST keep certifying at their own size only, and a photo folder of
mixed sizes certifies at 32 and 64 px in the quick tier.

**The headline over resolutions** (:func:`combine_resolutions`). Accuracies at different sizes
are not comparable (an attacker at 64 px learns more from clean images than one at 32 px), so each
resolution is scored as its own grid against its own clean ERM reference at that resolution, and the
headline is the **lowest** of the resolutions' scores: the protection is what the best attacker at
the best size for the attacker leaves. Adding a resolution or a cell can only lower it. Its 95 %
interval is a joint bootstrap (:func:`verify.uncertainty.bootstrap_min_interval`): every replicate
resamples the same test images (the same paths at every resolution, in one order) once and takes the
minimum of the resolutions' scores, so it is the interval of the headline itself. A resolution whose
clean reference is within :data:`verify.certificate.WEAK_BASELINE_MARGIN` of chance shows nothing
either way and is left out of the minimum (listed with its reason).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from .certificate import WEAK_BASELINE_MARGIN, verdict_sentence
from .data import RESIZE_RULE
from perturbations.errors import ConfigError

__all__ = ["TIER_RESOLUTIONS", "combine_resolutions", "default_resolutions", "excluded_reason", "parse_resolutions",
           "resolution_entry", "resolution_label"]

#: Per tier: the attacker resolutions of the default grid and the largest native size trained as is.
TIER_RESOLUTIONS: dict[str, tuple[tuple[int, ...], int]] = {
    "quick": ((32, 64), 64),
    "standard": ((224,), 224),
    "paper": ((224,), 224),
}
NATIVE_RULE = "the images as they are"
RESOLUTION_RULE = (
    "the headline is the lowest of the attacker resolutions' scores, each resolution's best attacker against "
    "the clean ERM reference trained at that resolution; its interval is a joint bootstrap over the same test "
    "images at every resolution"
)


def resolution_label(size: int | None) -> str:
    """``None`` -> ``"native"``; 64 -> ``"64"`` (the attacker spec's ``resolution``)."""
    return "native" if size is None else str(int(size))


def parse_resolutions(value: int | str | Sequence[int | str | None] | None) -> list[int | None] | None:
    """``"32,64,native"`` -> ``[32, 64, None]`` (sizes ascending, native last, no repeats); None -> None
    (the tier's default). ConfigError, one line, for anything else."""
    if value is None:
        return None
    items: list[Any]
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, Sequence):
        items = list(value)
    else:
        raise ConfigError(f"--resolution must be sizes in pixels and/or native (e.g. 32,64,native), got {value!r}")
    sizes: set[int] = set()
    native = False
    for item in items:
        if item is None or (isinstance(item, str) and item.lower() == "native"):
            native = True
            continue
        try:
            size = int(str(item).strip()) if not isinstance(item, bool) else 0
        except ValueError:
            size = 0
        if size < 8:
            raise ConfigError(f"--resolution must be sizes in pixels (at least 8, e.g. 64) and/or native, got {item!r}")
        sizes.add(size)
    if not sizes and not native:
        raise ConfigError("--resolution is empty: give sizes in pixels and/or native (e.g. 32,64)")
    return [*sorted(sizes), *([None] if native else [])]


def default_resolutions(tier: str, sizes: Sequence[tuple[int, int]] | None) -> list[int | None]:
    """The tier's attacker resolutions for images of these (width, height) ``sizes`` (see the module
    doc); ``[None]`` (native) when the sizes are unknown (a DICOM folder) or the tier has none."""
    if not sizes or tier not in TIER_RESOLUTIONS:
        return [None]
    candidates, native_max = TIER_RESOLUTIONS[tier]
    uniform = len(set(sizes)) == 1
    shorter = min(min(s) for s in sizes)
    square = uniform and sizes[0][0] == sizes[0][1]
    out: list[int | None] = [r for r in candidates if r < shorter or (r == shorter and not square)]
    if uniform and max(sizes[0]) <= native_max:
        out.append(None)
    if not out:
        out = [None] if uniform else [shorter]
    return out


def resolution_entry(size: int | None) -> dict:
    """The certificate's record of one attacker resolution: its size (or ``"native"``) and rule."""
    return {"size": "native", "rule": NATIVE_RULE} if size is None else {"size": int(size), "rule": RESIZE_RULE}


def excluded_reason(v: dict) -> str | None:
    """Why a resolution's verdict cannot enter the minimum (None when it can)."""
    if v.get("score") is None:
        return v.get("inconclusive_reason") or "no score"
    ref = (v.get("reference") or {}).get("balanced_acc" if v.get("score_metric") == "balanced_accuracy" else "acc")
    if ref is None or ref - v.get("score_chance", 0.0) < WEAK_BASELINE_MARGIN:
        return v.get("inconclusive_reason") or "the clean reference is too close to chance"
    return None


def combine_resolutions(certs: Sequence[dict], sizes: Sequence[int | None],
                        interval: tuple[float, float] | None, wall_s: float) -> dict:
    """One certificate from per-resolution certificates (:func:`verify.run.verify_sets` at each of
    ``sizes``, in that order), with the headline over resolutions (module doc) and ``interval`` its
    joint bootstrap interval (:func:`verify.uncertainty.bootstrap_min_interval`, or None)."""
    if not certs or len(certs) != len(sizes):
        raise ValueError("one certificate per resolution")
    per: list[dict] = []
    for cert, size in zip(certs, sizes):
        v = cert["verdict"]
        best = v.get("best_attacker") or {}
        per.append({"resolution": resolution_label(size), "score": v.get("score"), "interval": v.get("interval"),
                    "conclusive": v.get("conclusive"), "excluded": excluded_reason(v),
                    "reference": (v.get("reference") or {}).get("acc"),
                    "reference_balanced": (v.get("reference") or {}).get("balanced_acc"),
                    "best_attacker": {"training": best.get("training"), "defense": best.get("defense"),
                                      "acc": best.get("acc"), "balanced_acc": best.get("balanced_acc"),
                                      "learner": (best.get("attacker") or {}).get("learner")}})
    usable = [i for i, p in enumerate(per) if p["excluded"] is None]
    head_i = min(usable, key=lambda i: per[i]["score"]) if usable else 0
    out = copy.deepcopy(certs[head_i])
    v = out["verdict"]
    v["resolution"] = per[head_i]["resolution"]
    v["per_resolution"] = per
    v["rule"] = f"{RESOLUTION_RULE}; at each resolution: {v.get('rule', '')}"
    if usable:
        oracles = [certs[i]["verdict"].get("oracle", {}).get("score") for i in usable]
        if all(o is not None for o in oracles) and "oracle" in v:
            v["oracle"]["score"] = min(oracles)  # type: ignore[type-var]
        if interval is not None and v.get("score") is not None:
            v["interval"] = [round(float(interval[0]), 4), round(float(interval[1]), 4)]
            v["interval_definition"] = (f"{v.get('interval_definition', '')}; jointly over the {len(usable)} "
                                        "resolutions: each replicate resamples the same test images at every "
                                        "resolution and takes the lowest score")
        else:
            v["interval"] = None
        reason = None
        if v["interval"] is not None and v["interval"][0] <= 0 <= v["interval"][1]:
            reason = "the 95 % interval of the score contains 0: no protection can be shown"
        v["inconclusive_reason"] = reason
        v["conclusive"] = reason is None
    else:
        v["inconclusive_reason"] = "no attacker resolution has a clean reference above chance: " + "; ".join(
            f"{p['resolution']}: {p['excluded']}" for p in per)
        v["score"], v["interval"], v["conclusive"] = None, None, False
    cells = [c for cert in certs for c in cert["cells"]]
    scored = [c for c in cells if c.get("effect") is not None]
    if scored:
        small = min(scored, key=lambda c: c["effect"])
        v["smallest_effect"] = {"training": small["training"], "defense": small["defense"],
                                "resolution": (small.get("attacker") or {}).get("resolution"),
                                "acc": small["protected"].get("acc"),
                                "balanced_acc": small["protected"].get("balanced_acc"), "effect": small["effect"]}
    v["summary"] = verdict_sentence(v)
    if usable:
        v["summary"] += " By attacker resolution: " + "; ".join(
            f"{p['resolution']}{'' if p['resolution'] == 'native' else ' px'} "
            f"{'-' if p['score'] is None else format(p['score'], '.2f')}"
            + (f" (left out: {p['excluded']})" if p["excluded"] else "") for p in per) + "."
    out["cells"] = cells
    out["resolution"] = resolution_entry(sizes[head_i])
    out["resolutions"] = [resolution_entry(s) for s in sizes]
    out["data"] = {**certs[head_i]["data"], "by_resolution": {resolution_label(s): c["data"]
                                                              for s, c in zip(sizes, certs)}}
    warnings: list[str] = []
    for cert, size in zip(certs, sizes):
        for w in cert.get("warnings", []):
            shared = all(w in c.get("warnings", []) for c in certs)
            text = w if shared else f"at {resolution_label(size)} px: {w}"
            if text not in warnings:
                warnings.append(text)
    out["warnings"] = warnings
    for key in ("baseline_cache", "resume"):
        if key in out:
            for field in ("hits", "misses", "reused", "trained"):
                if field in out[key]:
                    out[key][field] = sum((c.get(key) or {}).get(field, 0) for c in certs)
    out["wall_s"] = round(float(wall_s), 2)
    return out
