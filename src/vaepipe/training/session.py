"""What one training process works with (`prepare` -> a Job): the prepared data and the model of
the params, and the checkpoint it resumes, which must match the params and the code.

After every epoch, and on Ctrl-C / SIGTERM, the whole loop state goes to
models/checkpoints/last.pt (training.run), which the next run with the same params and code
continues, in the same MLflow run. Under torchrun every process prepares alike: the lead reads
the checkpoint and hands it to the others.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from vaepipe import config, limits, paths
from vaepipe.data import arrays
from vaepipe.errors import ConfigError
from vaepipe.model import checkpoint
from vaepipe.model.vae import VAE, VAEConfig
from vaepipe.training import distributed
from vaepipe.training.loop import EpochStats, fit

# weights, gradients, Adam's two moments and the best epoch's copy
BYTES_PER_PARAM = 5 * 4
# Not part of what a checkpoint must match: it resumes in 1 process or in N, on any node.
NOT_FINGERPRINTED = (
    "train.resume",
    "train.nproc",
    "train.nnodes",
    "train.node_rank",
    "train.rdzv_endpoint",
)


@dataclass
class TrainingData:
    """The prepared train and validation splits as stored, and as tensors on the device."""

    splits: dict[str, arrays.Split]
    x_train: torch.Tensor  # [N, C, H, W] in [0, 1]
    x_val: torch.Tensor
    labels: tuple[torch.Tensor, torch.Tensor] | None  # (train, val) of a conditional model
    n_classes: int  # 0 for an unconditional model

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


@dataclass
class Job:
    """Everything one training process works with, gathered once (`prepare`)."""

    params: config.Params
    group: distributed.Group
    device: torch.device
    data: TrainingData
    vae: VAE
    fingerprint: str  # what a checkpoint must match to be resumed
    state: dict | None  # the checkpoint this process resumes, or None

    def fit(self, **callbacks) -> list[EpochStats]:
        d = self.data
        return fit(
            self.vae,
            d.x_train,
            d.x_val,
            self.params.train,
            self.params.data.binarize,
            resume=self.state,
            group=self.group,
            labels=d.labels,
            **callbacks,
        )


# --- the data and the model --------------------------------------------------------------------


def load_data(params: config.Params, device: torch.device) -> TrainingData:
    splits = {name: arrays.load_split(paths.prepared(name)) for name in ("train", "val")}
    if params.train.batch_size > len(splits["train"].x):
        raise ConfigError(
            f"param 'train.batch_size' = {params.train.batch_size} is larger than the "
            f"{len(splits['train'].x)} training examples"
        )
    x_train, x_val = (torch.from_numpy(arrays.to_unit(s.x)).to(device) for s in splits.values())
    labels, n_classes = _labels(params, splits, device)
    return TrainingData(splits, x_train, x_val, labels, n_classes)


def _labels(params: config.Params, splits, device) -> tuple[tuple | None, int]:
    """(train, val) labels and the number of classes of a conditional model; (None, 0) else."""
    if not params.model.conditional:
        return None, 0
    if any(split.y is None for split in splits.values()):
        raise ConfigError(
            f"param 'model.conditional' is true but dataset '{params.data.dataset}' has no "
            "labels to condition on"
        )
    n_classes = int(max(split.y.max() for split in splits.values())) + 1
    labels = tuple(torch.from_numpy(splits[s].y).long().to(device) for s in ("train", "val"))
    return labels, n_classes


def build_model(params: config.Params, data: TrainingData, device: torch.device) -> VAE:
    """The VAE of the params, seeded; a model too large for memory is refused first."""
    n_train = len(data.x_train)
    cfg = VAEConfig.from_params(data.image_shape, params.model, data.n_classes, n_train)
    with torch.device("meta"):  # shapes only: counts the weights without allocating them
        n_weights = sum(p.numel() for p in VAE(cfg).parameters())
    limits.check_bytes(
        f"params 'model.hidden' = {cfg.hidden}, 'model.channels' = {cfg.channels} and "
        f"'model.latent_dim' = {cfg.latent_dim} make {n_weights:,} weights, whose training",
        n_weights * BYTES_PER_PARAM,
    )
    torch.manual_seed(params.train.seed)
    try:
        return VAE(cfg).to(device)
    except torch.OutOfMemoryError as e:  # a GPU smaller than the host's free memory
        raise ConfigError(
            f"the model of params 'model.*' ({n_weights:,} weights) does not fit on {device}: "
            f"{str(e).splitlines()[0][:200]}"
        ) from None


def check_device_params(params: config.Params, device: torch.device, warn: bool = True) -> None:
    """bf16 where the GPU has it; `warn`: print the speed warnings (one process of a torchrun)."""
    if params.train.precision == "bf16" and device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise ConfigError(
                f"param 'train.precision' = 'bf16' but {torch.cuda.get_device_name(device)} "
                "has no bfloat16 support; use fp32"
            )
    for warning in speed_warnings(params.train, device.type) if warn else []:
        print(f"train: warning: {warning}", file=sys.stderr)


def speed_warnings(t: config.TrainConfig, device_type: str) -> list[str]:
    """Params that were measured to make training slower on this kind of device, and why."""
    out = []
    if t.precision == "bf16" and device_type == "cuda":
        out.append(
            "param 'train.precision' = 'bf16' makes a step slower on a GPU, not faster: these "
            "models are too small for the tensor cores to repay autocast's casts (1.05-1.4x "
            "the fp32 step on an H100 and an H200, docs/performance.md); fp32 trains faster"
        )
    if t.compile != "none" and device_type == "cpu":
        out.append(
            f"param 'train.compile' = '{t.compile}' compiles for seconds (tens the first time "
            "on a machine) and was measured no faster than eager on a CPU "
            "(docs/performance.md); none starts at once"
        )
    return out


# --- what a checkpoint must match --------------------------------------------------------------


def code_digest(script: Path) -> str:
    """sha256 of the stage script and of every vaepipe module loaded: a checkpoint of other
    code (a changed loss, model or loop) is not resumed."""
    files = {"pipeline/train.py": str(script)} | {
        name: m.__file__
        for name, m in sys.modules.items()
        if name.split(".")[0] == "vaepipe" and getattr(m, "__file__", None)
    }
    h = hashlib.sha256()
    for name in sorted(files):
        with open(files[name], "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()


def fingerprint(params: config.Params, n_train: int, script: Path) -> str:
    """What a checkpoint must match to be resumed: every data/model/train param but resume and
    where the processes run, and the code."""
    keys = {
        k: v
        for k, v in config.flatten(params).items()
        if k.split(".")[0] in ("data", "model", "train") and k not in NOT_FINGERPRINTED
    }
    code = code_digest(script)
    blob = json.dumps({"params": keys, "n_train": n_train, "code": code}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def resume_state(params: config.Params, fp: str) -> dict | None:
    if not params.train.resume or not paths.CHECKPOINT.is_file():
        return None
    state = checkpoint.load_state(paths.CHECKPOINT)
    if state["fingerprint"] != fp:
        print(f"train: {paths.CHECKPOINT} was made with other params or code; starting afresh")
        return None
    print(
        f"train: resuming from {paths.CHECKPOINT} (epoch {state['epoch']}, batch {state['batch']})"
    )
    return state


def check_same_everywhere(params, data: TrainingData, group: distributed.Group) -> None:
    """Every process trains on the same params and prepared data (each node reads its own
    copy): otherwise the gradients they average would mean nothing."""
    if group.enabled:
        mine = {k: v for k, v in config.flatten(params).items() if k not in NOT_FINGERPRINTED}
        mine["data_digest"] = {name: arrays.digest(s) for name, s in data.splits.items()}
        node = params.train.node_rank if params.train.nnodes > 1 else group.node
        distributed.check_same(mine, node, group)


def prepare(params: config.Params, group, device: torch.device, script: Path) -> Job:
    """The data, the model and the checkpoint to resume of this process (every process of a
    torchrun alike: the lead reads the checkpoint and hands it to the others)."""
    check_device_params(params, device, warn=group.is_main)
    data = load_data(params, device)
    vae = build_model(params, data, device)
    fp = fingerprint(params, len(data.x_train), script)
    check_same_everywhere(params, data, group)
    state = distributed.broadcast_object(
        resume_state(params, fp) if group.is_main else None, group
    )
    return Job(params, group, device, data, vae, fingerprint=fp, state=state)
