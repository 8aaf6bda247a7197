"""The CLIPN training loop: official optimiser, schedule and losses; seeded, resumable, multi-GPU.

Official settings (reference §3.3): AdamW lr 3e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.2
except for parameters with fewer than 2 dimensions or with `bn`/`ln`/`bias`/`logit_scale` in
their name; cosine schedule without warm-up, per step; batch 512 per GPU; fp16 autocast with a
grad scaler on CUDA. Two deliberate differences: the loss is multiplied by the number of
processes so that DDP's averaged gradient is the gradient of the global-batch loss (one GPU and
N GPUs then train the same model), and the frozen `logit_scale` is not clamped (the official
clamp cannot change it, and we guarantee frozen tensors stay bit-identical).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import TrainError
from ..model.devices import resolve_device
from .losses import clipn_loss
from ..model.clipn import CLIPN
from ..weights.checkpoints import save_weights
from ..weights.format import WeightsInfo, fingerprint, vocabulary_metadata
from . import distributed as dist_utils
from .base import Base
from .batches import CachedBatches, StreamBatches, build_feature_table, pair_stream
from .checkpoint import check_compatible, load_state, save_state
from .data import IndexedData, ShardData

PRECISIONS = ("auto", "fp32", "amp", "bf16")
EXCLUDE_SAME_CAPTION = True  # measured on the digits demo: see README "Train"


@dataclass
class TrainConfig:
    """Every setting of a run; defaults are the official ones where the official code has one."""

    output: Path
    steps: int | None = None  # overrides epochs
    epochs: float = 10.0
    samples_per_epoch: int | None = None  # needed with shards when `steps` is not given
    batch_size: int = 512  # per process
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.2
    warmup: int = 0
    seed: int = 0
    exclude_same_caption: bool = EXCLUDE_SAME_CAPTION
    cache_features: bool | None = None  # None: cache when the source is finite and not augmented
    augment: bool = False  # the official RandomResizedCrop(scale 0.9-1) instead of the eval transform
    device: str = "auto"
    precision: str = "auto"  # auto = amp on CUDA, fp32 elsewhere
    workers: int = 4
    checkpoint_every: int = 0
    checkpoint: Path | None = None  # default: OUTPUT.ckpt
    resume: Path | None = None
    vocabulary: tuple[str, ...] | None = None  # the only class names the base knows (default: the base's own, if any)

    def checkpoint_path(self) -> Path:
        return self.checkpoint or self.output.with_name(self.output.name + ".ckpt")


@dataclass(frozen=True)
class StepLog:
    step: int  # steps done
    total: int
    lr: float
    losses: dict[str, float]
    samples_per_second: float


@dataclass(frozen=True)
class TrainResult:
    info: WeightsInfo | None  # the written file; None on processes other than rank 0
    steps: int
    losses: dict[str, float]  # means over the last steps
    seconds: float
    skipped: list[str]


class Monitor(Protocol):
    """What a caller may observe; every method is optional in practice (see `Silent`)."""

    def phase(self, name: str, total: int | None) -> None: ...
    def advance(self, n: int) -> None: ...
    def step(self, log: StepLog) -> None: ...


class Silent:
    def phase(self, name: str, total: int | None) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def step(self, log: StepLog) -> None:
        pass


class NoTower(nn.Module):
    """The "no" text tower as a module of its own, so DDP can wrap exactly what trains."""

    def __init__(self, model: CLIPN) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text_no(tokens, normalize=True, prompt_index=prompt_index)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split as the official code does: no decay for gains, biases, embeddings of rank < 2."""

    def exempt(name: str, p: nn.Parameter) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in params if exempt(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in params if not exempt(n, p)], "weight_decay": weight_decay},
    ]


def cosine_lr(step: int, total: int, base_lr: float, warmup: int = 0) -> float:
    """open_clip's cosine schedule: linear warm-up, then 0.5·(1 + cos(π·e/E))·lr."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * base_lr


def prompt_choice(seed: int, step: int, batch_size: int, num_prompts: int, world: dist_utils.World) -> torch.Tensor:
    """Each sample's "no" prompt (or the mean): drawn for the global batch, this process's share.

    Process r holds global samples r, r + W, ... (see `batches.sample_order`), so one process
    with batch W·B draws exactly what W processes with batch B draw together.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, num_prompts + 1, (batch_size * world.size,), generator=gen)[world.rank :: world.size]


def frozen_fingerprint(model: CLIPN) -> str:
    """Fingerprint of every tensor that does not train: a resumed run must start from the same ones."""
    return fingerprint({k: v for k, v in model.state_dict().items() if "_no" not in k})


