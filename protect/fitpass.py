"""The fit pass: what a method that must see pixels (Unlearnable Clusters, clustered CUDA) gets.

:func:`fit_data` builds the :class:`~perturbations.FitData` of a dataset: labels, a sample of sizes
(headers only) and a streaming batch factory. The factory decodes the files once per call, in
dataset order, in a few threads (Pillow and torch release the GIL), and resizes every image to the
size the method asks for (its surrogate's input size): mixed sizes and shapes are therefore handled
by resizing for the fit only (aspect ratio not kept, as the surrogates' own preprocessing would do
for a centre-free view; the protected outputs keep their own size). Grey images are repeated to
three channels (or colour averaged to one), alpha is dropped, every image is scaled to [0, 1] by its
own ``levels`` (255, 65535, or ``2**BitsStored - 1`` for DICOM).
Memory: at most ``2 x threads`` decoded images in flight plus one batch of resized ones.
Files that cannot be read are left out here; the protect pass reports them.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from perturbations import FitData

from .discover import Dataset
from .dicom import FORMAT as DICOM
from .dicom import header as dicom_header
from .imageio import ImageError, decode
from .work import open_input

log = logging.getLogger(__name__)

SIZE_SAMPLE = 256


GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def sample_sizes(dataset: Dataset, max_pixels: int) -> tuple[list[tuple[int, int]], int]:
    """``(height, width)`` of an evenly spaced sample of the images (headers only), and 1 when
    every sampled image is grey, else 3."""
    entries = dataset.entries
    step = max(1, len(entries) // SIZE_SAMPLE)
    sizes = []
    channels = 1
    for entry in entries[::step][:SIZE_SAMPLE]:
        try:
            if entry.format == DICOM:
                w, h, bands = dicom_header(entry.path)
                if bands != 1:
                    channels = 3
            else:
                with Image.open(entry.path, formats=[entry.format]) as im:
                    w, h = im.size
                    if im.mode not in GREY_MODES:
                        channels = 3
            if w * h <= max_pixels:
                sizes.append((h, w))
        except Exception:  # noqa: BLE001 - unreadable files are reported when processed
            continue
    return sizes, (channels if sizes else 3)


def load_resized(path: Path, fmt: str, max_pixels: int, size: tuple[int, int], channels: int) -> torch.Tensor | None:
    """One image as float32 ``channels x size`` in [0, 1], or None when it cannot be read."""
    fh, _, reason = open_input(path, max_pixels)
    if fh is None:
        log.debug("fit: %s: %s", path, reason)
        return None
    try:
        with fh:
            data = fh.read()
        decoded = decode(data, fmt, max_pixels)
    except (OSError, ImageError, MemoryError) as exc:
        log.debug("fit: %s: %s", path, exc)
        return None
    del data
    px = decoded.pixels
    h, w = size
    if px.dtype == np.uint8:
        # Pillow's resampling is antialiased and fixed-point: the same bytes on every machine
        im = Image.fromarray(px[..., 0] if px.shape[2] == 1 else px)
        if im.size != (w, h):
            im = im.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=3.0)
        arr = np.asarray(im)
        t = torch.from_numpy(arr.copy()).float().div_(decoded.levels)
        t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    else:
        t = torch.from_numpy(px.astype(np.float32) / float(decoded.levels)).permute(2, 0, 1)
        if tuple(t.shape[-2:]) != (h, w):
            shrink = t.shape[-2] > h or t.shape[-1] > w
            t = F.interpolate(t[None], size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)[0]
    if t.shape[0] != channels:
        t = t.expand(3, -1, -1) if channels == 3 else t.mean(0, keepdim=True)
    return t.clamp(0, 1).contiguous()


def batch_factory(dataset: Dataset, max_pixels: int, threads: int) -> Callable[..., Iterator[tuple[torch.Tensor, list[int]]]]:
    """The ``FitData.batches`` of ``dataset`` (see the module doc)."""
    entries = dataset.entries

    def batches(size: tuple[int, int], channels: int = 3, batch_size: int = 64,
                only: Sequence[int] | None = None) -> Iterator[tuple[torch.Tensor, list[int]]]:
        if channels not in (1, 3):
            raise ValueError("channels must be 1 or 3")
        size = (int(size[0]), int(size[1]))
        positions = list(range(len(entries))) if only is None else [int(i) for i in only]
        window = max(2, 2 * threads)
        with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="fit") as pool:
            pending: deque = deque()
            imgs: list[torch.Tensor] = []
            idx: list[int] = []
            it = iter(positions)
            for i in it:
                pending.append((i, pool.submit(load_resized, entries[i].path, entries[i].format, max_pixels, size,
                                               channels)))
                if len(pending) >= window:
                    break
            while pending:
                i, fut = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(load_resized, entries[nxt].path, entries[nxt].format,
                                                     max_pixels, size, channels)))
                t = fut.result()
                if t is None:
                    continue
                imgs.append(t)
                idx.append(i)
                if len(imgs) >= batch_size:
                    yield torch.stack(imgs), idx
                    imgs, idx = [], []
            if imgs:
                yield torch.stack(imgs), idx

    return batches


def fit_data(dataset: Dataset, max_pixels: int, threads: int = 2, device: str = "cpu", memory: int = 1 << 30,
             progress: Callable[[str, int, int], None] | None = None,
             sample: tuple[list[tuple[int, int]], int] | None = None) -> FitData:
    """Labels, a size sample and the streaming batch factory of ``dataset``; ``sample``: the result of
    :func:`sample_sizes` for the same dataset and ``max_pixels`` when the caller has read it already."""
    labels = [e.label for e in dataset.entries] if dataset.labelled else None
    sizes, channels = sample if sample is not None else sample_sizes(dataset, max_pixels)
    return FitData(len(dataset.classes), labels, sizes,  # type: ignore[arg-type]
                   [e.rel for e in dataset.entries], batch_factory(dataset, max_pixels, threads),
                   device=device, memory=memory, progress=progress, channels=channels)
