"""`detect`'s torch-free fast start (library: `fastdetect`): which runs it takes, and running one.

A run it does not take goes the torch way unchanged, silently (README "The torch-free fast start"
lists them); the one thing said is that the ONNX export is not cached yet, since then this run
loads torch to make it and the next run starts fast.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from .common import EXIT_OK, EXIT_PARTIAL, fail, info, warn

# detect's options, and the values with which the fast start can take the run
_TAKES = {"runtime": ("onnx", "openvino", "auto"), "device": ("auto", "cpu"), "precision": ("fp32",), "quantize": (None,), "negatives": (None,),
          "calibration": (None,), "report": (None,), "cache": (None,), "resume": (False,)}


def fast_detect(args: dict[str, Any], pools: tuple[str, ...], write_records: Callable[..., None]) -> None:
    """Run `detect` (its options in `args`, already checked) without torch and exit with its code;
    return, having written nothing, when the torch path must run."""
    if args["embeddings"] is None or pools or any(args[name] not in values for name, values in _TAKES.items()):
        return
    from ..fastdetect import FastStart, weights_export
    from ..runtimes import is_cached

    runtime = args["runtime"]
    if runtime == "auto":
        if args["device"] == "auto" and _accelerator_may_be_here():
            return  # the torch path may load on the GPU, where auto means torch
        runtime = _auto_runtime(args["weights"])
    if runtime is None:
        return
    fast = FastStart.open(args["weights"], args["embeddings"], runtime, few=_few_files(args["paths"]))
    if fast is not None and args["runtime"] == "auto":  # else the torch path says it
        info(f"--runtime auto: {runtime} (measured fastest and exact for these weights on this CPU by 'clipn weights tune')")
    if fast is None:
        found = weights_export(args["weights"])
        if found is not None and not is_cached(found[2]):
            info(f"the image tower's ONNX export for these weights is not cached yet: this run loads torch and writes {found[2]} "
                 "(later runs start without torch)")
        return
    from ..heads.classes import class_warnings, vocabulary_warning
    from ..inputs.sources import iter_inputs
    from ..verdicts import VerdictStep

    classes = fast.embeddings.classes
    for message in class_warnings(classes):
        warn(message)
    if (message := vocabulary_warning(classes, fast.vocabulary, fast.weights.name)) is not None:
        warn(message)
    step = VerdictStep(args["rule"], threshold=args["threshold"])
    results = fast.detect(iter_inputs(args["paths"], sys.stdin), args["rule"], threshold=args["threshold"], details=args["details"],
                          top_k=args["top_k"], exif_transpose=args["exif_transpose"], draft=args["draft"],
                          batch_size=args["batch_size"], workers=args["workers"])
    write_records(step, (result.as_dict(args["details"]) for result in results), args["fmt"], args["output"], args["paths"], set(),
                  details=args["details"], top_k=args["top_k"], classes=classes, resume=False)
    if step.done == 0:
        fail("no images found in the given inputs")
    if step.failed:
        info(f"{step.failed} of {step.done} inputs could not be scored (see their error records)")
        raise typer.Exit(EXIT_PARTIAL)
    raise typer.Exit(EXIT_OK)


def _auto_runtime(weights: Any) -> str | None:
    """`--runtime auto` resolved as the torch path would (`export.choose_runtime`), reading only the
    weights header and the measurement record: the runtime 'clipn weights tune' picked here when it is
    onnx or openvino, else None (torch, or no record: the torch path runs)."""
    from ..fastdetect import weights_export
    from ..runtimes.choice import measured_runtime
    from ..weights.home import weights_home

    found = weights_export(weights)
    if found is None:
        return None
    chosen, _ = measured_runtime(weights_home() / "runtimes", found[1]["fingerprint"])  # a warning is said by the torch path
    return chosen if chosen in ("onnx", "openvino") else None


def _few_files(paths: list[str] | None) -> bool:
    """Whether the run is known to be a few images: at most FEW_IMAGES paths, each an image file (not
    stdin, a folder, a list or a table of paths, which may name any number)."""
    from ..fastdetect import FEW_IMAGES
    from ..inputs.tables import is_table

    return bool(paths) and len(paths) <= FEW_IMAGES and all(p != "-" and os.path.isfile(p) and not is_table(p) for p in paths)


def _accelerator_may_be_here() -> bool:
    """Whether `--device auto` might pick a GPU, told without importing torch: an NVIDIA or AMD
    compute device node (Linux), or macOS (MPS). A false "maybe" only costs this run the fast start."""
    if sys.platform == "darwin":
        return True
    return any(Path(node).exists() for node in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd"))
