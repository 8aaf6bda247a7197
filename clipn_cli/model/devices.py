"""Where a run computes and with what: the device policy, precisions, and every size default of the
image pipeline, in one place (library, CLI and Ray workers all resolve a run through `RunOptions`).
torch is imported only when a device is resolved: the CLI reads the choices and tunes the process
before it loads torch.

The four sizes of a run, which used to share the one name `batch_size`:
- `forward_batch`: images per forward pass of the image tower;
- `decode_workers`: threads decoding images beside the forward pass (0: in the calling thread);
- `prefetch`: decoded images held ahead of the forward pass (bounds memory);
- `score_chunk`: encoded images scored together (detect and eval score in the same chunks, so their
  scores are bit-identical).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import DeviceError, OptionsError

if TYPE_CHECKING:
    import torch

    from ..inputs.decode import DecodeLimits

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DEVICE_SPELLING = re.compile(r"auto|cpu|mps|cuda(:[0-9]{1,4})?")
PRECISIONS = ("fp32", "fp16", "bf16")  # fp32: exact, as the official code; the others autocast
# Images per forward pass: a CPU ViT-B-16 is as fast at 12 as at 16 with less memory (see
# `default_forward_batch`); a GPU wants large batches to stay busy.
CPU_FORWARD_BATCH, CUDA_FORWARD_BATCH = 12, 128
CPU_DECODE_WORKERS = 4
MIN_PREFETCH = 8


def mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then CPU; cpu, cuda, cuda:N and mps must be present.

    A misspelt or absent device is a `DeviceError` (one line at the CLI), never torch's RuntimeError.
    """
    import torch

    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_available() else torch.device("cpu")
    if not DEVICE_SPELLING.fullmatch(device):
        raise DeviceError(f"unsupported device '{device}' (expected {', '.join(DEVICES[:-1])} or {DEVICES[-1]})")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device '{device}' requested but CUDA is not available")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise DeviceError(f"device '{device}' requested but only {torch.cuda.device_count()} CUDA device(s) are present")
    if resolved.type == "mps" and not mps_available():
        raise DeviceError(f"device '{device}' requested but Apple MPS is not available")
    return resolved


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise OptionsError(f"unknown precision '{precision}' (expected one of {', '.join(PRECISIONS)})")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; fp32 runs exactly as the official code."""
    import torch

    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def default_forward_batch(device: torch.device) -> int:
    """Images per forward pass when the user gives none.

    On a CPU a ViT-B-16 forward runs at 5.0-5.3 img/s at any batch from 4 to 32 (2 cores,
    interleaved), but the whole `detect` command does not: on 256 JPEGs batch 8 ran 4-8% below the
    bare forward and batch 12 and 16 ~2% faster than 8. Memory grows with the batch (glibc keeps
    freed activations for reuse): peaks of 1.24-1.28 GB at 8, 1.32 at 12, 1.34-1.45 at 16. Batch 12
    is as fast as 16 with less memory. A GPU wants large batches to stay busy.
    """
    return CUDA_FORWARD_BATCH if device.type == "cuda" else CPU_FORWARD_BATCH


def default_decode_workers(device: torch.device) -> int:
    """Decoding threads when the user gives none: a few beside a CPU forward pass, all cores for a GPU."""
    cpus = os.cpu_count() or 1
    return cpus if device.type == "cuda" else min(CPU_DECODE_WORKERS, cpus)


@dataclass(frozen=True)
class RunOptions:
    """How one run computes, resolved once (`RunOptions.resolve`) and passed down as is."""

    device: torch.device
    precision: str
    forward_batch: int
    decode_workers: int
    prefetch: int
    score_chunk: int
    limits: DecodeLimits | None = None
    runtime: str = "torch"  # what runs the image tower: torch, onnx or openvino (`runtimes`)
    quantize: str | None = None  # "int8": the image tower's int8 path (torch's, or ONNX Runtime's)

    @classmethod
    def resolve(
        cls,
        where: torch.nn.Module | torch.device | str = "auto",
        *,
        precision: str = "fp32",
        forward_batch: int | None = None,
        decode_workers: int | None = None,
        prefetch: int | None = None,
        score_chunk: int | None = None,
        limits: DecodeLimits | None = None,
        runtime: str = "torch",
        quantize: str | None = None,
    ) -> RunOptions:
        """Every size given or defaulted for the device of `where` (a model: the device it sits on)."""
        import torch

        device = next(where.parameters()).device if isinstance(where, torch.nn.Module) else resolve_device(where)
        for name, value in (("forward batch", forward_batch), ("prefetch depth", prefetch), ("scoring chunk", score_chunk)):
            if value is not None and value < 1:
                raise OptionsError(f"the {name} must be at least 1, not {value}")
        if decode_workers is not None and decode_workers < 0:
            raise OptionsError(f"decoding threads must be 0 or more, not {decode_workers}")
        batch = forward_batch or default_forward_batch(device)
        return cls(
            device=device,
            precision=check_precision(precision),
            forward_batch=batch,
            decode_workers=default_decode_workers(device) if decode_workers is None else decode_workers,
            prefetch=prefetch or max(2 * batch, MIN_PREFETCH),
            score_chunk=score_chunk or batch,
            limits=limits,
            runtime=runtime,
            quantize=quantize,
        )


@dataclass(frozen=True)
class RunRequest:
    """A run's options as given, before the device is known: what a Ray driver hands its actors.

    Each actor resolves it once on its own device (`resolve`): an actor's GPU, or its CPU share,
    decides the defaulted sizes, which the driver cannot know.
    """

    device: str = "auto"
    precision: str = "fp32"
    forward_batch: int | None = None
    decode_workers: int | None = None
    runtime: str = "torch"
    quantize: str | None = None

    def resolve(self, where: torch.nn.Module | torch.device | str | None = None) -> RunOptions:
        """The `RunOptions` of this request on `where` (default: its own device)."""
        return RunOptions.resolve(
            self.device if where is None else where, precision=self.precision, forward_batch=self.forward_batch,
            decode_workers=self.decode_workers, runtime=self.runtime, quantize=self.quantize,
        )


def pipeline_sizes(model: torch.nn.Module, batch_size: int | None = None, workers: int | None = None) -> tuple[int, int]:
    """(forward batch, decoding threads) as given, or the defaults for the model's device."""
    options = RunOptions.resolve(model, forward_batch=batch_size, decode_workers=workers)
    return options.forward_batch, options.decode_workers


def tune_process() -> None:
    """What a scoring command sets up before torch loads and the decoding threads start."""
    huge_pages_for_activations()
    few_malloc_arenas()


def huge_pages_for_activations() -> None:
    """Let torch back large CPU tensors with transparent huge pages (Linux), unless the user chose.

    A ViT-B-16 forward pass at batch 32 allocates and frees gigabytes of activations, and with
    4 KB pages every batch faults them in afresh: huge pages make the CPU forward ~12% faster at no
    extra peak memory (benchmarks/). torch reads the variable at its first allocation, which in
    this process comes later: commands import torch only when they run.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def few_malloc_arenas(limit: int = 2) -> None:
    """Cap glibc's malloc arenas before the decoding threads start (Linux; no-op elsewhere).

    Each thread otherwise gets its own arena that keeps freed image buffers: with 2 decoding
    threads, a 256-image ViT-B-16 run peaked at 1418 MB, and at 1355 MB with the cap, at the
    same speed (measured on 2 cores).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).mallopt(-8, limit)  # -8 = M_ARENA_MAX
    except (OSError, AttributeError, TypeError):
        pass
