"""The Ray engine: the per-file work of :mod:`protect.work` on a Ray cluster (``--engine ray``).

The driver (this process) does what a local run does: discover, check the folders, lock, fit the
method once, save its state, and journal every result. Only the per-file work moves: one Ray actor
per worker holds a :class:`~protect.work.Context` built from the fitted :class:`~protect.work.Spec`
(put in the object store once and shared by every actor) and runs ``Context.run`` over chunks of
the sorted file list, exactly as a local worker process does, so the outputs are byte-identical to
a local run with the same key. Each actor is fed at most two chunks at a time; results come back to
the driver as chunks finish (in submission order with ``ordered``, for ``--strict``) and go through
the same ``on_results`` callback as the local engine's.

Resources: every actor asks for one CPU, and one GPU too with ``--device cuda`` (Ray then gives it
its own ``CUDA_VISIBLE_DEVICES``). Memory: each actor gets an equal share of ``--memory`` as its own
byte budget (actors on different machines cannot share one counter). Workers: ``--workers`` (capped
at what the cluster has), by default every CPU (or GPU) of the cluster, one per core for a local
cluster. Each actor imports torch and builds its method when it starts: a few seconds, once a run.

The cluster: with ``RAY_ADDRESS`` set, this process connects to it as the driver (the input,
output and record folders must then be at the same paths on every node: a shared file system, and
``protect`` must be installed there); otherwise a private local cluster is started with one CPU per
worker, no dashboard, a small object store, and worker logs kept out of the terminal, and it is
shut down when the run ends (see :func:`connect` on the addresses it listens on). A process that
already called ``ray.init`` keeps its cluster.

Stopping: Ctrl-C, ``--strict`` or a dead actor kill every actor and wait for them to be gone before
the pipeline removes temporaries; actors belong to the driver, so a killed driver takes them with it,
and the rerun resumes from the journal as after any other interruption.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from types import ModuleType
from typing import Any

import torch

from .engine import WorkerDied, default_workers, drive
from .errors import ConfigError, ProtectError
from .work import Budget, Context, Result, Spec, Task

log = logging.getLogger(__name__)

#: Object store of a local cluster started for ``protect images``: the Spec and the chunks' results.
LOCAL_OBJECT_STORE = 200 << 20
#: Chunks queued on one actor at a time (one running, one waiting).
PER_ACTOR = 2
#: Seconds to wait for killed actors to be gone.
STOP_TIMEOUT = 30.0


class RayMissing(ConfigError):
    """``--engine ray`` without Ray installed."""


def require_ray() -> ModuleType:
    """The ``ray`` module, or :class:`RayMissing` with the install command."""
    try:
        import ray
    except ImportError:
        raise RayMissing("--engine ray needs Ray, which is not installed: pip install 'protect[ray]'") from None
    return ray


def connect(num_cpus: int, object_store_bytes: int = LOCAL_OBJECT_STORE) -> bool:
    """Make sure this process is a Ray driver; True when this call connected (the caller then
    calls :func:`disconnect`), False when ``ray.init`` had been called before (a test, a notebook).

    ``RAY_ADDRESS`` set: connect to that cluster. Otherwise start a local one with ``num_cpus``
    CPUs, without dashboard or usage reporting, its logs kept out of the terminal. Ray's services
    listen on the machine's address whatever ``ray.init`` is told (it turns 127.0.0.1 into that
    address). Recent Ray versions guard a cluster that ``ray.init`` starts with a token
    (``~/.ray/auth_token``, made on first use); older ones do not."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
    address = os.environ.get("RAY_ADDRESS")
    try:
        if address:
            log.info("ray: connecting to %s", address)
            _check_reachable(address)
            ray.init(address=address, **quiet)
        else:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(address="local", num_cpus=max(1, int(num_cpus)), include_dashboard=False,
                     object_store_memory=int(object_store_bytes), **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        why = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0].strip("'\"")
        if address:
            raise ConfigError(f"cannot connect to the Ray cluster at RAY_ADDRESS={address} ({why}); if it uses "
                              "token authentication, set RAY_AUTH_MODE=token and give this machine its token") from None
        raise ConfigError(f"cannot start a local Ray cluster ({why}); set RAY_ADDRESS to use a running one") from None
    return True


