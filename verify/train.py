"""Train one verification cell: a fresh surrogate on (protected) training data, tested every epoch.

One *cell* = one model trained from scratch with one training regime (ERM, L-inf AT, L2 AT, see
:mod:`verify.recipes`) and one defense (:mod:`verify.defenses`). After every epoch the model is scored
on the validation images (a keyed split of the test set, or ``--val``, :mod:`verify.uncertainty`);
the epoch with the best validation score is the *selected* epoch, and the cell reports the clean test
accuracy (with balanced accuracy, macro AUC and every test prediction, :mod:`verify.metrics`) of the
model at that epoch. Choosing the epoch with the test labels themselves (the *peak*) is optimistic:
a model at chance level reaches a high peak on a small test set by luck; the peak is kept as a
second, labelled number (the *oracle*). The cell also reports the running accuracy on the training
batches of the last epoch as the model saw them (augmented, defended, and adversarial under AT), and
under fast AT the catastrophic-overfitting guard's PGD accuracy on a training batch (Wong et al. 2020).

Speed (the quick tier must train 10 epochs on 10k 32x32 images in about a minute on 2 CPU cores):

* the images stay uint8 in memory (on the GPU when there is one), padded once, channels-last;
* crop + flip is one batched gather (random offsets per image, the flip folded into the column
  index), not per-image Python;
* static defenses (deterministic per image: grayscale, JPEG, blur, ...) run once over the training
  set before training and are re-quantised to 8 bits, as if the attacker had saved the defended
  copy; random defenses run per batch;
* on CUDA: bf16 autocast (fp16 + GradScaler where bf16 is missing), channels-last, cuDNN autotune.
  ``torch.set_num_threads`` is left to the caller.

Randomness comes only from generators seeded from ``seed`` (one per purpose: data order and
augmentation, defense, attack); weight init runs under ``torch.random.fork_rng`` with
``torch.manual_seed(seed)``, so the global RNG state is left as it was.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perturbations.errors import ConfigError, InputError
from protect.device import resolve_device

from . import attacks, distributed
from . import defenses as defense_registry
from .data import TensorSet, check_same_classes
from .evaluation import EvalResult, evaluate, evaluate_metrics, read_answers, remapped
from .metrics import score_basis
from .models import create_model
from .recipes import Recipe, Training, parse_training

__all__ = ["CellResult", "EpochInfo", "EvalResult", "evaluate", "evaluate_metrics", "resolve_device", "train_cell"]

log = logging.getLogger(__name__)


@dataclass
class CellResult:
    """What one trained cell reports. Accuracies are fractions in [0, 1].

    **The reported numbers** ``acc``, ``balanced_acc`` and ``auc`` are test-set scores at
    ``selected_epoch`` (1-based), the epoch with the best validation score (``selection``:
    ``"validation"``, from ``n_val`` validation images; ``"test"`` when no validation set was given,
    so the test labels chose: optimistic). ``val_curve`` / ``val_curve_balanced``: the validation
    scores of every epoch. ``test_pred``: the predicted class of every test image at the selected
    epoch (for bootstrap intervals, :mod:`verify.uncertainty`).

    **The oracle** (chosen with the test labels, kept as a second, labelled number): ``curve[i]`` is
    the test accuracy after epoch i+1, or None where the test set was not scored that epoch (the
    quick tier scores it at the selected and the last epoch only; ``curve_n[i]`` is the number of
    test images, 0 there); ``peak_acc`` is the best of them (``peak_epoch``, 1-based) and
    ``final_acc`` the last epoch's. ``curve_balanced`` and ``curve_auc`` are the balanced accuracy
    and macro AUC of the same evaluations, with their own final and peak values (each metric peaks at
    its own epoch; AUC is None where no class had positives and negatives).

    ``guard_pgd_acc`` / ``guard_fgsm_acc``: under fast AT, the PGD and the FGSM-RS accuracy on a
    fixed training batch at every check of the catastrophic-overfitting guard (after the first
    epoch, then every ``guard_every`` epochs); ``guard_fired_epoch``: the epoch where the FGSM-PGD
    gap had grown by more than :data:`CO_DROP` since the last check, else None;
    ``guard_restored_epoch``: the epoch training went back to (the last check that passed; the
    epochs after it were trained again with PGD-2).
    ``epochs`` is the number of epochs the result comes from.

    **Renamed answers** (``recipe.remap_answers``, on by default): after every epoch the attacker
    renames the model's answers by the permutation that scores best on the validation images
    (:func:`verify.evaluation.best_answer_map`; only where the model's own answers are below chance
    there and the renaming beats them by more than :data:`verify.evaluation.REMAP_MARGIN`),
    and every score of that epoch, test and validation, uses it. A poison that teaches the classes
    under each other's names (class-targeted adversarial poisoning) then counts for what it is: a
    model that learned the task. ``answer_map``: the renaming at the selected epoch (None: the
    model's own answers); ``remapped_epochs``: how many epochs used one.

    **Decision thresholds** (two classes, the same switch): where the model's own answers are near
    chance on the validation images but its scores rank them (AUC far from 1/2, either way round),
    the attacker answers by the threshold on the class-1 log-odds that scores best there
    (:func:`verify.evaluation.best_threshold`), renaming the classes when the ranking is inverted.
    ``threshold``: the one at the selected epoch (None: the argmax); ``thresholded_epochs``: how
    many epochs used one. More classes: where the own answers are not renamed, per-class offsets
    on the log-probabilities (a prior correction, :func:`verify.evaluation.best_offsets`) where
    their cross-fitted validation score beats the own answers by more than the margin;
    ``offsets`` and ``offset_epochs`` likewise.

    **The better reading.** Renaming and thresholds are chosen on the validation images, and a
    choice among more options can cost on the test set (measured: chest X-rays under a targeted
    poison, 24 validation images, a thresholded epoch at 1.0 there won over the model's own at 0.94,
    and scored 0.76 on the test set against 0.90). So the model's own answers and the read ones are
    two attackers, each with its own epoch chosen on validation, and the cell reports the one that
    scores higher on the test set, as the grid keeps its best cell: reading the answers never
    lowers a protected cell. ``own_score`` and ``read_score``: the score metric of each on the test
    set (None where the answers were not read: clean baselines, ``remap_answers=False``);
    ``answer_map`` and ``threshold`` are None when the own answers scored higher, and
    ``remapped_epochs``/``thresholded_epochs`` count the read epochs either way. The curves and the
    last epoch's numbers are those of the kept reading; the oracle peaks the best of either.
    """

    training: str
    defense: str
    seed: int
    curve: list[float]
    final_acc: float
    peak_acc: float
    peak_epoch: int
    train_acc: float
    train_loss: float
    wall_s: float
    epochs: int
    epoch_s: list[float] = field(default_factory=list)
    curve_n: list[int] = field(default_factory=list)
    n_train: int = 0
    n_test: int = 0
    device: str = "cpu"
    curve_balanced: list[float] = field(default_factory=list)
    curve_auc: list[float | None] = field(default_factory=list)
    final_balanced_acc: float | None = None
    peak_balanced_acc: float | None = None
    peak_balanced_epoch: int | None = None
    final_auc: float | None = None
    peak_auc: float | None = None
    selected_epoch: int | None = None
    acc: float | None = None
    balanced_acc: float | None = None
    auc: float | None = None
    selection: str = "test"
    n_val: int = 0
    val_curve: list[float] = field(default_factory=list)
    val_curve_balanced: list[float] = field(default_factory=list)
    test_pred: list[int] = field(default_factory=list)
    answer_map: list[int] | None = None
    remapped_epochs: int = 0
    threshold: float | None = None
    thresholded_epochs: int = 0
    offsets: list[float] | None = None
    offset_epochs: int = 0
    own_score: float | None = None
    read_score: float | None = None
    guard_pgd_acc: list[float] = field(default_factory=list)
    guard_fired_epoch: int | None = None
    guard_fgsm_acc: list[float] = field(default_factory=list)
    guard_restored_epoch: int | None = None
    guard_every: int | None = None

    @property
    def has_medical_metrics(self) -> bool:
        """Whether balanced accuracy and AUC were measured (results saved by older versions lack them)."""
        return self.peak_balanced_acc is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CellResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class _Track:
    """One reading of a cell's answers through training: its test and validation scores per epoch
    and the epoch its validation score chose (with that epoch's weights where the test set was not
    scored then)."""

    evals: list[EvalResult | None] = field(default_factory=list)  # None: scored on validation only
    val_evals: list[EvalResult] = field(default_factory=list)
    best_val: float = -1.0
    best_epoch: int = -1
    best_state: dict | None = None


@dataclass
class EpochInfo:
    """Passed to a ``progress`` callback after every epoch of a cell."""

    label: str
    epoch: int
    epochs: int
    loss: float
    train_acc: float
    test_acc: float
    elapsed_s: float
    eta_s: float
    test_balanced_acc: float | None = None
    test_auc: float | None = None


ProgressFn = Callable[[EpochInfo], None]

#: The catastrophic-overfitting guard of fast AT. Catastrophic overfitting is the model becoming
#: robust to the single FGSM step it trains on while PGD breaks it (Wong et al. 2020, who watch PGD
#: accuracy on a training batch). At every check the guard measures, on CO_BATCH fixed training
#: images, the accuracy under the training attack (FGSM-RS) and under PGD (CO_STEPS steps of eps/4);
#: it fires when their gap grows by more than CO_DROP from one check to the next. A fall of PGD
#: accuracy alone is not it: on error-minimising noise both fall together as the model stops
#: fitting the noise (a guard on PGD alone stopped such a cell after 2 of 40 epochs, which made the
#: protection look stronger). When it fires, training goes back to the last check that passed
#: (weights, optimiser and schedule; the epochs since are dropped from the curves and from epoch
#: selection) and trains those and the remaining epochs with PGD-2 (2 steps of eps/2, random start),
#: which does not overfit this way; stopping instead would leave an attacker trained too little, and
#: a certificate too kind. A check costs about (CO_STEPS + 1) x CO_BATCH gradient passes, an epoch of
#: fast AT 2 per training image: the guard checks after the first epoch and then every k epochs, k
#: the smallest that keeps its cost within CO_SHARE of training's (every epoch from 3,072 images up;
#: on 800 images, where checking every epoch doubled the cell's cost, every 4th).
CO_BATCH, CO_STEPS, CO_DROP, CO_SHARE = 256, 5, 0.2, 0.25
CO_FALLBACK = {"method": "pgd", "steps": 2}


def guard_every(n_train: int, n_guard: int = CO_BATCH) -> int:
    """Epochs between two checks of the catastrophic-overfitting guard on ``n_train`` images."""
    return max(1, math.ceil((CO_STEPS + 1) * n_guard / (CO_SHARE * 2 * max(1, n_train))))


def _guard_accuracy(net: nn.Module, x: Tensor, y: Tensor, attack: dict, g: torch.Generator,
                    autocast) -> tuple[float, float]:
    """(FGSM-RS accuracy, PGD accuracy) of ``net`` (in eval mode, restored after) on ``x`` at the
    attack's norm and eps: the training attack's own step, and CO_STEPS PGD steps of eps/4."""
    was_training = net.training
    net.eval()
    try:
        with autocast():
            fgsm = attacks.fgsm_rs if attack["norm"] == "linf" else attacks.fgsm_rs_l2
            xf = fgsm(net, x, y, attack["eps"], alpha=attack.get("step_size"), generator=g)
            xa = attacks.pgd(net, x, y, attack["eps"], steps=CO_STEPS, step_size=attack["eps"] / 4,
                             norm=attack["norm"], generator=g)
        with torch.no_grad(), autocast():
            return (float((net(xf).argmax(1) == y).float().mean()), float((net(xa).argmax(1) == y).float().mean()))
    finally:
        net.train(was_training)


def _subseed(seed: int, purpose: str) -> int:
    """An independent 63-bit seed per purpose, so streams never overlap."""
    digest = hashlib.sha256(f"protect.verify/{seed}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _amp(device: torch.device) -> tuple[contextlib.AbstractContextManager | Callable, torch.dtype | None]:
    if device.type != "cuda":
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return (lambda: torch.autocast("cuda", dtype=dtype)), dtype


def _lr_lambda(recipe: Recipe, steps_per_epoch: int) -> Callable[[int], float]:
    total = max(1, recipe.epochs * steps_per_epoch)
    if recipe.schedule == "onecycle":
        warm = max(1.0, recipe.warmup_frac * total)
        start = 0.04  # OneCycleLR's default initial lr/25

        def f(step: int) -> float:
            if step < warm:
                return start + (1 - start) * step / warm
            return max(0.0, (total - step) / max(1.0, total - warm))
    elif recipe.schedule == "cosine":
        def f(step: int) -> float:
            return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    else:
        milestones = sorted(recipe.milestones)

        def f(step: int) -> float:
            epoch = step // steps_per_epoch
            return recipe.gamma ** sum(epoch >= m for m in milestones)
    return f


def _quantise(x: Tensor) -> Tensor:
    return x.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def _apply_static(
    defense: defense_registry.Defense, x: Tensor, y: Tensor, num_classes: int, g: torch.Generator, batch: int
) -> tuple[Tensor, Tensor | None]:
    """Apply a deterministic defense once to the whole uint8 set (re-quantised); soft labels only if changed."""
    xs, ys, changed = [], [], False
    for i in range(0, x.shape[0], batch):
        xb = x[i:i + batch].float().div_(255)
        yb = F.one_hot(y[i:i + batch], num_classes).float()
        xo, yo = defense(xb, yb, g)
        if xo.shape != xb.shape:
            raise ConfigError(f"defense '{defense.name}' changed the image shape {tuple(xb.shape)} -> {tuple(xo.shape)}")
        changed = changed or not torch.equal(yo, yb)
        xs.append(_quantise(xo))
        ys.append(yo)
    return torch.cat(xs), (torch.cat(ys) if changed else None)


def _crop_flip(
    xp: Tensor, idx: Tensor, size: tuple[int, int], pad: int, flip: bool, g: torch.Generator
) -> Tensor:
    """Random ``size`` crops (offsets 0..2*pad) with random horizontal flips of the padded NHWC uint8
    images ``xp[idx]``, as one gather; returns ``n x C x H x W`` in channels-last memory layout."""
    n = idx.shape[0]
    h, w = size
    dev = xp.device
    if pad == 0 and not flip:
        return xp[idx.to(dev)].permute(0, 3, 1, 2)
    oy = torch.randint(0, 2 * pad + 1, (n, 1), generator=g)
    ox = torch.randint(0, 2 * pad + 1, (n, 1), generator=g)
    rows = oy + torch.arange(h)
    cols = ox + torch.arange(w)
    if flip:
        flipped = torch.rand(n, 1, generator=g) < 0.5
        cols = torch.where(flipped, cols.flip(1), cols)
    out = xp[idx.view(n, 1, 1).to(dev), rows.view(n, h, 1).to(dev), cols.view(n, 1, w).to(dev)]
    return out.permute(0, 3, 1, 2)


def _loss(logits: Tensor, target: Tensor, smoothing: float) -> Tensor:
    logits = logits.float()
    if target.dim() == 2:  # soft labels (mixing defenses)
        if smoothing:
            target = target * (1 - smoothing) + smoothing / target.shape[1]
        return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    return F.cross_entropy(logits, target, label_smoothing=smoothing)


def _check_pair(train: TensorSet, test: TensorSet) -> None:
    check_same_classes(test.classes, train.classes, "test", "train")
    if train.x.shape[1:] != test.x.shape[1:]:
        raise InputError(
            f"train images are {tuple(train.x.shape[1:])} (C x H x W) but test images are "
            f"{tuple(test.x.shape[1:])}: both sets must share one size and channel count"
        )
    if len(train) < 2 or len(test) < 1:
        raise InputError(f"need at least 2 training and 1 test image, got {len(train)} and {len(test)}")


def _tqdm_progress(label: str, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="ep", leave=True, dynamic_ncols=True)


def _build_learner(train: TensorSet, recipe: Recipe, training: Training, seed: int) -> nn.Module:
    """The cell's network, initialised from ``seed`` (the global RNG is left as it was): the regime's
    pretrained learner (:mod:`verify.learners`) or ``recipe.model`` from scratch, with the training
    images' normalisation where the recipe asks for it."""
    c, h, w = train.x.shape[1:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if training.learner is not None:  # a pretrained backbone with a new head (verify.learners)
            from .learners import build_learner

            model = build_learner(training.learner, train.num_classes, int(c))
        else:
            model = create_model(recipe.model, train.num_classes, in_channels=int(c), image_size=int(max(h, w)))
    if recipe.normalize:
        if hasattr(model, "set_normalization"):
            xf = train.x.float().div(255)
            model.set_normalization(tuple(xf.mean((0, 2, 3)).tolist()), tuple(xf.std((0, 2, 3)).clamp_min(1e-3).tolist()))
        else:
            log.warning("model %s has no normalisation prefix; recipe.normalize ignored", recipe.model)
    return model


def _selection_set(val: TensorSet | None, x_test: Tensor, y_test: Tensor, recipe: Recipe,
                   dev: torch.device) -> tuple[Tensor, Tensor]:
    """The images that choose the epoch, on ``dev``: ``val`` (None: the test images, the oracle),
    capped at ``recipe.eval_subset`` images (a fixed keyed subset) where that is set."""
    if val is not None:
        x_val = val.x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y_val = val.y.to(dev, non_blocking=True)
    else:
        x_val, y_val = x_test, y_test
    if recipe.eval_subset is not None and recipe.eval_subset < x_val.shape[0]:
        g_eval = torch.Generator().manual_seed(_subseed(0, "eval-subset"))
        sub = torch.randperm(x_val.shape[0], generator=g_eval)[: recipe.eval_subset].sort().values.to(dev)
        x_val, y_val = x_val[sub].contiguous(memory_format=torch.channels_last), y_val[sub]
    return x_val, y_val


def _result(training: str, defense: str, seed: int, evals: list[EvalResult | None], val_evals: list[EvalResult],
            best_epoch: int, epoch_s: list[float], train_acc: float, train_loss: float, started: float, n: int,
            n_test_set: int, n_test: int, dev: torch.device, selection: str, n_val: int, guard_acc: list[float],
            guard_fired: int | None, guard_fgsm: list[float] | None = None, guard_restored: int | None = None,
            every: int | None = None) -> CellResult:
    """The cell's :class:`CellResult`: the numbers at the selected epoch (``best_epoch``, 0-based),
    the oracle peaks over the test evaluations (each metric at its own epoch), and the curves on the
    test set where it was scored (None elsewhere)."""
    full = [i for i, e in enumerate(evals) if e is not None]
    curve = [None if e is None else e.accuracy for e in evals]
    curve_bal = [None if e is None else e.balanced_accuracy for e in evals]
    curve_auc = [None if e is None else e.auc for e in evals]
    peak_epoch = max(full, key=lambda i: curve[i])
    peak_bal_epoch = max(full, key=lambda i: curve_bal[i])
    aucs = [curve_auc[i] for i in full if curve_auc[i] is not None]
    chosen = evals[best_epoch]
    assert chosen is not None and chosen.pred is not None
    return CellResult(
        training=training, defense=defense, seed=seed, curve=curve, final_acc=curve[-1],
        peak_acc=curve[peak_epoch], peak_epoch=peak_epoch + 1, train_acc=train_acc, train_loss=train_loss,
        wall_s=time.perf_counter() - started, epochs=len(evals), epoch_s=epoch_s,
        curve_n=[0 if e is None else n_test for e in evals], n_train=n, n_test=n_test_set, device=str(dev),
        curve_balanced=curve_bal, curve_auc=curve_auc,
        final_balanced_acc=curve_bal[-1], peak_balanced_acc=curve_bal[peak_bal_epoch],
        peak_balanced_epoch=peak_bal_epoch + 1, final_auc=curve_auc[-1], peak_auc=max(aucs) if aucs else None,
        selected_epoch=best_epoch + 1, acc=chosen.accuracy, balanced_acc=chosen.balanced_accuracy, auc=chosen.auc,
        selection=selection, n_val=n_val,
        val_curve=[e.accuracy for e in val_evals], val_curve_balanced=[e.balanced_accuracy for e in val_evals],
        test_pred=chosen.pred.cpu().tolist(),
        answer_map=None if chosen.answer_map is None else list(chosen.answer_map),
        remapped_epochs=sum(e.answer_map is not None for e in val_evals),
        threshold=chosen.threshold, thresholded_epochs=sum(e.threshold is not None for e in val_evals),
        offsets=None if chosen.offsets is None else list(chosen.offsets),
        offset_epochs=sum(e.offsets is not None for e in val_evals),
        guard_pgd_acc=guard_acc, guard_fired_epoch=guard_fired,
        guard_fgsm_acc=list(guard_fgsm or []), guard_restored_epoch=guard_restored, guard_every=every,
    )


def train_cell(
    train: TensorSet,
    test: TensorSet,
    recipe: Recipe,
    training: str | Training,
    defense: str | defense_registry.Defense,
    seed: int,
    device: str | torch.device = "cpu",
    progress: ProgressFn | bool | None = None,
    label: str | None = None,
    val: TensorSet | None = None,
    read: bool = True,
) -> CellResult:
    """Train ``recipe.model`` from scratch on ``train`` under ``training`` and ``defense``; test on
    ``test`` after every epoch.

    ``progress``: None/False (silent), True (a tqdm bar per cell with ETA, loss and accuracies), or a
    callable receiving an :class:`EpochInfo` after every epoch. ``label`` names the cell in progress
    output (default ``"<training>/<defense>"``). ``val``: the validation images that choose the
    reported epoch (same classes and size; None: the test images choose, the oracle). ``read``:
    the attacker also reads the answers (``recipe.remap_answers``; False for clean baselines, which
    keep the model's own). Returns a :class:`CellResult`.
    """
    started = time.perf_counter()
    if isinstance(training, str):
        training = parse_training(training, recipe)
    recipe = recipe.for_training(training)  # the adversarial trainer's own model and epochs, where set
    dfn = defense_registry.get(defense) if isinstance(defense, str) else defense
    dev = resolve_device(device)
    _check_pair(train, test)
    label = label or f"{training.name}/{dfn.name}"
    num_classes = train.num_classes
    c, h, w = train.x.shape[1:]
    autocast, amp_dtype = _amp(dev)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # Under torchrun every process draws the same batch order; crops, defenses and attacks are
    # drawn per process (process 0 of N, or a single process, keeps the single-process streams).
    rank, world = distributed.rank(), distributed.world()
    tag = f"/rank{rank}" if rank else ""
    g_data = torch.Generator().manual_seed(_subseed(seed, "data"))
    g_aug = g_data if world == 1 else torch.Generator().manual_seed(_subseed(seed, "augment" + tag))
    g_def = torch.Generator().manual_seed(_subseed(seed, "defense" + tag))
    g_att = torch.Generator(device=dev).manual_seed(_subseed(seed, "attack" + tag))

    model = _build_learner(train, recipe, training, seed)
    model = distributed.convert_batchnorm(model, dev)  # SyncBatchNorm under torchrun on GPUs
    model = model.to(dev, memory_format=torch.channels_last).train()
    net = model  # what the attacks differentiate (never the DDP wrapper: they take input gradients only)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    # Data, once: uint8 on the device; static defense applied; padded NHWC for the crop gather.
    x = train.x.to(dev, non_blocking=True)
    y = train.y.to(dev, non_blocking=True)
    y_soft: Tensor | None = None
    if dfn.static and dfn.name != "none":
        x, y_soft = _apply_static(dfn, x, y, num_classes, g_def, recipe.eval_batch_size)
    pad = round(recipe.crop_padding * max(h, w) / 32) if recipe.crop_padding else 0
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, pad, pad, pad, pad)).contiguous()  # N x H+2p x W+2p x C
    # A random defense that its reference applies before the crop (RSK+FF) sees the whole images.
    before_crop = bool(getattr(dfn, "before_crop", False)) and not dfn.static
    x_whole = x if before_crop else None
    del x
    x_test = test.x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
    y_test = test.y.to(dev, non_blocking=True)

    n = train.x.shape[0]
    bs = min(recipe.batch_size, n)
    if bs < 2 * world:
        raise ConfigError(f"batch size {bs} is too small to split across {world} processes")
    # A last batch with fewer than 2 images per process is dropped (BatchNorm needs 2).
    steps = n // bs + (1 if n % bs >= 2 * world else 0)
    lr = recipe.lr * float(getattr(net, "lr_scale", 1.0))  # fine-tuning a pretrained learner: smaller steps
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=lr, momentum=recipe.momentum,
                          nesterov=recipe.nesterov and recipe.momentum > 0, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe, steps))
    attack = dict(recipe.attack(training))  # a copy: the guard may switch this cell to PGD-2

    def make_adversarial(xb: Tensor, target: Tensor) -> Tensor:
        if recipe.attack_eval_mode:
            net.eval()  # as torchattacks does in the CUDA reference: BatchNorm running statistics
        try:
            with autocast():
                if attack["method"] == "pgd":
                    return attacks.pgd(net, xb, target, attack["eps"], steps=attack["steps"],
                                       step_size=attack["step_size"], norm=attack["norm"], generator=g_att)
                fn = attacks.fgsm_rs if attack["method"] == "fgsm_rs" else attacks.fgsm_rs_l2
                return fn(net, xb, target, attack["eps"], alpha=attack["step_size"], generator=g_att)
        finally:
            net.train()

    # Model selection (see the module doc): every epoch is scored on the validation images, the epoch
    # with the best validation score is the one reported, measured on the test images. Without
    # ``val`` the test images select too (the oracle: an optimistic choice). With ``eval_subset``
    # (quick tier) the validation images are capped at that many (a fixed subset) and a test set
    # larger than that is scored only at the selected and the last epoch (from a saved copy of the weights).
    n_test = x_test.shape[0]
    if val is not None:
        check_same_classes(val.classes, train.classes, "validation", "train")
    x_val, y_val = _selection_set(val, x_test, y_test, recipe, dev)
    test_every_epoch = recipe.eval_subset is None or n_test <= recipe.eval_subset  # small test sets: every epoch
    val_is_test = x_val is x_test
    # The epoch is chosen by the metric the score will use on this test set.
    metric, _ = score_basis(test.counts())
    # Two readings of the answers, each with its own epoch chosen on validation: the model's own,
    # and the attacker's reading (renamed, or decided at a threshold, where the validation images
    # say so; protected cells only). The result is the reading that scores higher on the test set,
    # so reading the answers can only raise what the attacker gets (module doc of verify.evaluation).
    reading = bool(recipe.remap_answers and read)
    tracks = [_Track()] + ([_Track()] if reading else [])
    # Catastrophic-overfitting guard of fast AT (Wong et al. 2020): PGD accuracy on a fixed training
    # batch after every epoch; a fall of more than CO_DROP restores the previous epoch and stops.
    guard = attack.get("method") in ("fgsm_rs", "fgsm_rs_l2")
    guard_acc: list[float] = []
    guard_fgsm: list[float] = []
    guard_fired: int | None = None
    guard_restored: int | None = None
    checkpoint: dict | None = None  # the state at the last check that passed
    every = guard_every(n, min(CO_BATCH, n)) if guard else None
    if guard:
        g_guard = torch.Generator().manual_seed(_subseed(seed, "co-guard"))
        gi = torch.randperm(n, generator=g_guard)[: min(CO_BATCH, n)].to(dev)
        x_guard = xp[gi, pad:pad + h, pad:pad + w].permute(0, 3, 1, 2).float().div_(255)
        x_guard = x_guard.contiguous(memory_format=torch.channels_last)
        y_guard = y[gi]
        g_guard_att = torch.Generator(device=dev).manual_seed(_subseed(seed, "co-guard-attack"))

    main = rank == 0
    bar = _tqdm_progress(label, recipe.epochs) if progress is True and main else None
    callback = progress if callable(progress) and main else None
    epoch_s: list[float] = []
    train_acc = train_loss = 0.0
    try:
        epoch = -1
        while epoch + 1 < recipe.epochs:
            epoch += 1
            t0 = time.perf_counter()
            perm = torch.randperm(n, generator=g_data)
            stats = torch.zeros(3, device=dev)  # loss sum, correct, seen (exact in float32 up to 2^24 images)
            for s in range(steps):
                idx = perm[s * bs:(s + 1) * bs][rank::world]
                idx_d = idx.to(dev, non_blocking=True)
                yb = y[idx_d]
                ysb = y_soft[idx_d] if y_soft is not None else None
                if x_whole is not None:
                    xw, ysb = dfn(x_whole[idx_d].float().div_(255),
                                  ysb if ysb is not None else F.one_hot(yb, num_classes).float(), g_def)
                    xwp = F.pad(xw.permute(0, 2, 3, 1), (0, 0, pad, pad, pad, pad))
                    xb = _crop_flip(xwp, torch.arange(xw.shape[0]), (h, w), pad, recipe.flip, g_aug)
                    xb = xb.contiguous(memory_format=torch.channels_last)
                else:
                    xb = _crop_flip(xp, idx, (h, w), pad, recipe.flip, g_aug).float().div_(255)
                if not dfn.static and x_whole is None:
                    xb, ysb = dfn(xb, ysb if ysb is not None else F.one_hot(yb, num_classes).float(), g_def)
                    xb = xb.contiguous(memory_format=torch.channels_last)
                target = ysb if ysb is not None else yb
                if attack:
                    xb = make_adversarial(xb, target).contiguous(memory_format=torch.channels_last)
                with autocast():
                    out = model(xb)
                    loss = _loss(out, target, recipe.label_smoothing)
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    if recipe.grad_clip is not None:
                        scaler.unscale_(opt)
                        nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    if recipe.grad_clip is not None:  # after DDP's all-reduce: the same clip on every process
                        nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
                    opt.step()
                sched.step()
                m = idx.shape[0]
                hard = ysb.argmax(1) if ysb is not None else yb
                stats[0] += loss.detach().float() * m
                stats[1] += (out.detach().argmax(1) == hard).sum()
                stats[2] += m
            loss_sum, correct, seen = distributed.all_reduce_sum(stats).tolist()
            train_loss = loss_sum / seen
            train_acc = correct / seen
            distributed.broadcast_buffers(net)
            if not math.isfinite(train_loss):
                raise ConfigError(
                    f"cell {label}: training diverged (loss {train_loss}) in epoch {epoch + 1}; lower the learning rate"
                )
            if guard and guard_fired is None and (epoch == 0 or (epoch + 1) % every == 0):
                fg, pg = _guard_accuracy(net, x_guard, y_guard, attack, g_guard_att, autocast)
                guard_fgsm.append(fg)
                guard_acc.append(pg)
                if len(guard_acc) > 1 and (fg - pg) - (guard_fgsm[-2] - guard_acc[-2]) > CO_DROP:
                    assert checkpoint is not None
                    guard_fired, guard_restored = epoch + 1, checkpoint["epoch"] + 1
                    log.warning("%s: catastrophic overfitting by epoch %d (on a training batch FGSM %.2f -> %.2f, PGD "
                                "%.2f -> %.2f): back to epoch %d, the rest with PGD-2", label, epoch + 1,
                                guard_fgsm[-2], fg, guard_acc[-2], pg, guard_restored)
                    net.load_state_dict(checkpoint["net"])
                    opt.load_state_dict(checkpoint["opt"])
                    sched.load_state_dict(checkpoint["sched"])
                    for tr, saved in zip(tracks, checkpoint["best"]):
                        tr.best_val, tr.best_epoch, tr.best_state = saved
                        del tr.evals[guard_restored:], tr.val_evals[guard_restored:]
                    del epoch_s[guard_restored:]
                    epoch = checkpoint["epoch"]
                    checkpoint = None
                    if bar is not None:
                        bar.n = guard_restored
                        bar.refresh()
                    fallback = dict(attack, **CO_FALLBACK, step_size=attack["eps"] / 2)
                    attack.clear()
                    attack.update(fallback)
                    continue
                checkpoint = {"epoch": epoch, "net": copy.deepcopy(net.state_dict()),
                              "opt": copy.deepcopy(opt.state_dict()), "sched": sched.state_dict(), "best": None}
            last = epoch == recipe.epochs - 1
            own_val = evaluate_metrics(net, x_val, y_val, recipe.eval_batch_size, autocast)
            own_test = None
            if test_every_epoch or last:
                own_test = own_val if val_is_test else evaluate_metrics(net, x_test, y_test, recipe.eval_batch_size,
                                                                        autocast)
            state = None
            for i, tr in enumerate(tracks):
                # the attacker's reading carries its rule (answer_map, threshold) for the test scores
                ev_val = own_val if i == 0 else read_answers(own_val, y_val, num_classes, metric)
                tr.val_evals.append(ev_val)
                ev = None if own_test is None else remapped(own_test, y_test, ev_val.answer_map, ev_val.threshold,
                                                            ev_val.offsets)
                tr.evals.append(ev)
                if ev_val.get(metric) > tr.best_val:
                    tr.best_val, tr.best_epoch = ev_val.get(metric), epoch
                    if ev is None and state is None:
                        state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                    tr.best_state = None if ev is not None else state
            if checkpoint is not None and checkpoint["epoch"] == epoch:
                checkpoint["best"] = [(tr.best_val, tr.best_epoch, tr.best_state) for tr in tracks]
            ev, ev_val = tracks[-1].evals[-1], tracks[-1].val_evals[-1]
            acc = (ev or ev_val).accuracy
            epoch_s.append(time.perf_counter() - t0)
            elapsed = time.perf_counter() - started
            eta = (recipe.epochs - epoch - 1) * (sum(epoch_s) / len(epoch_s))
            if bar is not None:
                bar.set_postfix(loss=f"{train_loss:.3f}", train=f"{train_acc:.3f}", test=f"{acc:.3f}")
                bar.update(1)
            if callback is not None:
                callback(EpochInfo(label, epoch + 1, recipe.epochs, train_loss, train_acc, acc, elapsed, eta,
                                   (ev or ev_val).balanced_accuracy, (ev or ev_val).auc))
            log.debug("%s epoch %d/%d loss %.4f train %.4f test %.4f (%.1fs)", label, epoch + 1,
                      recipe.epochs, train_loss, train_acc, acc, epoch_s[-1])
        scored: dict[int, EvalResult] = {}  # epoch -> the own answers on the test set, scored once for both readings

        def test_at(tr: _Track, e: int) -> None:
            if e not in scored:
                if e != len(tr.evals) - 1:  # an earlier epoch: its saved weights
                    assert tr.best_state is not None
                    net.load_state_dict(tr.best_state)
                scored[e] = evaluate_metrics(net, x_test, y_test, recipe.eval_batch_size, autocast)
            rule = tr.val_evals[e]
            tr.evals[e] = remapped(scored[e], y_test, rule.answer_map, rule.threshold, rule.offsets)

        for tr in tracks:  # the last epoch's test score (always due; kept for results of older versions)
            if tr.evals[-1] is None:
                test_at(tr, len(tr.evals) - 1)
        for tr in tracks:  # the selected epoch: re-score its saved weights on the test set
            if tr.evals[tr.best_epoch] is None:
                test_at(tr, tr.best_epoch)
        for e in scored:  # an epoch scored for one reading is scored for the other too (peaks, curves)
            for tr in tracks:
                if tr.evals[e] is None:
                    test_at(tr, e)
    finally:
        if bar is not None:
            bar.close()

    results = [_result(training.name, dfn.name, seed, tr.evals, tr.val_evals, tr.best_epoch, epoch_s, train_acc,
                       train_loss, started, n, len(test), n_test, dev, "validation" if val is not None else "test",
                       int(x_val.shape[0]), guard_acc, guard_fired, guard_fgsm, guard_restored, every)
               for tr in tracks]
    if len(results) == 1:
        return results[0]
    own, read_ = results
    own_score, read_score = (tr.evals[tr.best_epoch].get(metric) for tr in tracks)  # each at its chosen epoch
    chosen = read_ if read_score > own_score + 1e-12 else own
    # the oracle peaks: the best of either reading at any scored epoch (never below the own answers')
    peak = max((own, read_), key=lambda r: r.peak_acc)
    peak_bal = max((own, read_), key=lambda r: -1.0 if r.peak_balanced_acc is None else r.peak_balanced_acc)
    aucs = [r.peak_auc for r in (own, read_) if r.peak_auc is not None]
    # what each reading scored (the attacker keeps the better), and how often the reading fired
    return dataclasses.replace(chosen, own_score=own_score, read_score=read_score,
                               remapped_epochs=read_.remapped_epochs, thresholded_epochs=read_.thresholded_epochs,
                               offset_epochs=read_.offset_epochs, peak_acc=peak.peak_acc, peak_epoch=peak.peak_epoch,
                               peak_balanced_acc=peak_bal.peak_balanced_acc,
                               peak_balanced_epoch=peak_bal.peak_balanced_epoch, peak_auc=max(aucs) if aucs else None)
