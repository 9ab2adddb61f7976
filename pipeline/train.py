"""Stage train: fit the VAE on data/prepared, one MLflow run with every ELBO term per epoch.

Writes models/vae.pt (weights + config + params), metrics/train.json (final figures and the
MLflow run id that evaluate and export add to) and plots/train/curves.json (per-epoch curves).
"""

import time
from pathlib import Path

import torch

from vaepipe import checkpoint, config, data, tracking
from vaepipe.errors import exit_on_user_error
from vaepipe.fileio import write_json
from vaepipe.model import VAE, VAEConfig
from vaepipe.train import fit, resolve_device, set_threads

PREPARED = Path("data/prepared")
MODEL = Path("models/vae.pt")
METRICS = Path("metrics/train.json")
CURVES = Path("plots/train/curves.json")


def load_tensor(name: str, device: torch.device) -> torch.Tensor:
    split = data.load_split(PREPARED / f"{name}.npz")
    return torch.from_numpy(data.to_unit(split.x)).to(device)


@exit_on_user_error
def main() -> None:
    params = config.load("params.yaml")
    device = resolve_device(params.train.device)
    threads = set_threads(params.train.threads)
    x_train, x_val = load_tensor("train", device), load_tensor("val", device)
    if params.train.batch_size > len(x_train):
        raise config.ConfigError(
            f"param 'train.batch_size' = {params.train.batch_size} is larger than the "
            f"{len(x_train)} training examples"
        )
    mcfg = VAEConfig(
        image_shape=tuple(x_train.shape[1:]),
        latent_dim=params.model.latent_dim,
        hidden=list(params.model.hidden),
        likelihood=params.model.likelihood,
        gaussian_sigma=params.model.gaussian_sigma,
    )
    torch.manual_seed(params.train.seed)
    vae = VAE(mcfg).to(device)
    tags = tracking.run_tags(params.data.dataset, str(device))
    print(
        f"train: {len(x_train)} examples {tuple(x_train.shape[1:])} on {device}, {threads} threads"
    )
    with tracking.run(params.mlflow.experiment, tags=tags) as run:
        import mlflow

        mlflow.log_params(config.flatten(params))
        curves = []

        def on_epoch_end(stats):
            tracking.log_epoch(stats.metrics(), step=stats.epoch)
            curves.append(
                {
                    "epoch": stats.epoch,
                    **{k.replace("/", "_"): v for k, v in stats.metrics().items()},
                }
            )

        t0 = time.perf_counter()
        history = fit(vae, x_train, x_val, params.train, params.data.binarize, on_epoch_end)
        seconds = time.perf_counter() - t0
        last = history[-1]
        checkpoint.save(MODEL, vae, {"params": config.to_dict(params), "run_id": run.info.run_id})
        write_json(CURVES, curves)
        summary = {
            "run_id": run.info.run_id,
            "epochs": last.epoch,
            "train_seconds": round(seconds, 2),
            "device": str(device),
            **{k: v for k, v in last.metrics().items() if k != "epoch_seconds"},
        }
        write_json(METRICS, summary)
        mlflow.log_metric("train_seconds", seconds)
    print(
        f"train: done in {seconds:.1f}s; val ELBO {last.val['elbo']:.2f} nats "
        f"(recon {last.val['recon']:.2f}, KL {last.val['kl']:.2f}); MLflow run {run.info.run_id}"
    )


if __name__ == "__main__":
    main()
