"""The Ray cluster clipn runs on: joining or starting it (with the CLI's signal handlers kept and its
workers un-niced), a pool of `Worker` actors on it, and dispatching tasks to them in order or as
they finish, with at most `IN_FLIGHT_PER_ACTOR` shards queued per actor."""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import ClipnError
from .worker import ScoreOptions, Worker, WorkerConfig

if TYPE_CHECKING:
    from ..heads.embeddings import ClassEmbeddings
    from ..scores.calibration import CalibratedVerdicts

INSTALL_HINT = "pip install 'clipn-cli[ray]'"
IN_FLIGHT_PER_ACTOR = 2  # one shard running, one queued on the actor so that it never waits for the driver
RESTARTS = 3  # a lost worker's actor is restarted (elsewhere) this often, and its shard retried
NICENESS_ENV = "RAY_worker_niceness"  # Ray starts worker processes at nice 15 unless its raylet is told otherwise


class RayMissing(ClipnError):
    """Ray (or pyarrow) is not installed."""


class EngineError(ClipnError):
    """The cluster could not run the job (a worker failed, the cluster is unreachable)."""


def require_ray():
    """The `ray` module, or a one-line error saying how to install it."""
    try:
        import pyarrow  # noqa: F401
        import ray
    except ImportError:
        raise RayMissing(f"--engine ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


@dataclass(frozen=True)
class ClusterSpec:
    """Where to run and with what: `address` "auto" joins the cluster running here, HOST:PORT or
    ray://HOST:PORT another; None means $RAY_ADDRESS (set by `ray job submit`), else a new local cluster."""

    address: str | None = None
    actors: int | None = None  # default: as many as the cluster has GPUs (GPU actors) or CPUs / cpus_per_actor
    cpus_per_actor: float | None = None  # default: CPU actors take a whole node (like local detect), GPU actors 1
    gpus_per_actor: float = 0.0


class Cluster:
    """A connection to Ray and a pool of clipn actors on it; a context manager that cleans both up."""

    def __init__(
        self, spec: ClusterSpec, config: WorkerConfig, heads: ClassEmbeddings | None, options: ScoreOptions,
        verdicts: CalibratedVerdicts | None = None,
    ) -> None:
        self.ray = require_ray()
        self.spec = spec
        self.started = connect(self.ray, spec.address)
        self.cpus_per_actor = spec.cpus_per_actor or self._node_cpus()
        count = spec.actors or self._default_actors()
        config = actor_config(config, self.cpus_per_actor, spec.gpus_per_actor)
        remote = self.ray.remote(Worker).options(
            num_cpus=self.cpus_per_actor, num_gpus=spec.gpus_per_actor,
            max_restarts=RESTARTS, max_task_retries=RESTARTS,
        )
        try:
            self.actors = [remote.remote(config, heads, options, verdicts) for _ in range(count)]
            self._check_ready()
        except BaseException:
            self.close()
            raise

    def _node_cpus(self) -> float:
        """CPUs per actor when none are given: 1 beside a GPU; on CPU, all of the smallest node's, so
        that one actor per node runs one forward pass on all its cores, as local detect does (two
        1-thread actors on 2 cores each hold a model and a decoding pipeline of their own), or
        with --actors N an equal share of the cluster's CPUs (whole CPUs where there is one each)."""
        if self.spec.gpus_per_actor > 0:
            return 1.0
        cpus = [n["Resources"].get("CPU", 0) for n in self.ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
        if not cpus:
            return 1.0
        node = float(int(min(cpus))) or min(cpus)
        if self.spec.actors is None:
            return node
        share = sum(cpus) / self.spec.actors
        return min(node, float(int(share)) if share >= 1 else share)

    def _default_actors(self) -> int:
        resources = self.ray.cluster_resources()
        if self.spec.gpus_per_actor > 0:
            return max(1, int(resources.get("GPU", 0) / self.spec.gpus_per_actor))
        nodes = [n["Resources"].get("CPU", 0) for n in self.ray.nodes() if n.get("Alive")]
        return max(1, sum(int(c / max(self.cpus_per_actor, 1e-9) + 1e-9) for c in nodes))

    def _check_ready(self) -> None:
        """Wait for every actor to load the weights; a failure (missing file, wrong version) is one line."""
        try:
            versions = self.ray.get([a.version.remote() for a in self.actors])
        except Exception as exc:
            raise EngineError(f"a clipn worker could not start: {_cause(exc)}") from None
        if any(v != __version__ for v in versions):
            raise EngineError(f"the cluster's workers run clipn-cli {sorted(set(versions))}, this driver {__version__}: install the same version everywhere")
        self.niceness = max(self.ray.get([a.niceness.remote() for a in self.actors]))

    def niceness_warning(self) -> str | None:
        """What to tell the user when the actors run niced (a cluster started with Ray's default)."""
        if self.niceness <= 0:
            return None
        return (f"the cluster's workers run at nice {self.niceness}, so every other process on their nodes comes first: "
                f"start the cluster with {NICENESS_ENV}=0 in the environment of `ray start`")

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for actor in getattr(self, "actors", []):
            try:
                self.ray.kill(actor)
            except Exception:
                pass
        self.actors = []
        if self.started:
            self.ray.shutdown()
            self.started = False

    def map_ordered(self, submit: Callable[[Any, Any], Any], tasks: Iterable[Any], in_flight: int) -> Iterator[tuple[Any, Any]]:
        """(task, result) for each task in order, at most `in_flight` outstanding, round-robin over actors."""
        pending: deque[tuple[Any, Any]] = deque()
        for n, task in enumerate(tasks):
            pending.append((task, submit(self.actors[n % len(self.actors)], task)))
            if len(pending) >= in_flight:
                yield self._result(*pending.popleft())
        while pending:
            yield self._result(*pending.popleft())

    def map_unordered(self, submit: Callable[[Any, Any], Any], tasks: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        """(task, result) as tasks finish; a new task goes to whichever actor has room (bounded in flight).

        `tasks` is drawn in a thread of its own, at most one batch of slots ahead, so that a slow
        input stream (paths trickling in on stdin) never keeps finished shards from being committed.
        """
        load = {i: 0 for i in range(len(self.actors))}
        pending: dict[Any, tuple[Any, int]] = {}
        feed = _Prefetch(tasks, IN_FLIGHT_PER_ACTOR * len(self.actors))
        exhausted = False
        while not exhausted or pending:
            while not exhausted and min(load.values()) < IN_FLIGHT_PER_ACTOR:
                got, task = feed.get(timeout=0.0 if pending else 0.5)
                if got is _END:
                    exhausted = True
                elif got is not _EMPTY:
                    slot = min(load, key=load.__getitem__)
                    pending[submit(self.actors[slot], task)] = (task, slot)
                    load[slot] += 1
                if got is not None:
                    break
            if pending:
                ready, _ = self.ray.wait(list(pending), num_returns=1, timeout=0.5)
                if ready:
                    yield self._finish(ready[0], pending, load)

    def _finish(self, ref: Any, pending: dict[Any, tuple[Any, int]], load: dict[int, int]) -> tuple[Any, Any]:
        task, slot = pending.pop(ref)
        load[slot] -= 1
        return self._result(task, ref)

    def _result(self, task: Any, ref: Any) -> tuple[Any, Any]:
        try:
            return task, self.ray.get(ref)
        except Exception as exc:
            index = getattr(task, "index", None)
            if index is None:
                raise EngineError(f"a batch failed on the cluster: {_cause(exc)}") from None
            raise EngineError(f"shard {index} failed on the cluster: {_cause(exc)}; "
                              "finished shards are kept: continue with --resume") from None


def connect(ray: Any, address: str | None) -> bool:
    """Join the cluster at `address` (None: $RAY_ADDRESS, else start a local one); True when this
    process initialised Ray here and must call `ray.shutdown()` at the end (which stops a cluster it
    started and only disconnects from one it joined). Used by `Cluster` and by `clipn serve --engine ray`."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    # A cluster of our own: its workers are the job, so they must not run at Ray's default
    # nice 15, where every other process on the machine (the driver, Ray's daemons, other
    # users' jobs) comes first (benchmarks/README.md). Its raylet reads this at start.
    unniced = address is None and NICENESS_ENV not in os.environ
    if unniced:
        os.environ[NICENESS_ENV] = "0"
    handlers = _signal_handlers()
    try:
        ray.init(address=address or "local", include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=True, configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise EngineError(f"cannot start or join Ray ({address or 'a new local cluster'}): {str(exc).splitlines()[0][:200]}") from None
    finally:
        if unniced:
            del os.environ[NICENESS_ENV]
        _restore(handlers)
    return True


def _signal_handlers() -> dict[int, Any]:
    """SIGTERM's and SIGINT's handlers now (main thread only): `ray.init` installs its own, whose
    SIGTERM aborts the driver (exit -6) instead of the CLI's exit 143 that keeps finished shards."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore(handlers: dict[int, Any]) -> None:
    import signal

    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)


def actor_config(config: WorkerConfig, cpus: float, gpus: float) -> WorkerConfig:
    """An actor uses the CPUs it reserved, not its node's: decoding threads (unless --workers says)
    and, on CPU, torch threads; a GPU actor on a 64-core node must not start 64 decoders."""
    share = max(1, int(cpus))
    workers = config.run.decode_workers if config.run.decode_workers is not None else share
    threads = config.threads or (share if gpus == 0 else None)
    return replace(config, run=replace(config.run, decode_workers=workers), threads=threads)


_END, _EMPTY = object(), object()


class _Prefetch:
    """Draws an iterator in a daemon thread into a bounded queue; its exceptions re-raise in `get`."""

    def __init__(self, items: Iterable[Any], ahead: int) -> None:
        import queue
        import threading

        self._queue: queue.Queue = queue.Queue(maxsize=max(1, ahead))
        self._empty = queue.Empty
        threading.Thread(target=self._run, args=(iter(items),), daemon=True, name="clipn-plan").start()

    def _run(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                self._queue.put((None, item))
            self._queue.put((_END, None))
        except BaseException as exc:  # handed to the consumer, which raises it
            self._queue.put((exc, None))

    def get(self, timeout: float) -> tuple[Any, Any]:
        """(None, item), (_END, None) at the end, or (_EMPTY, None) when nothing came within `timeout`."""
        try:
            marker, item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except self._empty:
            return _EMPTY, None
        if isinstance(marker, BaseException):
            raise marker
        return marker, item


def _cause(exc: BaseException) -> str:
    """The worker's own error, not Ray's wrapping of it."""
    inner = getattr(exc, "cause", None) or exc
    text = str(inner).strip().splitlines()
    line = next((t for t in reversed(text) if t.strip() and not t.startswith(" ")), type(inner).__name__)
    return line[:300]
