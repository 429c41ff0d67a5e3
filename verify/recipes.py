"""Training recipes (tiers) and training regimes for verification.

A **tier** fixes how a surrogate is trained (model, epochs, optimiser, schedule, augmentation, and how
adversarial examples are made); a **training regime** fixes what it is trained against:

* ``erm``: plain empirical risk minimisation.
* ``linf``: L-inf adversarial training (Madry et al., ICLR 2018), eps 8/255. ``linf4`` (or
  ``linf@4``) selects eps 4/255; any ``linf<N>`` means eps N/255.
* ``l2``: L2 adversarial training, eps 0.5. ``l2@0.25`` selects another eps.

Tiers (every number in a certificate names the tier that produced it):

* ``quick``: ``fastcnn`` (its first convolution strided from 64 px up), 10 epochs, batch 128, SGD (Nesterov, momentum 0.9, wd 5e-4), one-cycle LR
  (peak 0.1), random crop (4 px zero padding) + horizontal flip. Adversarial regimes use **fast AT**
  (FGSM with random start, Wong, Rice & Kolter, "Fast is better than free", ICLR 2020; step
  1.25 eps), which the certificate records.
* ``standard``: CIFAR ResNet-18, 40 epochs, batch 128, SGD 0.1 (momentum 0.9, wd 5e-4), cosine LR,
  crop + flip; PGD-10 with step eps/4 and random start.
* ``paper``: the CUDA paper's recipe (Sadasivan et al., "CUDA: Convolution-based Unlearnable
  Datasets", CVPR 2023) as its released training script (``final_filter_unlearnable.py``) runs it:
  ResNet-18, 100 epochs, batch 512, SGD 0.1 (momentum 0.9, wd 5e-4), LR x0.1 at epochs 40 and 80,
  crop + flip, no normalisation, gradients clipped to norm 5 in every regime; PGD-10 with step
  1.5 eps/steps, run with the model in **eval mode** (the script uses torchattacks, whose attacks
  switch the model to eval mode while they run). What still differs from that script is listed by
  :func:`reference_differences` and written into every certificate of the tier.

>>> r = get_recipe("quick", epochs=5)
>>> [t.name for t in parse_trainings("erm,linf4,l2")]
['erm', 'linf4', 'l2']
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from perturbations.errors import ConfigError

__all__ = [
    "PAPER_REFERENCE", "TIERS", "Recipe", "Training", "fit_to_data", "get_recipe", "parse_training", "parse_trainings",
    "reference_differences", "tiers",
]

DEFAULT_LINF_EPS = 8 / 255
DEFAULT_L2_EPS = 0.5
#: The number of values (32 x 32 x 3) an L2 budget is defined for (see :meth:`Training.for_shape`).
L2_REFERENCE_VALUES = 3072


@dataclass(frozen=True)
class Training:
    """A training regime: ``norm`` None (ERM), ``"linf"`` or ``"l2"``, with budget ``eps``."""

    name: str
    norm: str | None = None
    eps: float = 0.0
    #: L2 only: the budget as named (a 32x32x3 figure) before :meth:`for_shape` scaled it.
    eps_reference: float | None = None
    #: A pretrained learner (``probe:SPEC`` / ``finetune:SPEC``, :mod:`verify.learners`) trained with
    #: ERM in place of the tier's model; None: the tier's model from scratch.
    learner: str | None = None

    @property
    def adversarial(self) -> bool:
        return self.norm is not None

    def for_shape(self, shape: tuple[int, int, int]) -> Training:
        """This regime for images of ``shape`` (C, H, W). An L2 budget is a 32x32x3 figure (0.5 is
        Madry's CIFAR-10 value): the same per-value RMS change on another shape needs
        ``eps x sqrt(C H W / 3072)``, so the budget is scaled (``eps_reference`` keeps the named
        value). L-inf budgets are per value already and ERM has none: both are returned as they are."""
        if self.norm != "l2":
            return self
        ref = self.eps_reference if self.eps_reference is not None else self.eps
        c, h, w = shape
        return dataclasses.replace(self, eps=ref * math.sqrt(c * h * w / L2_REFERENCE_VALUES), eps_reference=ref)

    def describe(self) -> str:
        if self.learner is not None:
            kind, _, spec = self.learner.partition(":")
            return (f"ERM, a new linear head on frozen {spec} features" if kind == "probe" else
                    f"ERM, every weight of pretrained {spec} fine-tuned (learning rate x0.1)")
        if self.norm is None:
            return "ERM"
        if self.norm == "linf":
            return f"L-inf AT, eps {_fmt_255(self.eps)}"
        if self.eps_reference is not None and abs(self.eps_reference - self.eps) > 1e-12:
            return (f"L2 AT, eps {self.eps:.4g} ({self.eps_reference:g} at 32x32x3, scaled to the image size: "
                    f"the same per-value RMS change)")
        return f"L2 AT, eps {self.eps:g}"


def _fmt_255(eps: float) -> str:
    n = eps * 255
    return f"{n:g}/255" if abs(n - round(n)) < 1e-6 else f"{eps:.4g}"


@dataclass(frozen=True)
class Recipe:
    """How one surrogate is trained. Frozen; derive variants with :func:`get_recipe` overrides.

    LR schedule ``schedule``: ``"onecycle"`` (linear warm-up to ``lr`` over ``warmup_frac`` of the steps,
    then linear decay to 0, per step), ``"cosine"`` (per step, from ``lr`` to 0), ``"step"`` (x ``gamma``
    at each epoch in ``milestones``; when ``epochs`` is overridden and ``milestones`` is not, the paper's
    milestones are scaled to keep their fraction of training, 40/100 and 80/100).

    Adversarial examples: ``at_method`` ``"fgsm_rs"`` (fast AT: one step of ``fast_at_alpha`` x eps
    after a uniform random start) or ``"pgd"`` (``pgd_steps`` steps of ``pgd_step`` x eps, random
    start). With ``attack_eval_mode`` False (quick, standard) attacks run with the model in train
    mode, as in Madry's and Wong's reference code (BatchNorm uses batch statistics and updates its
    running statistics during the attack too); True (paper) runs them in eval mode, as the CUDA
    reference does through torchattacks. ``grad_clip``: clip the gradient to this global L2 norm
    before every optimizer step (paper: 5.0, as the CUDA reference; None: no clipping).

    Evaluation: with ``eval_subset`` None the whole test set is scored after every epoch. With
    ``eval_subset=k`` (quick tier: 2000) the epochs in between are scored on a fixed random subset
    of k test images (the same subset in every cell), the last epoch on the whole set, and the epoch
    with the best subset score is re-scored on the whole set from a saved copy of the weights; the
    peak is the better of those two full-set scores. This keeps evaluation from costing as much as
    training on a CPU while peak and final accuracy are still full-test-set numbers.

    Small training sets: with ``min_steps`` set (every tier: 600, below the 780 steps that 10k
    images take in the quick tier, 3,120 in the standard and 1,900 in the paper tier, so those are
    unchanged), :func:`fit_to_data` raises the epochs until training takes at least ``min_steps``
    optimizer steps (10 epochs of 2 batches would otherwise leave even the clean baseline at
    chance), and lowers the batch size so that those steps take about ``small_set_epochs`` epochs
    (the batch is ``n x small_set_epochs / min_steps``, at most the tier's and not below 16). Steps,
    not passes over the data, are what a small set needs: 600 steps of batch 100 on 800 images (75
    epochs) reached the same accuracy as 600 steps of batch 32 (24 epochs) at a third of the cost
    (``bench/small_sets.py``). The certificate records the adapted recipe. Overriding ``epochs``
    (``--epochs``) turns this off.

    ``remap_answers``: after every epoch, rename the model's answers by the permutation that scores
    best on the validation images, where the model's own are below chance there and it beats them
    by more than 0.1 (an attacker with a few labelled clean images does;
    :class:`verify.train.CellResult`); with two classes, also answer at the threshold on the scores
    that scores best there, where the own answers are near chance but the scores rank the classes
    (:func:`verify.evaluation.best_threshold`). Protected cells only, each scored both ways (its
    own chosen epoch each) keeping the better on the test set; clean baselines keep their own
    answers. False scores the answers as they are.
    """

    tier: str
    model: str
    epochs: int
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_frac: float = 0.25
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    crop_padding: int = 4
    flip: bool = True
    normalize: bool = False
    label_smoothing: float = 0.0
    at_method: str = "pgd"
    pgd_steps: int = 10
    pgd_step: float = 0.25
    fast_at_alpha: float = 1.25
    linf_eps: float = DEFAULT_LINF_EPS
    l2_eps: float = DEFAULT_L2_EPS
    eval_batch_size: int = 1000
    eval_subset: int | None = None
    min_steps: int | None = None
    small_set_epochs: int = 24
    attack_eval_mode: bool = False
    grad_clip: float | None = None
    at_model: str | None = None
    at_epochs: int | None = None
    remap_answers: bool = True
    description: str = field(default="", compare=False)

    @property
    def fast_at(self) -> bool:
        return self.at_method == "fgsm_rs"

    def for_training(self, training: Training) -> Recipe:
        """The recipe a cell of ``training`` trains with: adversarial regimes use ``at_model`` for
        ``at_epochs`` where set (an adversarial trainer must be able to learn under AT: the small ERM
        model cannot, see ``bench/at_learner.py``), everything else this recipe as it is."""
        if not training.adversarial or (self.at_model is None and self.at_epochs is None):
            return self
        return dataclasses.replace(self, model=self.at_model or self.model, epochs=self.at_epochs or self.epochs,
                                   at_model=None, at_epochs=None)

    def attack(self, training: Training) -> dict:
        """The attack that makes training examples for ``training`` (``{}`` for ERM)."""
        if not training.adversarial:
            return {}
        if self.at_method == "fgsm_rs":
            return {
                "method": "fgsm_rs" if training.norm == "linf" else "fgsm_rs_l2",
                "norm": training.norm, "eps": training.eps, "steps": 1,
                "step_size": self.fast_at_alpha * training.eps, "random_start": True,
                "model_mode": "eval" if self.attack_eval_mode else "train",
                "source": "Wong, Rice & Kolter, Fast is better than free, ICLR 2020 (FGSM with random start)",
            }
        return {
            "method": "pgd", "norm": training.norm, "eps": training.eps, "steps": self.pgd_steps,
            "step_size": self.pgd_step * training.eps, "random_start": True,
            "model_mode": "eval" if self.attack_eval_mode else "train",
            "source": "Madry et al., Towards Deep Learning Models Resistant to Adversarial Attacks, ICLR 2018",
        }

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        d["fast_at"] = self.fast_at
        return d


TIERS: dict[str, Recipe] = {
    "quick": Recipe(
        tier="quick", model="fastcnn", epochs=10, batch_size=128, lr=0.1, momentum=0.9, nesterov=True,
        weight_decay=5e-4, schedule="onecycle", warmup_frac=0.25, at_method="fgsm_rs", eval_subset=2000, min_steps=600,
        at_model="fastcnn_wide", at_epochs=40,
        description="fastcnn (a stride-2 first convolution from 64 px up), 10 epochs, one-cycle SGD, crop+flip; fast AT (FGSM-RS, Wong et al. 2020) with fastcnn_wide "
                    "for 40 epochs (an adversarial trainer that learns under AT: 61.3% on clean 10k CIFAR-10, "
                    "bench/at_learner.py)",
    ),
    "standard": Recipe(
        tier="standard", model="resnet18", epochs=40, batch_size=128, lr=0.1, momentum=0.9, nesterov=False,
        weight_decay=5e-4, schedule="cosine", at_method="pgd", pgd_steps=10, pgd_step=0.25, min_steps=600,
        description="ResNet-18, 40 epochs, cosine SGD, crop+flip; PGD-10 AT (step eps/4)",
    ),
    "paper": Recipe(
        tier="paper", model="resnet18", epochs=100, batch_size=512, lr=0.1, momentum=0.9, nesterov=False,
        weight_decay=5e-4, schedule="step", milestones=(40, 80), gamma=0.1, at_method="pgd",
        pgd_steps=10, pgd_step=0.15, attack_eval_mode=True, grad_clip=5.0, min_steps=600,
        description="CUDA paper recipe: ResNet-18, 100 epochs, batch 512, SGD 0.1, x0.1 at 40/80, "
                    "crop+flip, gradient norm clipped at 5; PGD-10 AT (step 1.5 eps/steps, model in eval mode)",
    ),
}

#: The released training script the ``paper`` tier follows.
PAPER_REFERENCE = ("final_filter_unlearnable.py of github.com/vinusankars/Convolution-based-Unlearnability "
                   "(Sadasivan et al., CUDA: Convolution-based Unlearnable Datasets, CVPR 2023; torchattacks 3.2.6)")


def reference_differences(recipe: Recipe, device: str = "cpu", world: int = 1, sync_batchnorm: bool = False,
                          n_train: int | None = None) -> list[str]:
    """What a ``paper``-tier run still does differently from the CUDA reference script (empty for
    other tiers, whose recipes are our own). ``device``: ``"cpu"`` or ``"cuda"``; ``world``: the
    number of data-parallel processes; ``sync_batchnorm``: whether they synchronise BatchNorm;
    ``n_train``: the number of training images (None: name the differences that depend on it)."""
    if recipe.tier != "paper":
        return []
    base = TIERS["paper"]
    out: list[str] = []
    changed = [f.name for f in dataclasses.fields(Recipe)
               if f.compare and f.name not in ("tier", "min_steps")  # min_steps is ours: its effect shows in batch/epochs
               and getattr(recipe, f.name) != getattr(base, f.name)]
    if changed:
        out.append("recipe settings changed from the reference: " + ", ".join(
            f"{n}={getattr(recipe, n)!r} (reference {getattr(base, n)!r})" for n in changed))
    if str(device).startswith("cuda"):
        out.append("on CUDA the forward and backward passes run under bf16 autocast (fp16 with loss "
                   "scaling where bf16 is missing); the reference trains in float32")
    if world > 1 and not sync_batchnorm:
        out.append(f"{world} data-parallel processes normalise each BatchNorm over their own share of the "
                   "batch (SyncBatchNorm needs GPUs); the reference normalises over the whole batch")
    rest = None if n_train is None else n_train % min(recipe.batch_size, n_train)
    if rest is None or 0 < rest < 2 * world:
        out.append("a last batch with fewer than 2 images per process is dropped (BatchNorm needs 2); the "
                   "reference keeps it")
    if recipe.model == "resnet18":
        out.append("the model is verify.models' CIFAR ResNet-18 (3x3 stem, no max-pool, 1x1 conv shortcuts); the "
                   "reference imports its ResNet-18 from fshp971/robust-unlearnable-examples (not compared layer by layer)")
    return out


def tiers() -> list[str]:
    return list(TIERS)


_SCHEDULES = ("onecycle", "cosine", "step")
_AT_METHODS = ("fgsm_rs", "pgd")


def get_recipe(tier: str | Recipe = "quick", **overrides: object) -> Recipe:
    """The recipe of ``tier`` with ``overrides`` (any :class:`Recipe` field, e.g. ``epochs=5``,
    ``model="resnet20"``, ``linf_eps=4/255``). ``None`` values are ignored. ConfigError on an unknown
    tier, field or a value that cannot work."""
    if isinstance(tier, Recipe):
        base = tier
    else:
        try:
            base = TIERS[tier]
        except KeyError:
            raise ConfigError(f"unknown tier '{tier}'; available: {', '.join(TIERS)}") from None
    overrides = {k: v for k, v in overrides.items() if v is not None}
    names = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown recipe setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    if "epochs" in overrides:
        overrides.setdefault("min_steps", None)  # explicit epochs are taken as given
        overrides.setdefault("at_epochs", None)  # ... for every regime
    if "model" in overrides:
        overrides.setdefault("at_model", None)  # an explicit model is every regime's learner
    if "milestones" in overrides:
        overrides["milestones"] = tuple(int(m) for m in overrides["milestones"])  # type: ignore[union-attr]
    elif "epochs" in overrides and base.milestones:
        overrides["milestones"] = _scale_milestones(base, int(overrides["epochs"]))  # type: ignore[arg-type]
    if overrides:
        overrides.setdefault("description", base.description + " (modified: " + ", ".join(
            f"{k}={v}" for k, v in overrides.items() if k != "milestones") + ")")
    try:
        recipe = dataclasses.replace(base, **overrides)
    except TypeError as exc:
        raise ConfigError(f"bad recipe override: {exc}") from None
    _validate(recipe)
    return recipe


def _scale_milestones(recipe: Recipe, epochs: int) -> tuple[int, ...]:
    """``recipe.milestones`` moved to keep their fraction of training when it lasts ``epochs``."""
    return tuple(sorted({max(1, round(m * epochs / recipe.epochs)) for m in recipe.milestones}))


def fit_to_data(recipe: Recipe, n_train: int) -> Recipe:
    """``recipe`` adapted to a training set of ``n_train`` images (see :class:`Recipe`,
    ``min_steps`` and ``small_set_epochs``); unchanged when ``min_steps`` is None or the set is
    large enough."""
    if recipe.min_steps is None or n_train < 2:
        return recipe
    if (n_train // min(recipe.batch_size, n_train)) * recipe.epochs >= recipe.min_steps:
        return recipe  # enough steps at the tier's own batch
    bs = min(recipe.batch_size, max(16, n_train * recipe.small_set_epochs // recipe.min_steps), n_train)
    per_epoch = max(1, n_train // bs)
    epochs = max(recipe.epochs, math.ceil(recipe.min_steps / per_epoch))
    at_epochs = None if recipe.at_epochs is None else max(recipe.at_epochs, math.ceil(recipe.min_steps / per_epoch))
    if (bs, epochs, at_epochs) == (recipe.batch_size, recipe.epochs, recipe.at_epochs):
        return recipe
    return dataclasses.replace(
        recipe, batch_size=bs, epochs=epochs, at_epochs=at_epochs, milestones=_scale_milestones(recipe, epochs),
        description=f"{recipe.description} (adapted to {n_train} training images: batch {bs}, {epochs} epochs, "
                    f">= {recipe.min_steps} steps)",
    )


def _validate(r: Recipe) -> None:
    def positive(name: str, value: object, integer: bool = False) -> None:
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if not ok or isinstance(value, bool) or not math.isfinite(float(value)) or value <= 0:  # type: ignore[arg-type,operator]
            raise ConfigError(f"recipe setting {name} must be a positive {'integer' if integer else 'number'}, got {value!r}")

    for name in ("epochs", "batch_size", "pgd_steps", "eval_batch_size", "small_set_epochs"):
        positive(name, getattr(r, name), integer=True)
    for name in ("lr", "pgd_step", "fast_at_alpha", "linf_eps", "l2_eps", "gamma"):
        positive(name, getattr(r, name))
    for name in ("eval_subset", "min_steps"):
        if getattr(r, name) is not None:
            positive(name, getattr(r, name), integer=True)
    if r.schedule not in _SCHEDULES:
        raise ConfigError(f"unknown LR schedule '{r.schedule}'; use one of {', '.join(_SCHEDULES)}")
    if r.at_method not in _AT_METHODS:
        raise ConfigError(f"unknown adversarial training method '{r.at_method}'; use one of {', '.join(_AT_METHODS)}")
    if not 0 < r.warmup_frac < 1:
        raise ConfigError(f"warmup_frac must lie in (0, 1), got {r.warmup_frac}")
    if r.crop_padding < 0 or r.weight_decay < 0 or not 0 <= r.momentum < 1 or not 0 <= r.label_smoothing < 1:
        raise ConfigError("crop_padding and weight_decay must be >= 0, momentum and label_smoothing in [0, 1)")
    if r.linf_eps > 1:
        raise ConfigError(f"linf_eps is a fraction of the pixel range (8/255 = {8 / 255:.4f}), got {r.linf_eps}")
    if r.grad_clip is not None:
        positive("grad_clip", r.grad_clip)
    if not isinstance(r.attack_eval_mode, bool):
        raise ConfigError(f"attack_eval_mode must be true or false, got {r.attack_eval_mode!r}")


_TRAINING_RE = re.compile(r"^(?:(erm)|linf(?:@?(\d+(?:\.\d+)?))?|l2(?:@(\d*\.?\d+))?)$")
TRAINING_HELP = ("erm, linf (8/255), linf4 or linf@N (N/255), l2 (0.5), l2@EPS, probe:SPEC or finetune:SPEC "
                 "(SPEC: a surrogate spec, e.g. cifar-resnet56, clip:RN50/openai, torchvision:resnet18:PATH)")


def parse_training(name: str, recipe: Recipe | None = None) -> Training:
    """One regime name -> :class:`Training`. ``linf``/``l2`` take their eps from ``recipe``
    (defaults 8/255 and 0.5); explicit eps in the name win. Canonical names: ``erm``, ``linf``
    (default eps), ``linf<N>``, ``l2`` (default eps), ``l2@<eps>``."""
    from .learners import split_learner

    pretrained = split_learner(name.strip())
    if pretrained is not None:
        from perturbations.surrogates import parse_spec

        parse_spec(pretrained[1])  # a bad spec fails here, in one line
        return Training(name.strip(), None, 0.0, learner=name.strip())
    raw = name.strip().lower()
    m = _TRAINING_RE.match(raw)
    if not m:
        raise ConfigError(f"unknown training regime '{name.strip()}'; use {TRAINING_HELP}")
    linf_default = recipe.linf_eps if recipe else DEFAULT_LINF_EPS
    l2_default = recipe.l2_eps if recipe else DEFAULT_L2_EPS
    if m.group(1):
        return Training("erm")
    if raw.startswith("linf"):
        eps = float(m.group(2)) / 255 if m.group(2) else linf_default
        if not 0 < eps <= 1:
            raise ConfigError(f"training '{name.strip()}': L-inf eps must lie in (0, 255]/255")
        if abs(eps - linf_default) < 1e-9:
            return Training("linf", "linf", eps)
        return Training(f"linf{eps * 255:g}", "linf", eps)
    eps = float(m.group(3)) if m.group(3) else l2_default
    if eps <= 0:
        raise ConfigError(f"training '{name.strip()}': L2 eps must be positive")
    if abs(eps - l2_default) < 1e-9:
        return Training("l2", "l2", eps)
    return Training(f"l2@{eps:g}", "l2", eps)


def parse_trainings(spec: str | list[str] | tuple[str, ...], recipe: Recipe | None = None) -> list[Training]:
    """``"erm,linf,l2"`` (or a list of names) -> regimes, duplicates dropped; ConfigError on unknown."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [p.strip() for p in parts]
    if not any(names):
        raise ConfigError(f"empty training list; use {TRAINING_HELP}")
    out: list[Training] = []
    for n in names:
        if not n:
            raise ConfigError(f"empty entry in training list {spec!r}")
        t = parse_training(n, recipe)
        if t not in out:
            out.append(t)
    return out
