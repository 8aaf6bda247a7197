"""Steady state of the Ray path: the same `Worker.detect` on the same 64 JPEGs, in this process and in
one Ray actor (2 CPUs, nice 0, as `--engine ray` starts it), alternated, after one warm-up batch each.

    python benchmarks/ray_steady.py                       # writes ray_steady.json
    OMP_NUM_THREADS=2 python benchmarks/ray_steady.py     # this process with the variable Ray sets in its workers

Both sides use the same torch threads (2), decoding threads (2), batch size (12) and huge-pages
setting; the records must be equal. What differs is only the process: a Ray worker (which also
gets OMP_NUM_THREADS=<its CPUs> from Ray) versus this one. Reports both environments and the
ratio local / actor per round (> 1 means the actor is slower).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as `clipn detect` does before torch
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (the same weights and JPEGs as the main benchmark)


def environment() -> dict:
    import torch

    return {"nice": os.getpriority(os.PRIO_PROCESS, 0), "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads()}


def main(rounds: int = 3) -> None:
    from clipn_cli.heads.embeddings import ClassEmbeddings
    from clipn_cli.inputs.sources import iter_inputs
    from clipn_cli.scale.ray_engine import Cluster, ClusterSpec
    from clipn_cli.model.devices import RunRequest
    from clipn_cli.scale.worker import ScoreOptions, Worker, WorkerConfig
    from clipn_cli.weights.checkpoints import load_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        weights, _ = bench.make_weights(work)
        model, info = load_model(weights)
        heads = ClassEmbeddings.load(bench.make_embeddings(model, info, work / "classes.safetensors"))
        del model
        items = list(iter_inputs([str(bench.make_jpegs(work / "jpg", 64, (500, 375)))]))
        local = Worker(WorkerConfig(str(weights), RunRequest("cpu", decode_workers=2), threads=2), heads, ScoreOptions())
        with Cluster(ClusterSpec(actors=1, cpus_per_actor=2), WorkerConfig(str(weights), RunRequest("cpu")), heads, ScoreOptions()) as pool:
            import ray

            actor = pool.actors[0]
            envs = {"local": environment(), "actor": ray.get(actor.__ray_call__.remote(lambda w: environment()))}
            print(envs, flush=True)
            local.detect(items[:12])
            ray.get(actor.detect.remote(items[:12]))
            runs: dict[str, list[float]] = {"local": [], "actor": [], "load_avg": []}
            for n in range(rounds):
                start = time.perf_counter()
                a = local.detect(items)
                runs["local"].append(time.perf_counter() - start)
                start = time.perf_counter()
                b = ray.get(actor.detect.remote(items))
                runs["actor"].append(time.perf_counter() - start)
                runs["load_avg"].append(os.getloadavg()[0])
                assert a == b
                print(f"round {n}: local {runs['local'][-1]:.1f} s, actor {runs['actor'][-1]:.1f} s, "
                      f"ratio {runs['local'][-1] / runs['actor'][-1]:.2f} (load {runs['load_avg'][-1]:.1f})", flush=True)
    out = Path(__file__).with_name("ray_steady.json")
    out.write_text(json.dumps({"environments": envs, **runs, "ratios": [lo / ac for lo, ac in zip(runs["local"], runs["actor"])]}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
