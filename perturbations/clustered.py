"""Surrogate clusters: what label-agnostic methods fit before protecting (Unlearnable Clusters,
clustered CUDA).

One pass over the dataset computes every image's surrogate features (the surrogate at its own input
size; the images are resized for it only) and, when the method asks, keeps a keyed sample of the
images at that size as 8-bit tensors (bounded by ``FitData.memory``). Keyed cosine K-means then
gives K centres and a cluster per image (:mod:`perturbations.clustering`). New images join later
(``extend``: the nearest centre of their features), so a fitted state protects more images with the
same key. The state holds the centres, the per-image table, the mean raw feature of every cluster
and the SHA-256 of the surrogate's weights (checked when the surrogate is loaded again).

Without a surrogate spec the default is chosen from what is on the machine
(:func:`perturbations.surrogates.default_surrogate`: CLIP RN50/openai where its weights are local,
else the bundled ``cifar-resnet20``); :attr:`SurrogateClusters.surrogate_choice` says which and why.

Fewer images than clusters: a fit on ``N < K`` images makes ``K_eff = N`` clusters (one per image;
K-means cannot make more), recorded in the state as ``clusters_used`` (only then, so states of
ordinary fits are unchanged) and said in :meth:`SurrogateClusters.note`. Fewer than
:data:`MIN_FIT_IMAGES` images are refused with a hint to ``--state RECORD``: new photos join a
finished run's clusters without a fit.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .base import FitData
from .clustering import ClusterTable, kmeans, nearest, normalise
from .errors import ConfigError
from .keyring import Keyring

log = logging.getLogger(__name__)

#: Images per batch of the feature pass.
FEATURE_BATCH = 64
#: State keys of the per-image table.
TABLE_KEYS = ("table_hashes", "table_clusters")
#: The fewest readable images a fit clusters (one cluster of one image protects nothing against
#: another cluster); ``clusters=1`` asks for one cluster and needs one image.
MIN_FIT_IMAGES = 2


def _sha_tensor(sha: str) -> torch.Tensor:
    return torch.tensor(list(bytes.fromhex(sha)) if sha else [], dtype=torch.uint8)


def _sha_str(t: torch.Tensor | None) -> str:
    return bytes(t.tolist()).hex() if t is not None else ""


class SurrogateClusters:
    """Keyed K-means of surrogate features and the cluster of every image.

    Args:
        keyring: key material (K-means seeding from ``"<purpose>/kmeans"``; a ``random:``
            surrogate's weights from the key too).
        clusters: K (>= 1).
        surrogate: a surrogate spec (``perturbations.surrogates``), e.g. ``cifar-resnet20``; ``None``:
            :func:`~perturbations.surrogates.default_surrogate` chooses (``surrogate_choice`` says why).
        surrogate_weights: optional local weights file for the spec.
        purpose: the method's name, to keep key streams apart.
        restarts: K-means restarts (lowest inertia kept).
    """

    def __init__(self, keyring: Keyring, clusters: int, surrogate: str | None, surrogate_weights: str | None,
                 purpose: str, restarts: int = 4) -> None:
        from .surrogates import default_surrogate, surrogate_reason

        if isinstance(clusters, bool) or int(clusters) != clusters or clusters < 1:
            raise ConfigError(f"{purpose}: clusters must be an integer >= 1, got {clusters}")
        if surrogate is None:
            surrogate, reason = default_surrogate(surrogate_weights)
        elif not isinstance(surrogate, str) or not surrogate:
            raise ConfigError(f"{purpose}: a surrogate spec is required (e.g. cifar-resnet20 or clip:RN50/openai)")
        else:
            reason = surrogate_reason(surrogate)
        self.keyring, self.k, self.spec, self.weights = keyring, int(clusters), surrogate, surrogate_weights
        #: One line: which surrogate and why (``surrogate: cifar-resnet20 (bundled; ...)``).
        self.surrogate_choice = reason
        #: Clusters the fitted state has: ``k``, or fewer when the fit saw fewer images than ``k``.
        self.k_eff = self.k
        self.purpose, self.restarts = purpose, restarts
        self.centres: torch.Tensor | None = None  # K x D, unit norm
        self.means: torch.Tensor | None = None  # K x D, mean raw feature per cluster
        self.table = ClusterTable()
        self.surrogate_sha = ""
        self._surrogate: Any = None

    # -- the surrogate ---------------------------------------------------------------------
    def surrogate(self, device: str | torch.device = "cpu") -> Any:
        """The loaded surrogate (loaded once; its weights must match a loaded state's)."""
        from .surrogates import load_surrogate

        if self._surrogate is None:
            s = load_surrogate(self.spec, self.weights, keyring=self.keyring, device=device)
            if self.surrogate_sha and s.weights_sha256 != self.surrogate_sha:
                raise ConfigError(f"{self.purpose}: surrogate '{self.spec}' has other weights than the ones the "
                                  f"state was fitted with (sha256 {s.weights_sha256[:12]} != {self.surrogate_sha[:12]})")
            self.surrogate_sha = s.weights_sha256
            self._surrogate = s
        elif str(self._surrogate.device) != str(torch.device(device)):
            self._surrogate = self._surrogate.to(device)
        return self._surrogate

    def release(self) -> None:
        """Drop the loaded surrogate (workers that protect files never need it)."""
        self._surrogate = None

    # -- fitting ---------------------------------------------------------------------------
    def features(self, data: FitData, only: list[int] | None = None, keep: int = 0,
                 stage: str = "features") -> tuple[torch.Tensor, list[int], torch.Tensor | None, list[int]]:
        """Surrogate features of the images (all, or the positions ``only``) in one decode pass.

        Returns ``(features n x D on CPU, their positions, kept images k x 3 x S x S uint8 or None,
        the kept images' positions)``; ``keep`` images at most are kept, a keyed uniform sample.
        """
        if data.batches is None:
            raise ConfigError(f"{self.purpose}: fitting needs the images (FitData.batches)")
        s = self.surrogate(data.device)
        h, w = s.input_size
        total = len(data.ids) if only is None else len(only)
        wanted: set[int] = set()
        if keep > 0:
            pool = list(range(len(data.ids))) if only is None else list(only)
            if keep >= len(pool):
                wanted = set(pool)
            else:
                perm = torch.randperm(len(pool), generator=self.keyring.generator(f"{self.purpose}/sample"))
                wanted = {pool[i] for i in perm[:keep].tolist()}
        feats, where, kept, kept_at = [], [], [], []
        done = 0
        for images, idx in data.batches((h, w), channels=3, batch_size=FEATURE_BATCH, only=only):
            idx = list(idx)
            feats.append(s.batch_features(images.to(s.device)).float().cpu())
            where.extend(idx)
            if wanted:
                sel = [j for j, i in enumerate(idx) if i in wanted]
                if sel:
                    kept.append(images[sel].mul(255).round_().to(torch.uint8))
                    kept_at.extend(idx[j] for j in sel)
            done += len(idx)
            data.report(stage, done, total)
        if not feats:
            raise ConfigError(f"{self.purpose}: none of the images could be read for fitting")
        return torch.cat(feats), where, (torch.cat(kept) if kept else None), kept_at

    def cluster(self, features: torch.Tensor, positions: list[int], ids: list[str]) -> torch.Tensor:
        """K-means on ``features`` (rows at ``positions`` of ``ids``); fills centres, means, table.
        Returns the cluster of every row."""
        n = features.shape[0]
        least = min(self.k, MIN_FIT_IMAGES)
        if n < least:
            raise ConfigError(
                f"{self.purpose}: fitting clusters needs at least {least} readable images, got {n}; protect a folder "
                f"of {least} or more photos (--clusters K sets how many clusters), or protect new photos with a "
                f"finished run's fitted clusters: --state RECORD (that run's OUT_DIR.protect, same key)")
        k = self.k_eff = min(self.k, n)
        if k < self.k:
            log.warning("%s", self.note())
        gen = self.keyring.generator(f"{self.purpose}/kmeans")
        centres, assign, inertia = kmeans(normalise(features), k, gen, restarts=self.restarts)
        counts = torch.bincount(assign, minlength=k).float()
        means = torch.zeros(k, features.shape[1]).index_add_(0, assign, features.float()) / counts.clamp_min(1)[:, None]
        log.info("%s: %d clusters of %d images (sizes %s), inertia %.4g", self.purpose, k, features.shape[0],
                 counts.long().tolist(), inertia)
        self.centres, self.means = centres, means
        self.table = ClusterTable.build([ids[p] for p in positions], assign.tolist())
        return assign

    def extend(self, data: FitData) -> bool:
        """Assign the images the table lacks to their nearest centre; True if any was added."""
        if self.centres is None:
            raise ConfigError(f"{self.purpose}: no fitted centres to extend")
        missing = self.table.missing(list(data.ids))
        if not missing:
            return False
        feats, where, _, _ = self.features(data, only=missing, stage="assign")
        assign = nearest(normalise(feats), self.centres)
        self.table = self.table.merged(ClusterTable.build([data.ids[p] for p in where], assign.tolist()))
        log.info("%s: %d new image(s) joined their nearest cluster", self.purpose, len(where))
        return True

    # -- reporting -------------------------------------------------------------------------
    def note(self) -> str | None:
        """One line when the fitted state has fewer clusters than asked for (``K_eff < K``), else None."""
        if self.k_eff >= self.k:
            return None
        return (f"{self.purpose}: {self.k_eff} clusters, not the {self.k} asked for: the fit saw only {self.k_eff} "
                f"images (at most one cluster per image); protect new photos into these clusters with --state RECORD")

    def notes(self) -> list[str]:
        """The human lines for a run summary: the surrogate choice, and :meth:`note` when there is one."""
        return [self.surrogate_choice] + ([n] if (n := self.note()) else [])

    def report(self) -> dict[str, Any]:
        """Fit-report entries: the surrogate choice, and ``clusters_used`` with its note when ``K_eff < K``."""
        out: dict[str, Any] = {"surrogate": self.surrogate_choice}
        if self.k_eff < self.k:
            out.update(clusters_used=self.k_eff, clusters_note=self.note())
        return out

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.centres is None or self.means is None:
            return {}
        state = {"centres": self.centres.clone(), "cluster_means": self.means.clone(),
                 "table_hashes": self.table.hashes.clone(), "table_clusters": self.table.clusters.clone(),
                 "surrogate_sha256": _sha_tensor(self.surrogate_sha)}
        if self.k_eff < self.k:  # only then: the states of ordinary fits stay as they were
            state["clusters_used"] = torch.tensor(self.k_eff, dtype=torch.long)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        centres, means = state.get("centres"), state.get("cluster_means")
        if centres is None or means is None or centres.ndim != 2 or means.shape != centres.shape:
            raise ConfigError(f"{self.purpose}: saved state has no valid cluster centres")
        used = state.get("clusters_used")
        k_eff = centres.shape[0]
        if used is not None and (used.numel() != 1 or int(used) != k_eff or not 1 <= k_eff < self.k):
            raise ConfigError(f"{self.purpose}: saved state says {int(used.flatten()[0]) if used.numel() else '?'} "
                              f"clusters used but holds {k_eff} centres for a method of {self.k}")
        if used is None and k_eff != self.k:
            raise ConfigError(f"{self.purpose}: saved state has {k_eff} clusters, the method {self.k}")
        self.centres, self.means = centres.float().clone(), means.float().clone()
        self.table = ClusterTable(state.get("table_hashes"), state.get("table_clusters"))
        if len(self.table) and int(self.table.clusters.max()) >= k_eff:
            raise ConfigError(f"{self.purpose}: saved cluster table refers to clusters beyond {k_eff}")
        self.k_eff = k_eff
        self.surrogate_sha = _sha_str(state.get("surrogate_sha256"))

    def params(self) -> dict[str, Any]:
        return {"clusters": self.k, "surrogate": self.spec, "surrogate_weights": self.weights,
                "surrogate_sha256": self.surrogate_sha or None}
