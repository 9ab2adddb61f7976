"""Stage train: fit the VAE on data/prepared, one MLflow run with every ELBO term per epoch.

Writes models/vae.pt (the best epoch's weights + config + params), metrics/train.json (that
epoch's figures, the data digests and the MLflow run id that evaluate and export add to) and
plots/train/curves.json (per-epoch curves). After every epoch, and on Ctrl-C / SIGTERM, the
whole loop state goes to models/checkpoints/last.pt; the next run with the same params
continues from it (train.resume), in the same MLflow run. With train.nproc x train.nnodes > 1
the stage launches torchrun on itself; every machine then writes the same outputs, and the
first process of node 0 logs the one MLflow run.

Reads top to bottom: the data, the model, the run, the fit, the outputs.
"""

import _venv  # noqa: F401  (first: run with the project's packages)

import contextlib
import hashlib
import json
import os
import sys
import time

import torch

from vaepipe import checkpoint, config, data, distributed, imagefiles, limits, paths, tracking
from vaepipe.device import resolve_device, set_threads
from vaepipe.errors import ConfigError, exit_on_user_error
from vaepipe.fileio import write_json
from vaepipe.model import VAE, VAEConfig
from vaepipe.train import EpochStats, TrainingDiverged, fit

SAMPLES = 64  # prior samples (fixed z) in each per-epoch picture
RECONSTRUCTIONS = 32  # fixed validation images, each row above its reconstructions
# weights, gradients, Adam's two moments and the best epoch's copy
BYTES_PER_PARAM = 5 * 4


# --- the data --------------------------------------------------------------------------------


def load_data(params: config.Params, device: torch.device) -> dict[str, data.Split]:
    splits = {name: data.load_split(paths.prepared(name)) for name in ("train", "val")}
    if params.train.batch_size > len(splits["train"].x):
        raise ConfigError(
            f"param 'train.batch_size' = {params.train.batch_size} is larger than the "
            f"{len(splits['train'].x)} training examples"
        )
    return splits


