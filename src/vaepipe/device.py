"""Where torch computes: the device `train.device` names and the CPU threads it may use."""

from __future__ import annotations

import os

import torch

from vaepipe.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when torch sees a GPU, else CPU; cuda without a GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("param 'train.device' = 'cuda' but torch sees no CUDA device here")
    return torch.device(name)


def cores_per_process() -> int:
    """This process's share of the cores when torchrun starts several on one machine."""
    # sched_getaffinity honours taskset/cgroup pinning; macOS and Windows lack it
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = (cores or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, share)


def set_threads(threads: int) -> int:
    """torch's intra-op threads: `threads`, or this process's share of the cores when 0."""
    n = threads or cores_per_process()
    torch.set_num_threads(n)
    return n
