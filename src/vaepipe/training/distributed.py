"""Data-parallel training across processes: torch.distributed, switched on by torchrun.

The train stage launches torchrun itself when params ask for more than one process
(`train.nproc` x `train.nnodes` > 1: `launch`), or runs under a torchrun started by hand. torchrun
sets WORLD_SIZE/RANK/LOCAL_RANK; with WORLD_SIZE > 1 each process joins a process group (NCCL on
CUDA, gloo on CPU). Every rank draws the same global batch (same seeded generators: permutation,
binarization, eps) and trains on its slice of it; DistributedDataParallel sums the gradients, so
the result is the one-process result up to float summation order. One process, the lead (the
first of node 0), logs to MLflow; the first process of every node writes that node's checkpoint
and outputs, so `dvc repro` on each node tracks them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from vaepipe.errors import ConfigError, VaepipeError
from vaepipe.model.vae import VAE

# The c10d rendezvous id every node of one training passes; torchrun's own default "none"
# would do too, a name just reads better in its messages.
RDZV_ID = "vaepipe"


class LaunchError(VaepipeError):
    """torchrun could not start or gather the processes (a rendezvous nobody answers)."""


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    lead: int = 0  # the rank that logs to MLflow and decides: the first process of node 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == self.lead

    @property
    def node(self) -> int:
        """torchrun's number for this machine (not necessarily its train.node_rank)."""
        return int(os.environ.get("GROUP_RANK", "0"))

    @property
    def writes_node_outputs(self) -> bool:
        """The first process of each machine writes that machine's outputs and checkpoint."""
        return self.local_rank == 0


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
def session(
    device: torch.device, node_rank: int | None = None
) -> Iterator[tuple[Group, torch.device]]:
    """Join the process group when under torchrun; yields (group, this rank's device).

    node_rank: this machine's `train.node_rank` (None: torchrun's own node numbering). The lead
    is the first process of node 0. On a clean exit every rank waits at a barrier for the
    writers to finish. After an error torchrun stops the other ranks, so there is no barrier to
    hang at.
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
        group = _with_lead(group, node_rank)
        yield group, device
        dist.barrier()
    except RuntimeError as e:
        if not (isinstance(e, dist.DistError) or _peer_lost(e)):
            raise
        # another process stopped first (its own error says why): one line, no traceback
        raise LaunchError(
            f"training process of rank {group.rank} lost the others (one of them stopped "
            f"first; its message says why): {str(e).strip().splitlines()[0][:200]}"
        ) from None
    finally:
        dist.destroy_process_group()


def _peer_lost(e: Exception) -> bool:
    text = str(e)
    return any(s in text for s in ("Connection reset", "Connection closed", "Broken pipe", "gloo"))


def _with_lead(group: Group, node_rank: int | None) -> Group:
    """The group with its lead: the rank whose node is 0 and local rank 0. torchrun's c10d
    rendezvous numbers the nodes in its own order (it ignores --node-rank), so the node that
    logs and decides is found here from the params, checked to number the nodes 0 .. n - 1."""
    agent = group.node
    node = agent if node_rank is None else node_rank
    everyone = all_gather_object((node, agent, group.local_rank), group)
    nodes = {a: n for n, a, _ in everyone}  # torchrun's machine -> its train.node_rank
    said = sorted(nodes.values())
    if said != list(range(len(nodes))):
        raise ConfigError(
            f"param 'train.node_rank': the {len(nodes)} machines of this training must each "
            f"have their own node_rank 0 .. {len(nodes) - 1}, but they have {said}"
        )
    return dataclasses.replace(group, lead=everyone.index((0, _agent_of(nodes, 0), 0)))


def _agent_of(nodes: dict[int, int], node: int) -> int:
    return next(a for a, n in nodes.items() if n == node)


def all_gather_object(obj, group: Group) -> list:
    """Every rank's `obj`, in rank order."""
    if not group.enabled:
        return [obj]
    import torch.distributed as dist

    out = [None] * group.world_size
    dist.all_gather_object(out, obj)
    return out


