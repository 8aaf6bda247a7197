"""Scale-out: clipn on a Ray cluster, with the numbers of one process.

- `planner`: deterministic shards from a streaming list of inputs (and tables of paths);
- `records`: detect's records as Parquet / JSON Lines shard files;
- `store`, `manifest`: the output folder (any pyarrow filesystem) and its commit record;
- `worker`: what one actor does (load the image tower once, score with clipn's own pipeline);
- `cluster`: the Ray cluster and its pool of actors (start or join, dispatch in order or as tasks finish);
- `ray_engine`: a detect job on the cluster (plan, score, commit, resume) and `score_dataset` for Ray Data pipelines.

Only `cluster` imports Ray, and only when called.
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "score_dataset": "ray_engine",
    "encode_on_cluster": "ray_engine",
    "read_output": "output",
    "ScoreOptions": "worker",
    "ClusterSpec": "ray_engine",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'clipn_cli.scale' has no attribute '{name}'")
