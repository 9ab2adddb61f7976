"""Data-parallel training across processes: torch.distributed, switched on by torchrun.

`torchrun --nproc_per_node N pipeline/train.py` sets WORLD_SIZE/RANK/LOCAL_RANK; with
WORLD_SIZE > 1 each process joins a process group (NCCL on CUDA, gloo on CPU). Every rank draws
the same global batch (same seeded generators: permutation, binarization, eps) and trains on its
slice of it; DistributedDataParallel sums the gradients, so the result is the one-process result
up to float summation order. Rank 0 alone logs to MLflow and writes checkpoints and outputs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from vaepipe.model import VAE


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Group()


def from_env() -> Group:
    """The group torchrun describes in the environment; SINGLE when not under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return Group(
        rank=int(os.environ["RANK"]),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
    )


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[tuple[Group, torch.device]]:
    """Join the process group when under torchrun; yields (group, this rank's device).

    On a clean exit every rank waits at a barrier for rank 0 to finish writing outputs. After
    an error torchrun stops the other ranks, so there is no barrier to hang at.
    """
    group = from_env()
    if not group.enabled:
        yield group, device
        return
    import torch.distributed as dist

    if device.type == "cuda":
        if group.local_rank >= torch.cuda.device_count():
            from vaepipe.errors import ConfigError

            raise ConfigError(
                f"torchrun started more processes on this machine ({group.local_world_size}) "
                f"than it has GPUs ({torch.cuda.device_count()}); use --nproc_per_node "
                f"{torch.cuda.device_count()} or train.device cpu"
            )
        device = torch.device("cuda", group.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield group, device
        dist.barrier()
    finally:
        dist.destroy_process_group()


def broadcast_object(obj, group: Group):
    """Rank 0's `obj` on every rank (e.g. the checkpoint to resume, read by rank 0 only)."""
    if not group.enabled:
        return obj
    import torch.distributed as dist

    box = [obj if group.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def local_slice(x: torch.Tensor, group: Group, dim: int = 0) -> torch.Tensor:
    """This rank's rows of a global batch (along `dim`): contiguous, sizes differing by <= 1."""
    if not group.enabled:
        return x
    return torch.tensor_split(x, group.world_size, dim=dim)[group.rank]


def all_reduce_sum(x: torch.Tensor, group: Group) -> torch.Tensor:
    if group.enabled:
        import torch.distributed as dist

        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


class Step(nn.Module):
    """VAE.forward with eps given ([B, D], or [K, B, D] for K samples each): under torchrun each
    rank passes its slice of the one global eps draw. Returns (logits, z, mu, logvar)."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor):
        mu, logvar = self.vae.encode(x)
        z = self.vae.reparameterize(mu, logvar, eps)
        return self.vae.decode(z), z, mu, logvar


def wrap(vae: VAE, group: Group) -> nn.Module:
    """The VAE under DistributedDataParallel; its forward takes (x slice, eps slice)."""
    from torch.nn.parallel import DistributedDataParallel

    device = next(vae.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(Step(vae), device_ids=ids)