def total_steps(config: TrainConfig, samples: int | None, world_size: int) -> int:
    if config.steps is not None:
        if config.steps < 1:
            raise TrainError("--steps must be at least 1")
        return config.steps
    if samples is None:
        raise TrainError("shards have no known length: give --steps, or --samples-per-epoch with --epochs")
    steps = int(config.epochs * samples // (config.batch_size * world_size))
    if steps < 1:
        raise TrainError(f"{samples} samples make no full batch of {config.batch_size * world_size}; lower --batch-size or give --steps")
    return steps


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise TrainError(f"unknown precision '{precision}' (expected one of {', '.join(PRECISIONS)})")
    if precision == "auto":
        return "amp" if device.type == "cuda" else "fp32"
    if precision == "amp" and device.type != "cuda":
        raise TrainError("--precision amp needs CUDA; use fp32 or bf16 here")
    return precision


def train(base: Base, data: IndexedData | ShardData, config: TrainConfig, monitor: Monitor | None = None) -> TrainResult:
    """Train the "no" tower of `base.model` on `data` and write `config.output` (our safetensors format)."""
    monitor = monitor or Silent()
    device = resolve_device(config.device)
    world = dist_utils.setup(device.type)
    try:
        return _train(base, data, config, monitor, device, world)
    finally:
        dist_utils.teardown(world)


def _train(base: Base, data: IndexedData | ShardData, config: TrainConfig, monitor: Monitor, device: torch.device, world: dist_utils.World) -> TrainResult:
    """One process's run: set up, resume, make the batches, take the steps, save (on the main process)."""
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    precision = _resolve_precision(config.precision, device)
    cached = _caches_features(config, data)
    torch.manual_seed(config.seed + world.rank)
    model = base.model.to(device).eval()
    frozen = frozen_fingerprint(model)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas, eps=config.eps)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "amp")
    settings = _resume_settings(base, config, frozen, world, cached)
    start, consumed = _resume(config, settings, model, optimizer, scaler, world) if config.resume is not None else (0, 0)
    encode_precision = {"amp": "fp16"}.get(precision, precision)
    batches, samples, skipped = _batches(model, data, config, monitor, device, encode_precision, cached, consumed, world)
    total = total_steps(config, samples, world.size)
    if start >= total:
        raise TrainError(f"{config.resume}: the checkpoint is at step {start}, the run has {total} steps")

    tower: nn.Module = NoTower(model)
    if world.size > 1:
        tower = nn.parallel.DistributedDataParallel(tower, device_ids=[device.index] if device.type == "cuda" else None)
    monitor.phase("training", total)
    began = time.perf_counter()
    try:
        recent = _steps(tower, model, batches, optimizer, scaler, config, monitor, device, precision, settings, start, total, world)
    finally:
        if isinstance(batches, StreamBatches):
            batches.close()
            skipped += list(batches.errors)

    means = {k: sum(r[k] for r in recent) / len(recent) for k in recent[0]}
    info: WeightsInfo | None = None
    if world.is_main:
        info = _save_output(base, model, config, data.description, total, means, cached, world)
    dist_utils.barrier(world)
    return TrainResult(info, total, means, time.perf_counter() - began, skipped)


def _caches_features(config: TrainConfig, data: IndexedData | ShardData) -> bool:
    """Whether the frozen image and "yes" features are computed once before training: by default
    for a finite source without --augment, the only sources where they stay the same each epoch."""
    cached = config.cache_features if config.cache_features is not None else (isinstance(data, IndexedData) and not config.augment)
    if cached and (isinstance(data, ShardData) or config.augment):
        raise TrainError("feature caching needs a finite source (index file or folder) and no --augment")
    return cached


