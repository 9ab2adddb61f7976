"""Stage evaluate: test likelihood (IWAE), ELBO terms, reconstruction error, and picture grids.

Writes metrics/evaluate.json and plots/evaluate/*.png, and adds both to the training run.
"""

import math
from pathlib import Path

import numpy as np
import torch

from vaepipe import checkpoint, config, data, metrics, plots, tracking
from vaepipe.errors import exit_on_user_error
from vaepipe.fileio import read_json, write_json
from vaepipe.train import binarize, resolve_device, set_threads

OUT = Path("metrics/evaluate.json")
PLOTS = Path("plots/evaluate")


@exit_on_user_error
def main() -> None:
    params = config.load("params.yaml")
    ev = params.evaluate
    device = resolve_device(params.train.device)
    set_threads(params.train.threads)
    vae, _ = checkpoint.load("models/vae.pt", device)
    test = data.load_split("data/prepared/test.npz")
    x_grey = torch.from_numpy(data.to_unit(test.x)).to(device)
    if tuple(x_grey.shape[1:]) != tuple(vae.cfg.image_shape):
        raise data.DataError(
            f"test images {tuple(x_grey.shape[1:])} do not match the model's "
            f"{tuple(vae.cfg.image_shape)}; rerun the pipeline"
        )
    # The likelihood is measured on the data the model was trained to explain: one fixed
    # Bernoulli draw of the test set for a Bernoulli model (the benchmark standard).
    x = x_grey
    if vae.cfg.likelihood == "bernoulli":
        x = binarize(x_grey, torch.Generator(device=device).manual_seed(ev.seed))

    elbo, _ = metrics.evaluate_elbo(vae, x, batch_size=ev.batch_size, seed=ev.seed)
    log_px = metrics.iwae_log_likelihood(vae, x, ev.iwae_k, seed=ev.seed)
    nll, nll_se = metrics.mean_and_stderr(-log_px)
    mse = metrics.reconstruction_errors(vae, x_grey).mean().item()
    n_dims = math.prod(vae.cfg.image_shape)
    results = {
        "test/nll_iwae": nll,
        "test/nll_iwae_stderr": nll_se,
        "test/bits_per_dim": nll / (n_dims * math.log(2)),
        "test/elbo": elbo["elbo"],
        "test/recon": elbo["recon"],
        "test/kl": elbo["kl"],
        "test/mse": mse,
        "test/psnr": metrics.psnr(mse),
        "iwae_k": ev.iwae_k,
        "n_test": len(x),
    }

    n = min(ev.n_images, len(x_grey))
    with torch.no_grad():
        inputs = x_grey[:n]
        recon = vae.mean(vae.decode(vae.encode(inputs)[0]))
        gen = torch.Generator(device=device).manual_seed(ev.seed)
        z = torch.randn((n, vae.cfg.latent_dim), generator=gen, device=device)
        samples = vae.mean(vae.decode(z))
    grids = {
        "reconstructions.png": plots.interleave_rows(inputs.cpu().numpy(), recon.cpu().numpy()),
        "samples.png": samples.cpu().numpy(),
    }
    for name, images in grids.items():
        plots.save_png(PLOTS / name, plots.image_grid(np.asarray(images)))
    write_json(OUT, results)

    run_id = read_json("metrics/train.json")["run_id"]
    with tracking.run(params.mlflow.experiment, run_id=run_id):
        import mlflow

        mlflow.log_metrics({k: v for k, v in results.items() if k.startswith("test/")})
        mlflow.log_artifacts(str(PLOTS), artifact_path="plots")
    print(
        f"evaluate: test NLL (IWAE, k={ev.iwae_k}) {nll:.2f} ± {nll_se:.2f} nats "
        f"({results['test/bits_per_dim']:.4f} bits/dim); ELBO {elbo['elbo']:.2f} "
        f"(recon {elbo['recon']:.2f}, KL {elbo['kl']:.2f}); MSE {mse:.5f}, "
        f"PSNR {results['test/psnr']:.2f} dB"
    )


if __name__ == "__main__":
    main()
