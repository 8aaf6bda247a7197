"""Multi-process training under `torchrun`: process group set-up and the official feature gather.

Negatives must span the global batch, as in the official code: every process all-gathers the
features of the others without gradient and puts its own, with gradient, in its slot. Each
process then computes the loss of the whole global batch; DDP averages the gradients.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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
    """All-gather along dim 0 (no gradient), with this process's own tensors, gradient kept, in its slot."""
    if world.size == 1:
        return tensors
    out = []
    for tensor in tensors:
        parts = [torch.empty_like(tensor) for _ in range(world.size)]
        dist.all_gather(parts, tensor.detach().contiguous())
        parts[world.rank] = tensor
        out.append(torch.cat(parts, dim=0))
    return tuple(out)


def all_ints(world: World, value: int) -> list[int]:
    """One integer from every process (e.g. samples consumed), in rank order."""
    if world.size == 1:
        return [value]
    values: list[int] = [0] * world.size
    dist.all_gather_object(values, value)
    return values


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