def _check_reachable(address: str) -> None:
    """Fail in seconds, in one line, when ``RAY_ADDRESS`` names a host:port nothing listens on (Ray
    itself retries for minutes)."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and the like: Ray looks for the cluster itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise ConfigError(f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({exc.strerror or exc}): "
                          "start it (ray start --head) or unset RAY_ADDRESS for a local cluster") from None


@contextlib.contextmanager
def cluster(num_cpus: int) -> Iterator[None]:
    """Connected to Ray (see :func:`connect`) for the ``with`` block; left at its end if it connected."""
    owner = connect(num_cpus)
    try:
        yield
    finally:
        if owner:
            disconnect()


def disconnect() -> None:
    """Leave the cluster (and stop it, if this process started a local one)."""
    ray = require_ray()
    if ray.is_initialized():
        ray.shutdown()


def cluster_slots(gpu: bool) -> int:
    """How many one-CPU (or one-GPU) workers the connected cluster can hold at once."""
    ray = require_ray()
    have = int(ray.cluster_resources().get("GPU" if gpu else "CPU", 0))
    if have < 1:
        raise ConfigError("the Ray cluster has no GPU: use --device cpu, or add GPU nodes to the cluster"
                          if gpu else "the Ray cluster has no CPU to run workers on")
    return have


def unwrap(exc: BaseException) -> BaseException:
    """What a failed Ray task means here: the task's own ProtectError (one line for the user), a
    dead worker (:class:`~protect.engine.WorkerDied`), or the error itself (a bug)."""
    ray = require_ray()
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, ProtectError):
            return cause
        return exc
    if getattr(exc, "_actor_init_failed", False):  # a bug in building the worker: the error itself
        return exc
    if isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                        ray.exceptions.OutOfMemoryError, ray.exceptions.ObjectLostError,
                        ray.exceptions.NodeDiedError)):
        return WorkerDied("a Ray worker died (killed by the system, often for lack of memory: lower --memory or "
                          "--workers); rerun the same command to resume")
    return exc


class _Worker:
    """One Ray actor: a :class:`Context` for its whole life, running chunks one after another."""

    def __init__(self, spec: Spec, budget: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver handles Ctrl-C and kills the actors
        warnings.simplefilter("ignore")  # decoder warnings about one file: its result says what matters
        if spec.device.startswith("cuda"):
            spec = replace(spec, device="cuda")  # Ray shows this actor its own GPU only, as device 0
        else:
            torch.set_num_threads(1)  # small per-batch tensors: more threads only spin
        self.ctx: Context | None = None
        self.error: ProtectError | None = None
        try:
            self.ctx = Context(spec, Budget(budget))
        except ProtectError as exc:  # e.g. weights missing on this node: told with the first chunk, in one line
            self.error = exc

    def run(self, tasks: list[Task]) -> list[Result]:
        if self.ctx is None:
            assert self.error is not None
            raise self.error
        return self.ctx.run(tasks)


class RayEngine:
    """Run chunks in Ray actors, one per worker (see module doc). Same interface as
    :class:`~protect.engine.LocalEngine`; ``close()`` leaves a cluster this engine connected to."""

    def __init__(self, spec: Spec, workers: int | None = None, most: int | None = None) -> None:
        """``workers``: actors wanted (None: the cluster's CPUs, or GPUs with a CUDA device; a local
        cluster gets the local cores); ``most``: no more actors than this (the number of files)."""
        self.ray = require_ray()
        self.spec = spec
        self.gpu = spec.device.startswith("cuda")
        wanted = workers or (default_workers() if not os.environ.get("RAY_ADDRESS") else None)
        self._owner = connect(wanted or default_workers())
        try:
            slots = cluster_slots(self.gpu)
            count = min(wanted, slots) if wanted else slots
            if wanted and wanted > slots:
                log.info("ray: %d worker(s) asked, the cluster holds %d", wanted, slots)
            self.workers = max(1, min(count, most) if most else count)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._owner:
            self._owner = False
            disconnect()

    def _actor_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": 1, "max_restarts": 0, "max_concurrency": 1}
        if self.gpu:
            opts["num_gpus"] = 1
        return opts

    def run(self, work: Iterable[list[Task]], on_results: Callable[[list[Result]], None],
            on_ready: Callable[[], None] | None = None, ordered: bool = False) -> None:
        """Run every chunk of ``work`` on the actors; ``on_results`` gets each chunk's results in this
        process as chunks finish (in submission order with ``ordered``). ``on_ready``: called once
        the first chunks are submitted. The cluster is left (or stopped) at the end."""
        ray = self.ray
        try:
            spec_ref = ray.put(self.spec)  # once: every actor reads the fitted method from the object store
            share = max(1, self.spec.budget_bytes // self.workers)
            worker = ray.remote(_Worker).options(**self._actor_options())
            actors = [worker.remote(spec_ref, share) for _ in range(self.workers)]
            self._drive(actors, work, on_results, on_ready, ordered)
        finally:
            self.close()

    def _drive(self, actors: list[Any], work: Iterable[list[Task]], on_results: Callable[[list[Result]], None],
               on_ready: Callable[[], None] | None, ordered: bool) -> None:
        """The engines' shared loop (:func:`protect.engine.drive`), each chunk to the least loaded actor."""
        ray = self.ray
        pending: dict[Any, None] = {}  # ObjectRefs in submission order
        owner: dict[Any, int] = {}  # ObjectRef -> actor index
        load = [0] * len(actors)

        def submit(chunk: list[Task]) -> Any:
            i = min(range(len(actors)), key=load.__getitem__)
            ref = actors[i].run.remote(chunk)
            owner[ref] = i
            load[i] += 1
            return ref

        def take(ref: Any) -> list[Result]:
            load[owner.pop(ref)] -= 1
            return self._get(ref)

        ok = False
        try:
            drive(work, pending, submit=submit, has_room=lambda: min(load) < PER_ACTOR,
                  wait_done=lambda refs: ray.wait(refs, num_returns=1)[0], take=take,
                  on_results=on_results, on_ready=on_ready, ordered=ordered)
            ok = True
        finally:
            self._stop(actors, pending, None if ok else on_results)

    def _get(self, ref: Any) -> list[Result]:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            raise unwrap(exc) from None

    def _stop(self, actors: list[Any], pending: dict[Any, None],
              on_results: Callable[[list[Result]], None] | None) -> None:
        """Kill every actor and wait until they are gone; journal the chunks that had finished."""
        ray = self.ray
        finished: list[Any] = []
        if pending and on_results is not None:
            finished, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as exc:  # noqa: BLE001 - a dead cluster: nothing left to stop
                log.debug("ray: cannot kill an actor: %s", exc)
        if pending:  # a killed actor's calls fail: once all have answered, nothing writes any more
            ray.wait(list(pending), num_returns=len(pending), timeout=STOP_TIMEOUT)
        for ref in finished:
            try:
                on_results(ray.get(ref, timeout=0))  # type: ignore[misc]
            except ProtectError:  # --strict: the run is already stopping
                pass
            except ray.exceptions.RayError:
                pass
