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


def device_name(device: torch.device) -> str:
    """What computed, for the record: the GPU's name, or the CPU's model and the cores this
    process may use ('Intel(R) Xeon(R) Processor, 2 cores')."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = ""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import platform

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu or platform.processor() or platform.machine()}, {cores} cores"
