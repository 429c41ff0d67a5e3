"""The small base class every protection method implements.

A method is built with its paper defaults in its ``__init__`` signature and a
:class:`~perturbations.keyring.Keyring`; it may :meth:`~Perturbation.fit` on the dataset and then
:meth:`~Perturbation.apply` to batches. Its fitted state is a plain dict of tensors so it can be
saved in the run record and reloaded to protect more images later with the same key.

Shapes and ranges: images are float32 in [0, 1], ``N x C x H x W`` (C = 1 or 3; an alpha channel
never reaches a method), on the method's device. :meth:`~Perturbation.apply` returns the same shape
and range and never quantises. The folder pipeline calls :meth:`~Perturbation.protect_levels`
instead: integer pixels in, integer pixels out, quantised once with rounding (its default is
exactly ``round(apply(v / levels) * levels)``); a method may override it with a leaner or exact
implementation that returns the same values.
"""

from __future__ import annotations

import inspect
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .errors import ConfigError
from .keyring import Keyring


@dataclass
class FitData:
    """What a method may look at before protecting a dataset.

    Attributes:
        num_classes: number of classes, or 0 for an unlabelled dataset.
        labels: one label per image (``None`` when unlabelled).
        sizes: ``(height, width)`` per image, in dataset order.
        ids: a stable id per image (its relative path), in dataset order.
        batches: optional factory for methods that must see pixels while fitting (Unlearnable
            Clusters, SALM, clustered CUDA); ``None`` for model-free use. Called as
            ``batches(size, channels=3, batch_size=64, only=None)`` it decodes the images once (in
            dataset order, or only the positions in ``only``) and yields ``(images, indices)``:
            ``images`` float32 ``n x channels x size[0] x size[1]`` in [0, 1] (every image resized
            to ``size``, antialiased; grey repeated to 3 channels or colour averaged to 1; alpha
            dropped), ``indices`` their positions in ``ids``. Images that cannot be decoded are left
            out (the protect pass reports them). Memory: one batch plus the decoders' working set.
        channels: 1 when every sampled image is grey (so a method can stay single-channel), else 3.
        device: where the method should compute while fitting (``"cpu"``, ``"cuda"``, ...).
        memory: bytes the method may use to keep images between passes (e.g. a sample of them).
        progress: optional ``progress(stage, done, total)`` callback for long fits.
    """

    num_classes: int
    labels: Sequence[int] | None
    sizes: Sequence[tuple[int, int]]
    ids: Sequence[str] = field(default_factory=list)
    batches: Callable[..., Iterator[tuple[torch.Tensor, Sequence[int]]]] | None = None
    device: str = "cpu"
    memory: int = 1 << 30
    channels: int = 3
    progress: Callable[[str, int, int], None] | None = None

    def report(self, stage: str, done: int, total: int) -> None:
        """Forward to ``progress`` when there is one."""
        if self.progress is not None:
            self.progress(stage, done, total)


