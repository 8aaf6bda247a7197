"""Multi-process training under `torchrun`: process group set-up, the official feature gather, table shards.

Negatives must span the global batch, as in the official code: every process all-gathers the
features of the others without gradient and puts its own, with gradient, in its slot. Each
process then computes the loss of the whole global batch; DDP averages the gradients.

The frozen-feature table is built the same way in pieces: process r encodes the rows `share(n,
world)` of it (contiguous, sizes differing by at most one) and `gather_rows` joins the pieces in
rank order, so every process holds the table one process would have built, for 1/W of the work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank 0 of 1 when not launched by torchrun."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_type: str) -> World:
    """Join the process group torchrun describes in the environment (NCCL on CUDA, else gloo)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def teardown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def gather_features(world: World, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """All-gather the global batch (no gradient), with this process's own rows, gradient kept, in its slot.

    Process r holds the global batch's rows r, r + W, ... (see `batches.sample_order`), so the
    pieces are interleaved back: the result is the batch in the order one process would hold it.
    """
    if world.size == 1:
        return tensors
    out = []
    for tensor in tensors:
        parts = [torch.empty_like(tensor) for _ in range(world.size)]
        dist.all_gather(parts, tensor.detach().contiguous())
        parts[world.rank] = tensor
        out.append(torch.stack(parts, dim=1).flatten(0, 1))
    return tuple(out)


def share(n: int, world: World) -> range:
    """This process's contiguous part of n rows: sizes differ by at most one, in rank order."""
    return range(n * world.rank // world.size, n * (world.rank + 1) // world.size)


def gather_rows(world: World, rows: torch.Tensor) -> torch.Tensor:
    """Every process's rows (any number each, same trailing shape), concatenated in rank order, on the CPU."""
    if world.size == 1:
        return rows
    counts = all_ints(world, len(rows))
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    padded = torch.zeros((max(counts), *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[: len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count].cpu() for part, count in zip(parts, counts)])


def all_objects(world: World, value: Any) -> list[Any]:
    """One picklable value from every process, in rank order."""
    if world.size == 1:
        return [value]
    values: list[Any] = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def all_ints(world: World, value: int) -> list[int]:
    """One integer from every process (e.g. samples consumed), in rank order."""
    return [int(v) for v in all_objects(world, value)]


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