def to_tensor(split: data.Split, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(data.to_unit(split.x)).to(device)


def labels_of(params: config.Params, splits, device) -> tuple[tuple | None, int]:
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


def log_datasets(params: config.Params, splits: dict[str, data.Split]) -> None:
    """train and val as the run's dataset inputs: the UI's Dataset column and filter."""
    source = data.source_location(params.data)
    for name, context in (("train", "training"), ("val", "validation")):
        split = splits[name]
        tracking.log_dataset(
            params.data.dataset,
            source,
            data.digest(split),
            split.x,
            split.y,
            context,
            tags={"split": name, "examples": str(len(split.x))},
        )


# --- the model -------------------------------------------------------------------------------


def build_model(params: config.Params, image_shape, device: torch.device, n_classes=0) -> VAE:
    """The VAE of the params, seeded; a model too large for memory is refused first."""
    cfg = VAEConfig.from_params(image_shape, params.model, n_classes)
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


# --- the run: resume, logging, per-epoch pictures ---------------------------------------------


# Not part of what a checkpoint must match: it resumes in 1 process or in N, on any node.
NOT_FINGERPRINTED = (
    "train.resume",
    "train.nproc",
    "train.nnodes",
    "train.node_rank",
    "train.rdzv_endpoint",
)


def code_digest() -> str:
    """sha256 of this script and of every vaepipe module loaded: a checkpoint of other code
    (a changed loss, model or loop) is not resumed."""
    files = {"pipeline/train.py": __file__} | {
        name: m.__file__
        for name, m in sys.modules.items()
        if name.split(".")[0] == "vaepipe" and getattr(m, "__file__", None)
    }
    h = hashlib.sha256()
    for name in sorted(files):
        with open(files[name], "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()


def fingerprint(params: config.Params, n_train: int) -> str:
    """What a checkpoint must match to be resumed: every data/model/train param but resume and
    where the processes run, and the code."""
    keys = {
        k: v
        for k, v in config.flatten(params).items()
        if k.split(".")[0] in ("data", "model", "train") and k not in NOT_FINGERPRINTED
    }
    blob = json.dumps({"params": keys, "n_train": n_train, "code": code_digest()}, sort_keys=True)
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


class EpochPictures:
    """Grids of prior samples (fixed z) and of fixed validation images above their
    reconstructions, logged as MLflow images with step = epoch at epoch 1, every `every`
    epochs and the last: the UI's image view steps through training. Decoding uses mu, no
    random draw, so the training RNG (and an exact resume) is untouched."""

    def __init__(self, vae: VAE, x_val: torch.Tensor, cfg: config.TrainConfig, y_val=None):
        gen = torch.Generator(device=x_val.device).manual_seed(cfg.seed)
        self.z = torch.randn((SAMPLES, vae.cfg.latent_dim), generator=gen, device=x_val.device)
        self.x = x_val[:RECONSTRUCTIONS]
        # a conditional model: sample rows by label (0, 1, ...), validation images their own
        n = max(vae.cfg.n_classes, 1)
        self.y_z = torch.arange(SAMPLES, device=x_val.device) // (SAMPLES // 8) % n
        self.y_x = None if y_val is None else y_val[:RECONSTRUCTIONS]
        self.vae, self.every, self.last = vae, cfg.image_every, cfg.epochs
        self.seconds = 0.0

    @torch.no_grad()
    def __call__(self, epoch: int) -> None:
        if not self.every or not (epoch == 1 or epoch % self.every == 0 or epoch == self.last):
            return
        t0 = time.perf_counter()
        vae = self.vae
        y_z, y_x = (self.y_z, self.y_x) if vae.cfg.conditional else (None, None)
        samples = vae.mean(vae.decode(self.z, y_z)).cpu().numpy()
        recon = vae.mean(vae.decode(vae.encode(self.x, y_x)[0], y_x)).cpu().numpy()
        pairs = imagefiles.interleave_rows(self.x.cpu().numpy(), recon)
        for key, images in (("samples", samples), ("reconstructions", pairs)):
            grid = imagefiles.to_uint8(imagefiles.grid(images, 8, imagefiles.GRID_PAD))
            tracking.log_image(grid, key, epoch)
        self.seconds += time.perf_counter() - t0


def relog_missing_epochs(run_id: str, history: list[dict]) -> None:
    """After an interruption the checkpoint may hold epochs MLflow never received (the store
    was down): log them, so the resumed run's curves have no gap."""
    logged = tracking.last_step(run_id, "train/loss")
    for h in history:
        stats = EpochStats(**h)
        if stats.epoch > logged:
            tracking.log_metrics(stats.metrics(), step=stats.epoch)


@contextlib.contextmanager
def open_run(params, state, device, group, splits):
    """The MLflow run: a new one (params, dataset inputs), or the checkpoint's own run."""
    tags = tracking.run_tags(params.data.dataset, str(device))
    if group.enabled:
        tags["world_size"] = str(group.world_size)
    run_id = (
        state["run_id"]
        if state and tracking.run_exists(params.mlflow.experiment, state["run_id"])
        else None
    )
    with tracking.run(
        params.mlflow.experiment, run_id=run_id, tags=tags, system_metrics=True
    ) as run:
        if run_id is None:
            tracking.log_params(config.flatten(params))
            log_datasets(params, splits)
        elif state:
            relog_missing_epochs(run_id, state["history"])
        yield run


# --- the outputs -----------------------------------------------------------------------------


def write_outputs(params, vae, history, run_id, device, splits) -> EpochStats:
    """models/vae.pt, plots/train/curves.json and metrics/train.json (deterministic figures
    only: wall times go to MLflow); returns the best epoch's stats."""
    last = history[-1]
    best = history[last.best_epoch - 1]  # fit handed back this epoch's weights
    checkpoint.save(paths.MODEL, vae, {"params": config.to_dict(params), "run_id": run_id})
    curves = [
        {
            "epoch": h.epoch,
            **{k.replace("/", "_"): v for k, v in h.metrics().items() if k != "epoch_seconds"},
        }
        for h in history
    ]
    write_json(paths.CURVES, curves)
    write_json(
        paths.TRAIN_METRICS,
        {
            "run_id": run_id,
            "epochs": last.epoch,  # epochs run (fewer than train.epochs: early stopping)
            "device": str(device),
            "data_digest": {name: data.digest(split) for name, split in splits.items()},
            **{k: v for k, v in best.metrics().items() if k != "epoch_seconds"},
        },
    )
    return best


# --- the stage -------------------------------------------------------------------------------


@exit_on_user_error
def main() -> None:
    params = config.load(paths.PARAMS)
    t = params.train
    if distributed.requested_world(t) > 1 and not distributed.under_torchrun():
        sys.exit(distributed.launch(t, __file__))  # torchrun runs this script again
    distributed.check_world(t)
    # Under torchrun (WORLD_SIZE > 1): data-parallel, every rank trains, the lead logs.
    node_rank = t.node_rank if t.nnodes > 1 else None
    try:
        with distributed.session(resolve_device(t.device), node_rank) as (group, device):
            train(params, group, device)
    except ConfigError:
        if int(os.environ.get("LOCAL_RANK", "0")):  # every process found the same mistake:
            sys.exit(2)  # the first process of each machine says it
        raise


def saver(fp: str, run_id: str):
    """on_checkpoint: the loop state, with what a resume checks and the run it continues."""

    def on_checkpoint(loop_state: dict) -> None:
        checkpoint.save_state(
            paths.CHECKPOINT, {**loop_state, "fingerprint": fp, "run_id": run_id}
        )

    return on_checkpoint


def fit_logged(args, labels, state, fp: str, run_id: str, pictures: EpochPictures, group):
    """fit with each epoch logged (metrics, pictures) and checkpointed; the history."""

    def on_epoch_end(stats: EpochStats) -> None:
        tracking.log_metrics(stats.metrics(), step=stats.epoch)
        pictures(stats.epoch)

    save, saved = saver(fp, run_id), {"epoch": state["epoch"] if state else 0}

    def on_checkpoint(loop_state: dict) -> None:
        save(loop_state)
        saved["epoch"] = loop_state["epoch"]

    try:
        return fit(*args, on_epoch_end, on_checkpoint, resume=state, group=group, labels=labels)
    except tracking.TrackingError as e:  # the store went away: the training did not
        resumes = args[3].resume
        then = "`dvc repro` continues it" if resumes else "set train.resume to continue it"
        raise tracking.TrackingError(
            f"{e}; training is saved up to epoch {saved['epoch']} in {paths.CHECKPOINT}: "
            f"once the store answers, {then} in MLflow run {run_id}"
        ) from None
    except TrainingDiverged as e:
        kept = (
            f"the last good checkpoint stays in {paths.CHECKPOINT}"
            if paths.CHECKPOINT.is_file()
            else "no epoch finished, so there is no checkpoint"
        )
        raise TrainingDiverged(
            f"{e}; MLflow run {run_id} is marked FAILED and {kept}; a lower train.lr usually helps"
        ) from None


def check_same_everywhere(params, splits, group: distributed.Group) -> None:
    """Every process trains on the same params and prepared data (each node reads its own
    copy): otherwise the gradients they average would mean nothing."""
    if group.enabled:
        mine = {k: v for k, v in config.flatten(params).items() if k not in NOT_FINGERPRINTED}
        mine["data_digest"] = {name: data.digest(split) for name, split in splits.items()}
        node = params.train.node_rank if params.train.nnodes > 1 else group.node
        distributed.check_same(mine, node, group)


def follow(args, labels, state, fp: str, group: distributed.Group, context) -> None:
    """A process other than the lead: trains its slice; the first process of each machine
    also writes that machine's checkpoint and outputs (the lead logs to MLflow)."""
    params, device, splits = context
    run_id = distributed.broadcast_object(None, group)  # once the lead has opened the run
    save = saver(fp, run_id) if group.writes_node_outputs else None
    history = fit(
        *args, on_checkpoint=save, resume=state, progress=False, group=group, labels=labels
    )
    if group.writes_node_outputs:
        write_outputs(params, args[0], history, run_id, device, splits)
        print(f"train: node {params.train.node_rank} wrote its outputs (MLflow run {run_id})")


def check_precision(params: config.Params, device: torch.device) -> None:
    if params.train.precision == "bf16" and device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise ConfigError(
                f"param 'train.precision' = 'bf16' but {torch.cuda.get_device_name(device)} "
                "has no bfloat16 support; use fp32"
            )


def train(params: config.Params, group: distributed.Group, device: torch.device) -> None:
    check_precision(params, device)
    threads = set_threads(params.train.threads)
    splits = load_data(params, device)
    x_train, x_val = to_tensor(splits["train"], device), to_tensor(splits["val"], device)
    labels, n_classes = labels_of(params, splits, device)
    vae = build_model(params, tuple(x_train.shape[1:]), device, n_classes)
    fp = fingerprint(params, len(x_train))
    check_same_everywhere(params, splits, group)
    state = distributed.broadcast_object(
        resume_state(params, fp) if group.is_main else None, group
    )
    args = (vae, x_train, x_val, params.train, params.data.binarize)
    if not group.is_main:
        follow(args, labels, state, fp, group, (params, device, splits))
        return
    ranks = f", {group.world_size} processes (torchrun)" if group.enabled else ""
    print(
        f"train: {len(x_train)} examples {tuple(x_train.shape[1:])} on {device}, "
        f"{threads} threads{ranks}"
    )
    with open_run(params, state, device, group, splits) as run:
        run_id = distributed.broadcast_object(run.info.run_id, group)
        pictures = EpochPictures(vae, x_val, params.train, labels and labels[1])
        t0 = time.perf_counter()
        history = fit_logged(args, labels, state, fp, run_id, pictures, group)
        seconds = time.perf_counter() - t0
        best = write_outputs(params, vae, history, run_id, device, splits)
        run_figures = {"train_seconds": seconds, "epochs_run": history[-1].epoch}
        tracking.log_metrics({**run_figures, "epoch_images_seconds": pictures.seconds})
    stopped = history[-1].epoch
    stopped = f", stopped early after {stopped}" if stopped < params.train.epochs else ""
    print(
        f"train: done in {seconds:.1f}s{stopped} (per-epoch pictures {pictures.seconds:.2f}s); "
        f"best epoch {best.epoch}: val ELBO {best.val['elbo']:.2f} nats "
        f"(recon {best.val['recon']:.2f}, KL {best.val['kl']:.2f}); MLflow run {run_id}"
    )


if __name__ == "__main__":
    main()
