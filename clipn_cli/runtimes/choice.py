"""`--runtime auto`: the exact runtime measured fastest for these weights on this machine, else torch.

`clipn weights tune` measures (`runtimes.measure`) and records the winner here, in one JSON file of
the weights home, keyed by the weights fingerprint, the CPU model and the installed versions of
torch, onnxruntime and openvino: a record made on another CPU, for other weights or with other
versions says nothing about this run and is not used. Reading it is cheap and imports no torch;
the file is bounded like every JSON file clipn reads, and a damaged one is ignored with a warning.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..files import atomic_open, read_json
from . import RUNTIMES, missing

AUTO = "auto"
RECORD_FILE = "measured.json"
MAX_RECORD_BYTES = 1 << 20  # a record is ~1 KB; a home measured for a thousand weights/machines fits
MAX_RECORDS = 256  # the oldest are dropped past this
VERSIONED = {"torch": "torch", "onnx": "onnxruntime", "openvino": "openvino"}  # runtime: the package whose version counts


def cpu_model() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_key(fingerprint: str) -> dict[str, Any]:
    """What a measurement holds for: these weights, this CPU, these runtime versions."""
    return {"weights_fingerprint": fingerprint, "cpu": cpu_model(),
            "versions": {package: package_version(package) for package in VERSIONED.values()}}


def record_path(folder: str | os.PathLike[str]) -> Path:
    return Path(folder) / RECORD_FILE


def read_records(folder: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], str | None]:
    """The measurement records in `folder` and a warning when the file is there but unusable."""
    path = record_path(folder)
    if not path.exists():
        return [], None
    try:
        data = read_json(path, MAX_RECORD_BYTES)
    except (OSError, ValueError) as exc:
        return [], f"{path}: ignored ({str(exc).splitlines()[0][:160]}); --runtime auto uses torch until 'clipn weights tune' writes it again"
    records = data.get("records") if isinstance(data, dict) else None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        return [], f"{path}: ignored (not a list of runtime measurements); --runtime auto uses torch until 'clipn weights tune' writes it again"
    return records, None


def measured_runtime(folder: str | os.PathLike[str], fingerprint: str) -> tuple[str | None, str | None]:
    """(the runtime measured fastest for these weights on this machine, or None; a warning, or None)."""
    records, warning = read_records(folder)
    key = machine_key(fingerprint)
    for record in records:
        if {name: record.get(name) for name in key} == key:
            winner = record.get("winner")
            if winner not in RUNTIMES:
                return None, f"{record_path(folder)}: ignored (its winner {str(winner)[:20]!r} is no runtime)"
            return (winner if missing(winner) is None else None), warning
    return None, warning


def record_measurement(folder: str | os.PathLike[str], fingerprint: str, winner: str, results: dict[str, Any]) -> Path:
    """Store `winner` for these weights on this machine (replacing an earlier record of the same key)."""
    key = machine_key(fingerprint)
    records, _ = read_records(folder)
    kept = [r for r in records if {name: r.get(name) for name in key} != key][-(MAX_RECORDS - 1):]
    kept.append({**key, "winner": winner, "results": results, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    import json

    path = record_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"records": kept}, indent=1) + "\n")
    return path