def check_same(values: dict, node: int, group: Group) -> None:
    """Every process has the lead's `values` (params, data digests), or every process stops
    with the same ConfigError naming the first machine that differs and how."""
    everyone = all_gather_object((node, values), group)
    lead = everyone[group.lead][1]
    for other_node, other in everyone:
        differ = sorted(k for k in other if other[k] != lead.get(k))
        if differ:
            shown = "; ".join(
                f"{k} = {other[k]!r} there, {lead.get(k)!r} on node 0" for k in differ[:3]
            )
            raise ConfigError(
                f"node {other_node} trains with other params or data than node 0 ({shown}); "
                "every machine needs the same params (but train.node_rank) and data/prepared"
            )


def broadcast_object(obj, group: Group):
    """The lead's `obj` on every rank (e.g. the checkpoint to resume, read by the lead only)."""
    if not group.enabled:
        return obj
    import torch.distributed as dist

    box = [obj if group.is_main else None]
    dist.broadcast_object_list(box, src=group.lead)
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
    """VAE.sample with eps given ([B, E], or [K, B, E] for K samples each, E = noise_dim):
    under torchrun each rank passes its slice of the one global eps draw. Returns the
    model.LatentSample."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor, y: torch.Tensor | None = None):
        return self.vae.sample(x, eps, y)


def wrap(vae: VAE, group: Group) -> nn.Module:
    """The VAE under DistributedDataParallel; its forward takes (x slice, eps slice)."""
    from torch.nn.parallel import DistributedDataParallel

    device = next(vae.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(Step(vae), device_ids=ids)


# --- launching torchrun from the stage ----------------------------------------------------------


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def requested_world(cfg) -> int:
    """The processes `train.nproc` x `train.nnodes` ask for."""
    return cfg.nproc * cfg.nnodes


def check_world(cfg) -> None:
    """Under torchrun: the world it started is the one the params describe (when they
    describe one; a hand-started torchrun with the default nproc = nnodes = 1 is taken as is)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if requested_world(cfg) > 1 and world != requested_world(cfg):
        raise ConfigError(
            f"params 'train.nproc' = {cfg.nproc} x 'train.nnodes' = {cfg.nnodes} ask for "
            f"{requested_world(cfg)} processes, but torchrun started {world}; start the stage "
            "without torchrun (it launches torchrun itself) or set the params to match"
        )


def torchrun_args(cfg, script: str) -> list[str]:
    """torchrun's arguments for the params: c10d rendezvous at train.rdzv_endpoint, or a
    standalone one on a free local port. No --node-rank: c10d ignores it (see _with_lead)."""
    args = ["--nnodes", str(cfg.nnodes), "--nproc-per-node", str(cfg.nproc)]
    args += ["--max-restarts", "0"]
    if cfg.rdzv_endpoint.strip():
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", cfg.rdzv_endpoint.strip()]
        args += ["--rdzv-id", RDZV_ID]
    else:
        args += ["--standalone"]
    return [*args, script]


def launch(cfg, script: str) -> int:
    """Run `script` under torchrun as the params ask (this process becomes torchrun's agent);
    the exit status of the process that failed first, 0 when all succeed.

    A process that ends with a user error (status 2) has printed its `error:` line; another
    failure gets one line here. A SIGINT/SIGTERM stops the processes (they save a checkpoint)
    and ends with 128 + the signal.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    if "OMP_NUM_THREADS" not in os.environ:  # torchrun would set 1 and print a banner
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        share = cfg.threads or max(1, (cores or os.cpu_count() or 1) // cfg.nproc)
        os.environ["OMP_NUM_THREADS"] = str(share)
    # torchrun's agent logs every worker failure with a traceback banner: the failed process
    # has said why already, and the line below says which
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    where = cfg.rdzv_endpoint.strip() or "this machine"
    print(
        f"train: launching torchrun: {cfg.nproc} process(es) on each of {cfg.nnodes} "
        f"machine(s), rendezvous at {where}",
        flush=True,
    )
    try:
        run(parse_args(torchrun_args(cfg, script)))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code != 2:
            why = f"signal {-code}" if code < 0 else f"status {code}"
            print(f"error: training process of rank {rank} ended with {why}", file=sys.stderr)
        return code if code > 0 else 128 - code
    except SignalException as e:
        return 128 + int(e.sigval)
    except RendezvousError as e:
        raise LaunchError(
            f"torchrun rendezvous at {where} (param 'train.rdzv_endpoint') failed: "
            f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__}"
        ) from None
    return 0
