"""The per-file work of a protect run, the same for every engine.

A worker holds a :class:`Context` (the fitted method, the output tree, the options) and turns a
*chunk* of :class:`Task` (relative path, label, what the journal says of it) into results: a
journal line for each protected file, ``skip`` for a file whose output is current, or a failure
with its reason. Per file: read the input, hash it, skip it if current, decode it (admitted by the
memory budget first), batch it with images of the same size, protect, encode, measure PSNR, SSIM
and the largest change of the file as written (a lossy output, JPEG or HEIF, is decoded back from
its bytes the way inputs are; a lossless one holds exactly the protected pixels), write atomically,
hash the output. Pixels are released as soon as their file is written.

Each journal line (and manifest entry) holds ``psnr``, ``ssim``, ``delta_e`` (mean low-frequency
CIELAB colour difference, :func:`protect.fidelity.delta_e`), ``max_delta`` (largest absolute
change of any value, in the image's levels, as written), and ``quality`` / ``subsampling`` (what a
lossy output was encoded with; null for lossless outputs).

Engines (:mod:`protect.engine`) only decide where chunks run: in this process, or in worker
processes; they never hold method logic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

import perturbations
from perturbations import Keyring, Perturbation

from .fidelity import LIMIT_STEPS, delta_e, limit_delta_e, max_delta, measure
from .imageio import LOSSY, Decoded, ImageError, decode, encode_pixels, lossy_settings
from .record import Entry
from .safefs import Tree, UnsafePath

log = logging.getLogger(__name__)

_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

#: Values (pixels x channels) in one batch of same-size images.
BATCH_VALUES = 1 << 22
#: Bytes per decoded value the pipeline itself holds per image (input pixels, protected pixels,
#: the PIL image handed to the encoder, the encoded file), on top of the method's own.
PIPELINE_BYTES_PER_VALUE = 3.5


class Prev(NamedTuple):
    """What the journal says of a file: enough to decide whether its output is current."""

    input_sha256: str
    output_sha256: str
    output: str
    label: str | None
    deps: str


class Task(NamedTuple):
    """One input file to protect."""

    rel: str
    fmt: str
    out_rel: str
    label: int | None
    label_name: str | None
    prev: Prev | None


@dataclass
class Spec:
    """Everything a worker needs to build its :class:`Context` (picklable for spawned workers)."""

    method: str
    params: dict[str, Any]
    state: dict[str, torch.Tensor]
    keyring: Keyring
    in_dir: str
    out_dir: str
    out_format: str
    jpeg_quality: int | None  # None: follow the input ("auto", see protect.imageio.lossy_settings)
    max_pixels: int
    batch_size: int
    overwrite: bool
    device: str
    deps: str
    budget_bytes: int
    max_delta_e: float | None = None  # the fidelity floor (--max-delta-e): None, no limit


class Result(NamedTuple):
    """``kind`` is ``"done"`` (``entry`` is the journal entry), ``"skip"`` or ``"fail"`` (``reason``)."""

    kind: str
    rel: str
    entry: Entry | None = None
    reason: str = ""
    notes: tuple[str, ...] = ()


class Budget:
    """Bytes of image working memory shared by every worker of a run (see :mod:`protect.engine`).

    ``acquire(n)`` waits until ``n`` more bytes fit, except when nothing is held at all (an image
    larger than the whole budget then runs alone). A worker never waits while it holds bytes (it
    flushes first), so workers cannot deadlock each other.
    """

    def __init__(self, limit: int, value: Any = None, cond: Any = None) -> None:
        self.limit = int(limit)
        self.value, self.cond = value, cond  # shared (multiprocessing) or None in one process
        self._local = 0

    def _used(self) -> int:
        return self.value.value if self.value is not None else self._local

    def _add(self, n: int) -> None:
        if self.value is not None:
            self.value.value += n
        else:
            self._local += n

    def try_acquire(self, n: int) -> bool:
        if self.cond is None:
            if self._local and self._local + n > self.limit:
                return False
            self._local += n
            return True
        with self.cond:
            used = self._used()
            if used and used + n > self.limit:
                return False
            self._add(n)
            return True

    def acquire(self, n: int) -> None:
        if self.cond is None:
            self._local += n  # one worker holds nothing when it waits: nothing to wait for
            return
        with self.cond:
            while self._used() and self._used() + n > self.limit:
                self.cond.wait(timeout=1.0)
            self._add(n)

    def release(self, n: int) -> None:
        if n <= 0:
            return
        if self.cond is None:
            self._local -= n
            return
        with self.cond:
            self._add(-n)
            self.cond.notify_all()


def open_input(path: Path, max_pixels: int) -> tuple[Any, int, str]:
    """Open an input for reading: ``(file, size, "")`` or ``(None, 0, reason)``. Only a regular file
    is opened (a FIFO swapped in after discovery would block forever), without blocking, and none
    larger than any image within ``max_pixels`` could be."""
    try:
        fd = os.open(path, os.O_RDONLY | _NONBLOCK | _CLOEXEC)
    except OSError as exc:
        return None, 0, f"cannot read file: {exc.strerror or exc}"
    fh = os.fdopen(fd, "rb")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        fh.close()
        return None, 0, "not a regular file (it changed since the folder was listed)"
    cap = max_pixels * 8 + (256 << 20)
    if st.st_size > cap:
        fh.close()
        return None, 0, (f"file is {st.st_size} bytes, more than an image within the pixel limit "
                         f"({max_pixels}) can take; raise --max-pixels if you trust it")
    return fh, st.st_size, ""


@dataclass
class _Item:
    task: Task
    in_sha: str
    decoded: Decoded
    cost: int


@dataclass
class Context:
    """A worker's fitted method, output tree and options."""

    spec: Spec
    budget: Budget
    method: Perturbation = field(init=False)
    tree: Tree = field(init=False)
    device: torch.device = field(init=False)

    def __post_init__(self) -> None:
        spec = self.spec
        self.method = perturbations.get(spec.method)(spec.keyring, **spec.params)
        if spec.state:
            self.method.load_state_dict(spec.state)
        self.device = torch.device(spec.device)
        self.tree = Tree(spec.out_dir)
        self.in_dir = Path(spec.in_dir)
        self.per_value = PIPELINE_BYTES_PER_VALUE + self.method.work_bytes_per_value

    def close(self) -> None:
        self.tree.close()

    # -- one chunk --------------------------------------------------------------------------
    def run(self, tasks: Sequence[Task]) -> list[Result]:
        results: list[Result] = []
        self._groups: dict[tuple, list[_Item]] = {}
        self._results = results
        for task in tasks:
            item, outcome = self._load(task, self._admit)
            if outcome is not None:
                results.append(outcome)
                continue
            assert item is not None
            group = self._groups.setdefault(item.decoded.key, [])
            group.append(item)
            if len(group) >= self.spec.batch_size or len(group) * item.decoded.pixels.size >= BATCH_VALUES:
                results.extend(self._flush(self._groups.pop(item.decoded.key)))
        self._flush_all()
        return results

    def _flush_all(self) -> None:
        for key in sorted(self._groups):
            self._results.extend(self._flush(self._groups.pop(key)))

    def _admit(self, n: int, holding: int) -> None:
        """Take ``n`` more bytes of the budget for the file being loaded, which already holds
        ``holding``. If they do not fit, flush this worker's batches and wait holding nothing (a
        worker that waited while holding bytes could deadlock with another one doing the same)."""
        if self.budget.try_acquire(n):
            return
        self._flush_all()
        self.budget.release(holding)
        self.budget.acquire(n + holding)

    def _cost(self, values: int, bits: int) -> int:
        return int(values * (bits // 8) * self.per_value)

    def _read(self, task: Task, admit: Any) -> tuple[bytes | None, int, str]:
        """The input's bytes (admitted by the budget first), their budget share, or a failure reason.
        Only a regular file is read (a FIFO swapped in after discovery would block forever), and no
        file larger than any image within ``max_pixels`` could be."""
        fh, size, reason = open_input(self.in_dir / task.rel, self.spec.max_pixels)
        if fh is None:
            return None, 0, reason
        with fh:
            st_size = size
            admit(st_size, 0)
            try:
                return fh.read(), st_size, ""
            except MemoryError:
                self.budget.release(st_size)
                return None, 0, "not enough memory to read the file"
            except OSError as exc:
                self.budget.release(st_size)
                return None, 0, f"cannot read file: {exc.strerror or exc}"

    def _load(self, task: Task, admit: Any) -> tuple[_Item | None, Result | None]:
        data, file_cost, reason = self._read(task, admit)
        if data is None:
            return None, Result("fail", task.rel, reason=reason)
        in_sha = hashlib.sha256(data).hexdigest()
        prev = task.prev
        if (prev is not None and not self.spec.overwrite and prev.input_sha256 == in_sha
                and prev.label == task.label_name and prev.deps == self.spec.deps and prev.output == task.out_rel
                and self.tree.sha256(task.out_rel) == prev.output_sha256):
            self.budget.release(file_cost)
            return None, Result("skip", task.rel)
        admitted = file_cost

        def on_header(width: int, height: int, bands: int, bits: int) -> None:
            nonlocal admitted
            cost = self._cost(width * height * bands, bits)
            admit(cost, admitted)
            admitted += cost

        try:
            decoded = decode(data, task.fmt, self.spec.max_pixels, on_header=on_header)
        except ImageError as exc:
            self.budget.release(admitted)
            return None, Result("fail", task.rel, reason=str(exc))
        except MemoryError:
            self.budget.release(admitted)
            return None, Result("fail", task.rel, reason="not enough memory to decode the image")
        except BaseException:
            self.budget.release(admitted)
            raise
        del data
        cost = self._cost(decoded.pixels.size, decoded.bits)  # the file's bytes are released now
        if admitted > cost:
            self.budget.release(admitted - cost)
        elif cost > admitted:
            self.budget.acquire(cost - admitted)
        return _Item(task, in_sha, decoded, cost), None

    def _flush(self, items: list[_Item]) -> list[Result]:
        """Protect a batch of same-size images, write each output, return their results."""
        try:
            # N x H x W x C (a view, not a copy, for a lone image: photos come one at a time)
            stack = items[0].decoded.pixels[None] if len(items) == 1 else np.stack([it.decoded.pixels for it in items])
            for it in items:
                it.decoded.pixels = None  # type: ignore[assignment]  # the stack holds them now
            levels = items[0].decoded.levels  # the batch shares it: it is part of the batching key
            wide = stack.dtype == np.uint16  # uint16 values go to the methods as int32
            with warnings.catch_warnings():  # decoded pixels may be read-only: they are only read here
                warnings.simplefilter("ignore", UserWarning)
                v = torch.from_numpy(stack.astype(np.int32) if wide else stack).permute(0, 3, 1, 2)
            v = v.to(self.device, non_blocking=True)
            labels = None
            if items[0].task.label is not None:
                labels = torch.tensor([it.task.label for it in items], dtype=torch.long)
            with torch.inference_mode():
                try:
                    q = self.method.protect_levels(v, labels, [it.task.rel for it in items], levels)
                except perturbations.InputError as exc:  # e.g. an image the fitted state does not know
                    return [Result("fail", it.task.rel, reason=str(exc)) for it in items]
                known_des: list[float] | None = None  # each image's dE when the floor measured it
                if self.spec.max_delta_e is not None:  # the fidelity floor: scale back what shows
                    q, scales, known_des = limit_delta_e(v, q, levels, self.spec.max_delta_e)
                    for it, sc in zip(items, scales):
                        if sc < 1.0:
                            it.decoded.notes.append(f"change scaled to {sc:.3f} for --max-delta-e "
                                                    f"{self.spec.max_delta_e:g}")
                q = q.contiguous(memory_format=torch.channels_last)  # the layout of v and of the files
                # a lossless output holds exactly q: measured here, batched; a lossy one once written
                fid: list[tuple[float, float, int, float] | None] = [None] * len(items)
                exact = [i for i, it in enumerate(items) if self._out_format(it) not in LOSSY]
                if exact:
                    vs, qs = (v, q) if len(exact) == len(items) else (v[exact], q[exact])
                    ps, ss = measure(vs, qs, levels)
                    des = delta_e(vs, qs, levels) if known_des is None else [known_des[i] for i in exact]
                    for j, (i, m) in enumerate(zip(exact, max_delta(vs, qs))):
                        fid[i] = (ps[j], ss[j], m, des[j])
                    del vs, qs
            out = q.permute(0, 2, 3, 1).cpu().numpy()  # N x H x W x C, each image contiguous
            del q
            if wide:
                out = out.astype(np.uint16)
            results = [self._write(it, out[i], v[i:i + 1], levels, fid[i]) for i, it in enumerate(items)]
            del v
        finally:
            self.budget.release(sum(it.cost for it in items))
        return results

    def _out_format(self, item: _Item) -> str:
        return "PNG" if self.spec.out_format == "png" else item.decoded.format

    def _measure_written(self, data: bytes, fmt: str, ref: torch.Tensor,
                         levels: int) -> tuple[float, float, int, float]:
        """PSNR, SSIM, largest change and low-frequency dE of the encoded file ``data`` against the input ``ref``
        (1 x C x H x W on the compute device), decoded as an input would be."""
        back = decode(data, fmt, self.spec.max_pixels).pixels
        if back.shape != (ref.shape[2], ref.shape[3], ref.shape[1]):
            raise ImageError(f"the encoded file decodes to {back.shape}, not the input's shape")
        with warnings.catch_warnings():  # decoded pixels may be read-only: they are only read here
            warnings.simplefilter("ignore", UserWarning)
            w = torch.from_numpy(back.astype(np.int32) if back.dtype == np.uint16 else back)
        w = w.permute(2, 0, 1)[None].to(ref.device)
        ps, ss = measure(ref, w, levels)
        return ps[0], ss[0], max_delta(ref, w)[0], delta_e(ref, w, levels)[0]

    def _within_floor_written(self, pixels: np.ndarray, dec: Decoded, fmt: str, ref: torch.Tensor, levels: int,
                              floor: float, fid: tuple[float, float, int, float]
                              ) -> tuple[bytes, tuple[float, float, int, float]]:
        """A lossy file whose measured dE is above the fidelity floor: scale the change back further
        (in steps of 1/``LIMIT_STEPS`` of what was encoded, as :func:`limit_delta_e` does before
        encoding) and encode again until the written file is within the floor. At scale 0 the file
        holds the original re-encoded, whatever its dE: the codec's error is not the method's."""
        x = ref[0].permute(1, 2, 0).cpu().numpy().astype(np.float64)
        change = pixels.astype(np.float64) - x
        k = LIMIT_STEPS
        while fid[3] > floor and k > 0:
            k = min(k - 1, int(k * floor / fid[3]))
            scaled = np.clip(np.rint(x + change * (k / LIMIT_STEPS)), 0, levels).astype(pixels.dtype)
            data = encode_pixels(scaled, dec, fmt, self.spec.jpeg_quality)
            fid = self._measure_written(data, fmt, ref, levels)
        dec.notes.append(f"change scaled by a further {k / LIMIT_STEPS:.3f} for --max-delta-e {floor:g} "
                         f"in the {fmt} file as written")
        return data, fid

    def _write(self, item: _Item, pixels: np.ndarray, ref: torch.Tensor, levels: int,
               fid: tuple[float, float, int, float] | None) -> Result:
        task, dec = item.task, item.decoded
        fmt = self._out_format(item)
        quality, subsampling = lossy_settings(fmt, dec.meta, self.spec.jpeg_quality)
        if pixels.shape[2] == 1:
            subsampling = None  # one channel: no chroma to subsample
        try:
            data = encode_pixels(pixels, dec, fmt, self.spec.jpeg_quality)
            if fid is None:  # lossy: measure what the file holds, before it is written
                fid = self._measure_written(data, fmt, ref, levels)
                floor = self.spec.max_delta_e
                if floor is not None and fid[3] > floor:  # the codec's own error on top of the change
                    data, fid = self._within_floor_written(pixels, dec, fmt, ref, levels, floor, fid)
            self.tree.write(task.out_rel, data)
        except UnsafePath as exc:
            return Result("fail", task.rel, reason=f"cannot write output: {exc.strerror}")
        except (ImageError, OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return Result("fail", task.rel, reason=f"cannot write output: {reason}")
        out_sha, p, s, de = hashlib.sha256(data).hexdigest(), round(fid[0], 3), round(fid[1], 5), round(fid[3], 3)
        line = json.dumps({
            "path": task.rel, "output": task.out_rel, "label": task.label_name, "input_sha256": item.in_sha,
            "output_sha256": out_sha, "psnr": p, "ssim": s, "delta_e": de, "max_delta": int(fid[2]), "quality": quality,
            "subsampling": subsampling, "notes": dec.notes, "deps": self.spec.deps,
        }, sort_keys=True)
        entry = Entry(line, task.rel, task.out_rel, item.in_sha, out_sha, task.label_name, self.spec.deps, p, s, de)
        return Result("done", task.rel, entry=entry, notes=tuple(dec.notes))


# -- the worker-process side of the local engine --------------------------------------------
_CONTEXT: Context | None = None


def init_worker(spec: Spec, limit: int, value: Any, cond: Any, parent: int) -> None:
    """Initialiser of a worker process: one torch thread, no SIGINT (the parent handles Ctrl-C),
    dies with its parent (Linux), and builds its :class:`Context`."""
    import signal

    global _CONTEXT
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    warnings.simplefilter("ignore")  # decoder warnings about one file: its result says what matters
    _die_with_parent(parent)
    torch.set_num_threads(1)
    _CONTEXT = Context(spec, Budget(limit, value, cond))


def run_chunk(tasks: Sequence[Task]) -> list[Result]:
    """Worker-process entry point: run one chunk in this process's :class:`Context`."""
    assert _CONTEXT is not None, "worker not initialised"
    return _CONTEXT.run(tasks)


def _die_with_parent(parent: int) -> None:
    """Ask Linux to kill this worker when the parent dies (kill -9 of the run must not leave
    workers writing into the output folder)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
