"""Stage train: fit the VAE on data/prepared, one MLflow run with every ELBO term per epoch.

Writes models/vae.pt (weights + config + params), metrics/train.json (final figures and the
MLflow run id that evaluate and export add to) and plots/train/curves.json (per-epoch curves).
After every epoch, and on Ctrl-C / SIGTERM, the whole loop state goes to
models/checkpoints/last.pt; the next run with the same params continues from it (train.resume).
"""

import hashlib
import json
import re
import time
from pathlib import Path

import torch

from vaepipe import checkpoint, config, data, distributed, tracking
from vaepipe.errors import exit_on_user_error
from vaepipe.fileio import write_json
from vaepipe.model import VAE, VAEConfig
from vaepipe.train import TrainingDiverged, fit, resolve_device, set_threads

PREPARED = Path("data/prepared")
MODEL = Path("models/vae.pt")
CHECKPOINT = Path("models/checkpoints/last.pt")
METRICS = Path("metrics/train.json")
CURVES = Path("plots/train/curves.json")


def load_tensor(name: str, device: torch.device) -> torch.Tensor:
    split = data.load_split(PREPARED / f"{name}.npz")
    return torch.from_numpy(data.to_unit(split.x)).to(device)


def fingerprint(params: config.Params, n_train: int) -> str:
    """What a checkpoint must match to be resumed: every data/model/train param but resume."""
    keys = {
        k: v
        for k, v in config.flatten(params).items()
        if k.split(".")[0] in ("data", "model", "train") and k != "train.resume"
    }
    blob = json.dumps({"params": keys, "n_train": n_train}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def resume_state(params: config.Params, fp: str) -> dict | None:
    if not params.train.resume or not CHECKPOINT.is_file():
        return None
    state = checkpoint.load_state(CHECKPOINT)
    if state["fingerprint"] != fp:
        print(f"train: {CHECKPOINT} was made with other params; starting afresh")
        return None
    print(f"train: resuming from {CHECKPOINT} (epoch {state['epoch']}, batch {state['batch']})")
    return state


@exit_on_user_error
def main() -> None:
    params = config.load("params.yaml")
    # Under torchrun (WORLD_SIZE > 1): data-parallel, every rank trains, rank 0 writes.
    with distributed.session(resolve_device(params.train.device)) as (group, device):
        train(params, group, device)


def train(params: config.Params, group: distributed.Group, device: torch.device) -> None:
    threads = set_threads(params.train.threads)
    x_train, x_val = load_tensor("train", device), load_tensor("val", device)
    if params.train.batch_size > len(x_train):
        raise config.ConfigError(
            f"param 'train.batch_size' = {params.train.batch_size} is larger than the "
            f"{len(x_train)} training examples"
        )
    m = params.model
    mcfg = VAEConfig(
        image_shape=tuple(x_train.shape[1:]),
        latent_dim=m.latent_dim,
        hidden=list(m.hidden),
        likelihood=m.likelihood,
        gaussian_sigma=m.gaussian_sigma,
        arch=m.arch,
        channels=list(m.channels),
        learn_sigma=m.learn_sigma,
        min_sigma=m.min_sigma,
    )
    torch.manual_seed(params.train.seed)
    try:
        vae = VAE(mcfg).to(device)
    except (RuntimeError, MemoryError, TypeError, OverflowError) as e:  # no memory for a layer
        need = re.search(r"allocate (\d+) bytes", str(e))
        why = f"one layer needs {int(need[1]) / 1e9:,.0f} GB" if need else str(e).split("\n")[0]
        raise config.ConfigError(
            f"params 'model.hidden' = {mcfg.hidden} and 'model.latent_dim' = {mcfg.latent_dim} "
            f"make a model too large for {device} ({why[:200]})"
        ) from None
    fp = fingerprint(params, len(x_train))
    state = distributed.broadcast_object(
        resume_state(params, fp) if group.is_main else None, group
    )
    if not group.is_main:  # no MLflow, checkpoints or outputs: rank 0 writes those
        fit(
            vae,
            x_train,
            x_val,
            params.train,
            params.data.binarize,
            resume=state,
            progress=False,
            group=group,
        )
        return
    tags = tracking.run_tags(params.data.dataset, str(device))
    if group.enabled:
        tags["world_size"] = str(group.world_size)
    run_id = (
        state["run_id"]
        if state and tracking.run_exists(params.mlflow.experiment, state["run_id"])
        else None
    )
    ranks = f", {group.world_size} processes (torchrun)" if group.enabled else ""
    print(
        f"train: {len(x_train)} examples {tuple(x_train.shape[1:])} on {device}, "
        f"{threads} threads{ranks}"
    )
    with tracking.run(params.mlflow.experiment, run_id=run_id, tags=tags) as run:
        import mlflow

        if run_id is None:
            mlflow.log_params(config.flatten(params))

        def on_epoch_end(stats):
            tracking.log_epoch(stats.metrics(), step=stats.epoch)

        saved = {"epoch": state["epoch"] if state else None}

        def on_checkpoint(loop_state):
            saved["epoch"] = loop_state["epoch"]
            checkpoint.save_state(
                CHECKPOINT, {**loop_state, "fingerprint": fp, "run_id": run.info.run_id}
            )

        t0 = time.perf_counter()
        try:
            history = fit(
                vae,
                x_train,
                x_val,
                params.train,
                params.data.binarize,
                on_epoch_end,
                on_checkpoint,
                resume=state,
                group=group,
            )
        except TrainingDiverged as e:
            kept = (
                f"the last good checkpoint stays in {CHECKPOINT}"
                if CHECKPOINT.is_file()
                else "no epoch finished, so there is no checkpoint"
            )
            raise TrainingDiverged(
                f"{e}; MLflow run {run.info.run_id} is marked FAILED and {kept}; "
                "a lower train.lr usually helps"
            ) from None
        seconds = time.perf_counter() - t0
        last = history[-1]
        best = history[last.best_epoch - 1]  # fit handed back this epoch's weights
        checkpoint.save(MODEL, vae, {"params": config.to_dict(params), "run_id": run.info.run_id})
        # DVC outputs hold the deterministic figures only; wall times go to MLflow.
        curves = [
            {
                "epoch": h.epoch,
                **{k.replace("/", "_"): v for k, v in h.metrics().items() if k != "epoch_seconds"},
            }
            for h in history
        ]
        write_json(CURVES, curves)
        write_json(
            METRICS,
            {
                "run_id": run.info.run_id,
                "epochs": last.epoch,  # epochs run (fewer than train.epochs: early stopping)
                "device": str(device),
                **{k: v for k, v in best.metrics().items() if k != "epoch_seconds"},
            },
        )
        mlflow.log_metrics({"train_seconds": seconds, "epochs_run": last.epoch})
    stopped = f", stopped early after {last.epoch}" if last.epoch < params.train.epochs else ""
    print(
        f"train: done in {seconds:.1f}s{stopped}; best epoch {best.epoch}: val ELBO "
        f"{best.val['elbo']:.2f} nats (recon {best.val['recon']:.2f}, KL {best.val['kl']:.2f})"
        f"; MLflow run {run.info.run_id}"
    )


if __name__ == "__main__":
    main()