class Perturbation(ABC):
    """Base class for protection methods.

    Subclasses set ``name``, ``summary``, ``paper`` and ``needs_labels`` and implement
    :meth:`apply`; they override :meth:`fit`, :meth:`state_dict` and :meth:`load_state_dict`
    when they have fitted state.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    needs_labels: ClassVar[bool] = False
    #: True when :meth:`protect_levels` is exact integer arithmetic: the same bytes on every CPU and
    #: GPU and for every batch composition. Otherwise the run record also pins the device class.
    exact: ClassVar[bool] = False
    #: Rough working memory of :meth:`protect_levels` in bytes per input value (float copies,
    #: buffers), used by the pipeline's memory budget.
    work_bytes_per_value: ClassVar[float] = 12.0
    #: State keys that hold per-image data (e.g. a cluster per image id). They grow when new images
    #: join (:meth:`extend`) and are left out of what makes an existing output current.
    per_image_state: ClassVar[tuple[str, ...]] = ()
    #: Parameters this method only uses together with another one (``{"surrogate": "clusters"}``):
    #: a composed method (``perturbations.chain``) routes a plain value here only with its partner.
    companion_params: ClassVar[dict[str, str]] = {}
    #: The fewest readable images a fresh fit accepts (``--state RECORD`` protects any number later).
    min_images: ClassVar[int] = 1
    #: Words on :attr:`needs_labels` where parameters change it (clustered CUDA), for ``protect methods``.
    labels_note: ClassVar[str] = ""
    #: Fidelity and speed measured in the docs, declared here (never parsed at run time): each entry
    #: ``{"setting", "data", "psnr_db", "images_per_second", "source": "docs/BENCHMARKS.md: <section>"}``
    #: (``images_per_second`` over the whole run, fit included; ``None`` where not measured).
    measured: ClassVar[tuple[dict[str, Any], ...]] = ()
    #: One line on how to read :attr:`measured` (e.g. a fixed fit cost that small folders feel).
    measured_note: ClassVar[str] = ""
    #: The training-time breakers published against this method, by their ``protect verify``
    #: defense names, with where each was published: ``protect verify`` adds them to its default grid
    #: for folders this method protected. Names only: this layer does not import the verifier.
    breakers: ClassVar[tuple[str, ...]] = ()
    breakers_source: ClassVar[str] = ""

    def __init__(self, keyring: Keyring) -> None:
        if not isinstance(keyring, Keyring):
            raise ConfigError(f"{self.name}: a Keyring is required, got {type(keyring).__name__}")
        self.keyring = keyring
        self.fitted = False

    # -- lifecycle -------------------------------------------------------------------------
    def fit(self, data: FitData) -> "Perturbation":
        """Look at the dataset once before protecting it. Default: nothing to learn."""
        if self.needs_labels and (data.labels is None or data.num_classes < 1):
            raise ConfigError(f"method '{self.name}' needs class labels")
        self.fitted = True
        return self

    def extend(self, data: FitData) -> bool:
        """Fit images the loaded state has not seen into it, without refitting (Unlearnable
        Clusters: each new image joins its nearest centre). Returns True when the state changed.
        Default: nothing to do."""
        return False

    @abstractmethod
    def apply(
        self, x: torch.Tensor, labels: torch.Tensor | None = None, ids: Sequence[str] | None = None
    ) -> torch.Tensor:
        """Protect a batch ``x`` (N x C x H x W in [0,1]); return the same shape and range."""

    def protect_levels(
        self, v: torch.Tensor, labels: torch.Tensor | None = None, ids: Sequence[str] | None = None,
        levels: int = 255,
    ) -> torch.Tensor:
        """Protect integer pixels: ``v`` is ``N x C x H x W`` uint8 (``levels`` 255) or int32 holding
        16-bit values (``levels`` 65535); returns the protected pixels, same dtype, quantised once
        with rounding. Default: ``round(apply(v / levels) * levels)`` in float32."""
        x = v.float().div_(levels)
        y = self.apply(x, labels, ids)
        return quantise_levels(y, levels, v.dtype)

    # -- state -----------------------------------------------------------------------------
    def fit_report(self) -> dict[str, Any]:
        """What the last :meth:`fit` did (rounds, losses), for the run summary; not a parameter."""
        return {}

    def notes(self) -> list[str]:
        """One-line human notes for the run summary (which surrogate and why, fewer clusters than
        asked for, ...), valid after :meth:`fit` or :meth:`load_state_dict`. Default: none."""
        return []

    @classmethod
    def weights_info(cls) -> dict[str, Any]:
        """The pretrained weights the method needs with its defaults, for ``protect methods``:
        ``{"needs": words, "spec": surrogate spec or None, "present": bool or None, "bundled": bool}``.
        Looks only at the disk. Default: none needed."""
        return {"needs": "none", "spec": None, "present": None, "bundled": False}

    def params(self) -> dict[str, Any]:
        """The resolved parameters, JSON-serialisable (written to the run record)."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Fitted state as plain tensors (saved in the run record)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore fitted state saved by :meth:`state_dict`."""
        self.fitted = True

    # -- helpers ---------------------------------------------------------------------------
    @classmethod
    def resolve_params(cls, given: dict[str, Any]) -> dict[str, Any]:
        """Every parameter: :meth:`defaults` overlaid with ``given`` (``None`` values = not given);
        ConfigError naming the accepted ones for an unknown name."""
        defaults = cls.defaults()
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise ConfigError(f"method '{cls.name}' has no parameter {', '.join(unknown)}; "
                              f"it takes {', '.join(sorted(defaults))}")
        return {**defaults, **{k: v for k, v in given.items() if v is not None}}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The paper defaults, read from the ``__init__`` signature (``None`` = chosen from data)."""
        sig = inspect.signature(cls.__init__)
        return {
            name: p.default
            for name, p in sig.parameters.items()
            if name not in ("self", "keyring") and p.default is not inspect.Parameter.empty
        }

    def _check_batch(self, x: torch.Tensor, labels: torch.Tensor | None) -> None:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ConfigError(f"{self.name}: expected N x C x H x W with C in (1, 3), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ConfigError(f"{self.name}: expected a float tensor in [0, 1], got {x.dtype}")
        if self.needs_labels:
            if labels is None:
                raise ConfigError(f"method '{self.name}' needs class labels")
            if labels.shape != (x.shape[0],):
                raise ConfigError(f"{self.name}: labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")


def quantise_levels(y: torch.Tensor, levels: int, dtype: torch.dtype) -> torch.Tensor:
    """``round(y * levels)`` in float32, clamped to ``[0, levels]``, as ``dtype`` (the one
    quantisation every output goes through)."""
    return y.float().mul(levels).round_().clamp_(0, levels).to(dtype)


def parse_assignments(items: Iterable[str]) -> dict[str, Any]:
    """``NAME=VALUE`` strings as method parameters: the value parsed as JSON when it parses (numbers,
    booleans, null), else kept as text; ``-`` in a name becomes ``_``. ConfigError for an item
    without ``=`` or without a name."""
    params: dict[str, Any] = {}
    for item in items:
        name, eq, raw = item.partition("=")
        name = name.strip().replace("-", "_")
        if not eq or not name:
            raise ConfigError(f"expected NAME=VALUE, got '{item}'")
        try:
            params[name] = json.loads(raw)
        except json.JSONDecodeError:
            params[name] = raw
    return params


def parse_robust(robust: float | int | str, robust_steps: int, method: str) -> tuple[float, int]:
    """A method's ``robust`` radius (a number or ``"a/b"``, in [0, 1)) and its ``robust_steps``
    (an integer >= 1), checked; ConfigError naming ``method`` otherwise."""
    radius = parse_fraction(robust, f"{method}: robust")
    if not 0.0 <= radius < 1.0:
        raise ConfigError(f"{method}: robust must be in [0, 1), got {robust}")
    if int(robust_steps) != robust_steps or robust_steps < 1:
        raise ConfigError(f"{method}: robust_steps must be an integer >= 1, got {robust_steps}")
    return radius, int(robust_steps)


def parse_fraction(value: float | int | str, what: str) -> float:
    """A number given as a float or as ``"a/b"`` (e.g. ``"16/255"``); ConfigError otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                return float(num) / float(den)
            return float(text)
        except (ValueError, ZeroDivisionError):
            pass
    raise ConfigError(f"{what} must be a number or a fraction like 16/255, got {value!r}")


def format_value(value: Any) -> str:
    """A parameter value for people: a float that is a multiple of 1/255 (or of 0.1/255) and has no
    short decimal form as ``16/255``; other floats in their shortest form (``0.3``, ``0.0001``);
    ``None`` as ``none``; everything else as ``str``. Machine output (JSON) keeps the raw values.

    >>> format_value(16 / 255), format_value(0.8 / 255), format_value(0.3), format_value(0.2)
    ('16/255', '0.8/255', '0.3', '0.2')
    """
    if value is None:
        return "none"
    if isinstance(value, float) and not isinstance(value, bool):
        text = repr(value)
        if len(text) <= 8 or value != value or value in (float("inf"), float("-inf")):
            return text
        n = value * 255
        for digits in (0, 1, 2):
            r = round(n, digits)
            if r and abs(n - r) <= 1e-9 * max(1.0, abs(n)):
                return f"{r:g}/255"
        return f"{value:.6g}"
    return str(value)


def format_params(params: dict[str, Any], skip: Iterable[str] = ()) -> str:
    """``name=value, ...`` with :func:`format_value` (for the run summary and ``protect methods``)."""
    left_out = set(skip)
    return ", ".join(f"{k}={format_value(v)}" for k, v in params.items() if k not in left_out)
