"""The top-level Python API: every name stays what it names, however often and in whatever order it is used."""

from __future__ import annotations

import importlib
from pathlib import Path

from conftest import IMAGES

import clipn_cli as clipn


def test_api_names_are_not_shadowed_by_submodules() -> None:
    for name in clipn.__all__:  # loads every submodule, as a long-running program eventually does
        getattr(clipn, name)
    for name in clipn.__all__:
        module = importlib.import_module(f"clipn_cli.{clipn._API[name]}")
        assert getattr(clipn, name) is getattr(module, name), name


def test_detect_can_be_called_twice(tiny_weights: Path) -> None:
    model, info = clipn.load_model(tiny_weights)
    heads = clipn.embed_classes(model, ["cat", "rocket"], clipn.load_templates("simple"), info.fingerprint)
    runs = [[d.verdict for d in clipn.detect(model, heads, clipn.iter_inputs([str(IMAGES / "chelsea.png")]))] for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 1
