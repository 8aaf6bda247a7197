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
    from clipn_cli.model.devices import RunRequest
    from clipn_cli.scale.worker import ScoreOptions, WorkerConfig

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(NICENESS_ENV, raising=False)
    assert not ray.is_initialized()
    with Cluster(ClusterSpec(), WorkerConfig(str(tiny_weights), RunRequest("cpu")), None, ScoreOptions()) as pool:
        cpus = ray.cluster_resources()["CPU"]
        assert (len(pool.actors), pool.cpus_per_actor) == (1, float(int(cpus)))
        seen = ray.get(pool.actors[0].__ray_call__.remote(
            lambda w: (os.getpriority(os.PRIO_PROCESS, 0), w.config.threads, w.config.run.decode_workers, __import__("torch").get_num_threads())))
        assert seen == (0, int(cpus), int(cpus), int(cpus))
        assert pool.niceness_warning() is None
    assert not ray.is_initialized()
    assert NICENESS_ENV not in os.environ  # the driver's own environment is left as it was


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_to_the_driver_exits_as_documented_and_keeps_finished_shards(tiny_weights: Path, tmp_path: Path, sig: str, code: int) -> None:
    """`ray.init` installs Ray's own SIGTERM handler, which aborts the driver (exit -6): the CLI's
    must stay, so that SIGTERM is exit 143 (SIGINT 130) with the finished shards committed and resumable."""
    import signal
    import subprocess
    import sys
    import time

    from clipn_cli.scale import read_output
    from clipn_cli.scale.manifest import load_manifest
    from clipn_cli.scale.store import OutputStore
    from conftest import IMAGES, spawn

    paths = [str(p) for p in sorted(IMAGES.iterdir())] * 2  # 24 inputs, a shard each
    out = tmp_path / "run"
    args = [sys.executable, "-m", "clipn_cli", "detect", "--engine", "ray", "--actors", "1", "--shard-size", "1", "--format", "jsonl",
            "-w", str(tiny_weights), "--classes", "cat,dog", "--output", str(out), "-"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = spawn(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert driver.stdin is not None and driver.stderr is not None
    driver.stdin.write("".join(p + "\n" for p in paths[:20]))  # the rest never comes: the run cannot finish by itself
    driver.stdin.flush()
    store = OutputStore.open(str(out))
    finished: dict = {}
    while len(finished) < 2:
        assert driver.poll() is None, driver.stderr.read()
        time.sleep(0.1)
        try:
            manifest = load_manifest(store) if (out / "manifest.json").exists() else None
        except Exception:  # a marker folded away between listing and reading: look again
            continue
        finished = manifest.shards if manifest else {}
    driver.send_signal(getattr(signal, sig))
    _, stderr = driver.communicate(timeout=600)
    assert driver.returncode == code, stderr
    assert "PC:" not in stderr and "Traceback" not in stderr
    kept = load_manifest(store)
    assert not kept.complete and len(kept.shards) >= 2
    if sig == "SIGTERM":
        resumed = subprocess.run([*args, "--resume"], input="".join(p + "\n" for p in paths), capture_output=True, text=True, env=env)
        assert resumed.returncode == 0, resumed.stderr
        assert f"{24 - len(kept.shards)} shards scored now" in resumed.stderr
        assert [r["path"] for r in read_output(str(out))] == paths
