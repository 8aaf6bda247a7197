"""clipn-cli: zero-shot out-of-distribution detection with CLIPN, as a library and a CLI.

The Python API the CLI is built on::

    import clipn_cli as clipn

    model, info = clipn.load_model("clipn.safetensors")
    heads = clipn.embed_classes(model, ["cow", "cat", "fish"], clipn.load_templates("clipn"), info.fingerprint)
    for result in clipn.detect(model, heads, clipn.iter_inputs(["photos/"])):
        print(result.path, result.verdict, result.class_name, result.atd_score)

Attributes are imported on first use, so `import clipn_cli` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_model": "weights.checkpoints",
    "convert_checkpoint": "weights.checkpoints",
    "read_info": "weights.checkpoints",
    "WeightsInfo": "weights.format",
    "CLIPN": "model.clipn",
    "build_model": "model.clipn",
    "load_templates": "heads.prompts",
    "TemplateSet": "heads.prompts",
    "read_class_file": "heads.classes",
    "parse_class_list": "heads.classes",
    "embed_classes": "heads.embeddings",
    "score": "scores.scoring",
    "score_heads": "scores.scoring",
    "Heads": "scores.scoring",
    "Scores": "scores.methods",
    "mine": "heads.wordpool",
    "iter_inputs": "inputs.sources",
    "load_one": "inputs.decode",
    "DecodeLimits": "inputs.limits",
    "encode_images": "model.encode",
    "detect": "detection",
    "Detection": "outputs.records",
    "ClassEmbeddings": "heads.embeddings",
    "FeatureCache": "model.feature_cache",
    "collect_sets": "inputs.sets",
    "evaluate": "evaluation",
    "train": "training",
    "TrainConfig": "training",
    "fetch_weights": "weights.fetch",
    "add_weights": "weights.fetch",
    "list_weights": "weights.home",
    "resolve_weights": "weights.home",
    "ClipnError": "errors",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'clipn_cli' has no attribute '{name}'")


def __dir__() -> list[str]:
    """The lazy API too, so `dir(clipn_cli)` and completion show what `__all__` promises."""
    return sorted(set(globals()) | set(__all__))
