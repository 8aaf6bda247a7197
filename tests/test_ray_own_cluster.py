"""`--engine ray` on a local cluster that clipn starts itself (no --ray-address): the defaults must use
the node like local detect does, one actor with all the CPUs (as many torch and decoding threads),
and its worker must not run at Ray's default nice 15, at which any other process on the machine
preempts it (what made the Ray path 0.64x of local detect on a shared 2-core machine; benchmarks/README.md).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

HAVE_RAY = importlib.util.find_spec("ray") is not None and importlib.util.find_spec("pyarrow") is not None
pytestmark = pytest.mark.skipif(not HAVE_RAY, reason="ray[data] is not installed (pip install 'clipn-cli[ray]')")


def test_own_cluster_runs_one_unniced_actor_with_all_cpus(tiny_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from clipn_cli.scale.ray_engine import NICENESS_ENV, Cluster, ClusterSpec
    from clipn_cli.scale.worker import ScoreOptions, WorkerConfig

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(NICENESS_ENV, raising=False)
    assert not ray.is_initialized()
    with Cluster(ClusterSpec(), WorkerConfig(str(tiny_weights), "cpu"), None, ScoreOptions()) as pool:
        cpus = ray.cluster_resources()["CPU"]
        assert (len(pool.actors), pool.cpus_per_actor) == (1, float(int(cpus)))
        seen = ray.get(pool.actors[0].__ray_call__.remote(
            lambda w: (os.getpriority(os.PRIO_PROCESS, 0), w.config.threads, w.config.workers, __import__("torch").get_num_threads())))
        assert seen == (0, int(cpus), int(cpus), int(cpus))
        assert pool.niceness_warning() is None
    assert not ray.is_initialized()
    assert NICENESS_ENV not in os.environ  # the driver's own environment is left as it was