def _resume(config: TrainConfig, settings: dict[str, Any], model: CLIPN, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, world: dist_utils.World) -> tuple[int, int]:
    """Load `config.resume` into the model, optimiser and scaler; returns the step to go on from and the
    samples this process had consumed. A checkpoint of another run or model is one TrainError."""
    state = load_state(config.resume)
    check_compatible(config.resume, state["settings"], settings)
    trainable = dict(model.named_parameters())
    try:  # the checkpoint's fields have their types (load_state); here they must also fit this model
        with torch.no_grad():
            for name, value in state["trainable"].items():
                trainable[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        return state["step"], state["consumed"][world.rank]
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise TrainError(f"{config.resume}: the checkpoint does not fit this model ({type(exc).__name__}: {str(exc).strip()[:160]})") from None


def _batches(model: CLIPN, data: IndexedData | ShardData, config: TrainConfig, monitor: Monitor, device: torch.device, encode_precision: str,
             cached: bool, consumed: int, world: dist_utils.World) -> tuple[CachedBatches | StreamBatches, int | None, list[str]]:
    """The batches of the run (frozen features cached here once, or a stream that encodes as it goes),
    the samples per epoch (None: unknown, shards) and the inputs skipped so far."""
    if cached:
        monitor.phase("caching frozen features", len(dist_utils.share(len({p.image for p in data.pairs}), world)))
        table = build_feature_table(model, data, device, encode_precision, workers=config.workers, progress=monitor.advance, world=world)
        return CachedBatches(table, config.batch_size, config.seed, world.rank, world.size, consumed), len(table), table.skipped
    samples = len(data) if isinstance(data, IndexedData) else config.samples_per_epoch
    pairs = pair_stream(data, config.seed, world.rank, world.size)
    batches = StreamBatches(model, pairs, config.batch_size, device, encode_precision, config.augment,
                            config.workers, consumed, seed=config.seed, rank=world.rank)
    return batches, samples, list(data.skipped)


def _steps(tower: nn.Module, model: CLIPN, batches: CachedBatches | StreamBatches, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
           config: TrainConfig, monitor: Monitor, device: torch.device, precision: str, settings: dict[str, Any], start: int, total: int,
           world: dist_utils.World) -> deque[dict[str, float]]:
    """Steps `start` to `total` (checkpoints between them); returns the losses of the last steps, whose
    mean the trained weights record."""
    scale = model.logit_scale.detach().exp()
    recent: deque[dict[str, float]] = deque(maxlen=max(1, min(50, total // 10)))
    for step in range(start, total):
        tick = time.perf_counter()
        lr = cosine_lr(step, total, config.lr, config.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = batches.next()
        choice = prompt_choice(config.seed, step, len(batch.tokens), model.num_prompts, world)
        with _autocast(device, precision):
            text_no = tower(batch.tokens.to(device), choice)
        image, text_yes, text_no, ids = dist_utils.gather_features(
            world, batch.image.to(device), batch.text_yes.to(device), text_no.float(), batch.caption_ids.to(device)
        )
        terms = clipn_loss(image, text_yes, text_no, scale, ids if config.exclude_same_caption else None)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(terms.total * world.size).backward()
        scaler.step(optimizer)
        scaler.update()
        losses = terms.as_floats()
        recent.append(losses)
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < total:
            _checkpoint(config, model, optimizer, scaler, step + 1, settings, batches.consumed, world)
        elapsed = max(time.perf_counter() - tick, 1e-9)
        monitor.step(StepLog(step + 1, total, lr, losses, len(batch.tokens) * world.size / elapsed))
    return recent


def _autocast(device: torch.device, precision: str):
    import contextlib

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.float16 if precision == "amp" else torch.bfloat16)


def _resume_settings(base: Base, config: TrainConfig, frozen: str, world: dist_utils.World, cached: bool) -> dict[str, Any]:
    """What must be equal between a run and the run that resumes it."""
    return {
        "base_frozen_fingerprint": frozen,
        "num_prompts": base.model.num_prompts,
        "batch_size": config.batch_size,
        "world_size": world.size,
        "steps": config.steps,
        "epochs": config.epochs,
        "seed": config.seed,
        "lr": config.lr,
        "betas": list(config.betas),
        "eps": config.eps,
        "weight_decay": config.weight_decay,
        "warmup": config.warmup,
        "exclude_same_caption": config.exclude_same_caption,
        "cached_features": cached,
        "augment": config.augment,
    }


def _checkpoint(config: TrainConfig, model: CLIPN, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, step: int, settings: dict[str, Any], consumed: int, world: dist_utils.World) -> None:
    counts = dist_utils.all_ints(world, consumed)
    if world.is_main:
        trainable = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        save_state(
            config.checkpoint_path(),
            {"step": step, "consumed": counts, "settings": settings, "trainable": trainable, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()},
        )
    dist_utils.barrier(world)


def _save_output(base: Base, model: CLIPN, config: TrainConfig, data_description: str, steps: int, losses: dict[str, float], cached: bool, world: dist_utils.World) -> WeightsInfo:
    run = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items() if k not in ("output", "checkpoint", "resume", "device", "workers", "vocabulary")}
    extra = {
        "trained_by": "clipn train",
        "base": base.description,
        "data": data_description,
        "steps": str(steps),
        "global_batch": str(config.batch_size * world.size),
        "losses": json.dumps({k: round(v, 6) for k, v in losses.items()}, sort_keys=True),
        "train_config": json.dumps({**run, "cached_features": cached, "world_size": world.size}, sort_keys=True),
    }
    extra.update(vocabulary_metadata(config.vocabulary or base.vocabulary))
    tensors = model.state_dict()
    return save_weights(tensors, config.output, model.model_cfg, base.model_name, extra)
