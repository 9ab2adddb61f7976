"""The training run as MLflow and DVC see it: the MLflow run (params, dataset inputs, per-epoch
metrics and pictures, the epochs a resumed run missed), the checkpoint after every epoch, and
the stage's outputs: models/vae.pt (the best epoch's weights, config and params),
metrics/train.json (that epoch's figures, the data digests and the MLflow run id that evaluate
and export add to) and plots/train/curves.json (the per-epoch curves).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from vaepipe import config, imagefiles, paths, tracking
from vaepipe.data import arrays, sources
from vaepipe.device import device_name
from vaepipe.fileio import published, write_json
from vaepipe.model import checkpoint
from vaepipe.model.vae import VAE
from vaepipe.training import distributed
from vaepipe.training.loop import EpochStats, TrainingDiverged
from vaepipe.training.session import Job
from vaepipe.tuning import trial

SAMPLES = 64  # prior samples (fixed z) in each per-epoch picture
RECONSTRUCTIONS = 32  # fixed validation images, each row above its reconstructions


class EpochPictures:
    """Grids of prior samples (fixed z) and of fixed validation images above their
    reconstructions (rows named in a margin, each image about 96 px), logged as MLflow images
    with step = epoch before training (step 0, where the UI's image view opens), at epoch 1,
    every `every` epochs and the last: the view steps through training. Decoding uses mu, no
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

    @classmethod
    def of(cls, job: Job) -> EpochPictures:
        labels = job.data.labels
        return cls(job.vae, job.data.x_val, job.params.train, labels and labels[1])

    def due(self, epoch: int) -> bool:
        return bool(self.every) and (epoch in (1, self.last) or epoch % self.every == 0)

    @torch.no_grad()
    def grids(self) -> dict[str, torch.Tensor]:
        """{"samples": uint8 grid, "reconstructions": uint8 grid} of the model as it is now."""
        vae = self.vae
        y_z, y_x = (self.y_z, self.y_x) if vae.cfg.conditional else (None, None)
        samples = vae.mean(vae.decode(self.z, y_z)).cpu().numpy()
        recon = vae.mean(vae.decode(vae.encode(self.x, y_x)[0], y_x)).cpu().numpy()
        pairs = imagefiles.interleave_rows(self.x.cpu().numpy(), recon)
        scale = imagefiles.readable_scale(len(pairs), 8, pairs.shape[1:])
        return {
            "samples": imagefiles.to_uint8(imagefiles.picture(samples, 8, scale)),
            "reconstructions": imagefiles.to_uint8(
                imagefiles.picture(pairs, 8, scale, rows=["input", "recon."])
            ),
        }

    def __call__(self, epoch: int) -> None:
        if not self.due(epoch):
            return
        t0 = time.perf_counter()
        for key, grid in self.grids().items():
            tracking.log_image(grid, key, epoch)
        self.seconds += time.perf_counter() - t0


def constant_lr(params: config.Params) -> bool:
    return params.train.lr_schedule == "constant"


def relog_missing_epochs(run_id: str, history: list[dict], params: config.Params) -> None:
    """After an interruption the checkpoint may hold epochs MLflow never received (the store
    was down): log them, so the resumed run's curves have no gap."""
    logged = tracking.last_step(run_id, "loss/train")
    for h in history:
        stats = EpochStats(**h)
        if stats.epoch > logged:
            tracking.log_metrics(stats.metrics(constant_lr(params)), step=stats.epoch)


def log_datasets(params: config.Params, splits: dict[str, arrays.Split]) -> None:
    """train and val as the run's dataset inputs: the UI's Dataset column and filter."""
    source = sources.source_location(params.data)
    for name, context in (("train", "training"), ("val", "validation")):
        split = splits[name]
        tracking.log_dataset(
            params.data.dataset,
            source=source,
            digest=arrays.digest(split),
            x=split.x,
            y=split.y,
            context=context,
            tags={"split": name, "examples": str(len(split.x))},
        )


@contextlib.contextmanager
def open_run(job: Job) -> Iterator[str]:
    """The MLflow run: a new one (params, dataset inputs), or the checkpoint's own run; its id,
    also handed to the other processes of a torchrun."""
    params, state, group = job.params, job.state, job.group
    tags = tracking.run_tags(params.data.dataset, str(job.device), device_name(job.device))
    link = trial.from_env()
    if link:
        tags.update(link.tags())
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
            log_datasets(params, job.data.splits)
        elif state:
            relog_missing_epochs(run_id, state["history"], params)
        yield distributed.broadcast_object(run.info.run_id, group)


class TrainingClock:
    """Seconds of training across resumes: those the resumed checkpoint carried plus this
    process's since the clock was made. Every checkpoint stores it, so a run stopped and
    continued logs its whole training time as train_seconds, not only its last part."""

    def __init__(self, state: dict | None):
        self.before = carried_seconds(state)
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return self.before + time.perf_counter() - self.t0


def carried_seconds(state: dict | None) -> float:
    if not state:
        return 0.0
    if "train_seconds" in state:
        return float(state["train_seconds"])
    return sum(h["seconds"] for h in state["history"])  # a checkpoint without it: its epochs


def saver(job: Job, run_id: str, clock: TrainingClock):
    """on_checkpoint: the loop state, with what a resume checks, the run it continues and
    the training seconds so far."""

    def on_checkpoint(loop_state: dict) -> None:
        checkpoint.save_state(
            paths.CHECKPOINT,
            {
                **loop_state,
                "fingerprint": job.fingerprint,
                "run_id": run_id,
                "train_seconds": clock(),
            },
        )

    return on_checkpoint


def fit_logged(
    job: Job, run_id: str, pictures: EpochPictures, clock: TrainingClock
) -> list[EpochStats]:
    """fit with each epoch logged (metrics, pictures) and checkpointed; the history. A store
    that goes away, or a loss that diverges, ends the stage with one line saying what is kept."""

    report = trial.reporter()  # under `vaepipe tune`: the epoch's bound to the trial

    def on_epoch_end(stats: EpochStats) -> None:
        tracking.log_metrics(stats.metrics(constant_lr(job.params)), step=stats.epoch)
        pictures(stats.epoch)
        if report:
            report(stats.epoch, stats.val)

    save, saved = saver(job, run_id, clock), {"epoch": job.state["epoch"] if job.state else 0}
    if not job.state:
        pictures(0)  # the untrained model: the image view's first step

    def on_checkpoint(loop_state: dict) -> None:
        save(loop_state)
        saved["epoch"] = loop_state["epoch"]

    try:
        return job.fit(on_epoch_end=on_epoch_end, on_checkpoint=on_checkpoint)
    except tracking.TrackingError as e:  # the store went away: the training did not
        resumes = job.params.train.resume
        then = "`dvc repro` continues it" if resumes else "set train.resume to continue it"
        raise tracking.TrackingError(
            f"{e}; training is saved up to epoch {saved['epoch']} in {paths.CHECKPOINT}: "
            f"once the store answers, {then} in MLflow run {run_id}"
        ) from None
    except TrainingDiverged as e:
        kept = (  # only a checkpoint of this run (or of the one it resumed) is named
            f"its last good checkpoint (epoch {saved['epoch']}) stays in {paths.CHECKPOINT}"
            if saved["epoch"] > 0
            else "no epoch of it finished, so it saved no checkpoint"
        )
        raise TrainingDiverged(
            f"{e}; MLflow run {run_id} is marked FAILED and {kept}; a lower train.lr usually helps"
        ) from None


def follow(job: Job) -> None:
    """A process other than the lead: trains its slice; the first process of each machine
    also writes that machine's checkpoint and outputs (the lead logs to MLflow)."""
    group = job.group
    run_id = distributed.broadcast_object(None, group)  # once the lead has opened the run
    save = saver(job, run_id, TrainingClock(job.state)) if group.writes_node_outputs else None
    history = job.fit(on_checkpoint=save, progress=False)
    if group.writes_node_outputs:
        write_outputs(job, history, run_id)
        print(f"train: node {job.params.train.node_rank} wrote its outputs (MLflow run {run_id})")


# --- the outputs -------------------------------------------------------------------------------


OUTPUTS = (paths.MODEL, paths.CURVES, paths.TRAIN_METRICS)


def write_outputs(job: Job, history: list[EpochStats], run_id: str) -> EpochStats:
    """models/vae.pt, plots/train/curves.json and metrics/train.json, published together
    (deterministic figures only: wall times go to MLflow); returns the best epoch's stats."""
    with published(*OUTPUTS) as out:
        return _write_outputs(job, history, run_id, out)


def _write_outputs(job: Job, history: list[EpochStats], run_id: str, out) -> EpochStats:
    last = history[-1]
    best = history[last.best_epoch - 1]  # fit handed back this epoch's weights
    extra = {"params": config.to_dict(job.params), "run_id": run_id}
    checkpoint.save(out(paths.MODEL), job.vae, extra)
    curves = [{"epoch": h.epoch, **h.curves()} for h in history]
    write_json(out(paths.CURVES), curves)
    write_json(
        out(paths.TRAIN_METRICS),
        {
            "run_id": run_id,
            "epochs": last.epoch,  # epochs run (fewer than train.epochs: early stopping)
            "device": str(job.device),
            "data_digest": {name: arrays.digest(s) for name, s in job.data.splits.items()},
            **{k: v for k, v in best.metrics().items() if k != "epoch_seconds"},
        },
    )
    return best


def describe(job: Job, threads: int) -> str:
    x, group = job.data.x_train, job.group
    ranks = f", {group.world_size} processes (torchrun)" if group.enabled else ""
    return (
        f"train: {len(x)} examples {tuple(x.shape[1:])} on {job.device}, {threads} threads{ranks}"
    )


def summary(job: Job, history: list[EpochStats], seconds: float, pictures, run_id: str) -> str:
    best = history[history[-1].best_epoch - 1]
    stopped = history[-1].epoch
    stopped = f", stopped early after {stopped}" if stopped < job.params.train.epochs else ""
    return (
        f"train: done in {seconds:.1f}s{stopped} (per-epoch pictures {pictures.seconds:.2f}s); "
        f"best epoch {best.epoch}: val ELBO {best.val['elbo']:.2f} nats "
        f"(recon {best.val['recon']:.2f}, KL {best.val['kl']:.2f}); MLflow run {run_id}"
    )
