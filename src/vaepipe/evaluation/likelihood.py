"""How well the model explains the test images: the IWAE estimate of log p(x), the ELBO terms,
and the reconstruction at the posterior mean, per example.

Pure tensor-in, numbers-out functions; the evaluate stage does the file and MLflow work. The
posterior-collapse figures are in collapse.py, the latent-quality scores in latent.py.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from vaepipe.model.objectives import elbo_of, iwae_bound, log_weights
from vaepipe.model.vae import VAE

# Rows the decoder sees per tensor op in the IWAE loop (K samples x B examples), per device. On
# CPU, logits that stay in cache (2048 x 784 floats = 6 MB) run ~1.7x faster than 32768-row
# chunks (100 MB, page-faulted afresh on every allocation); a GPU wants big ops.
IWAE_ROWS_PER_CHUNK = {"cpu": 2048, "cuda": 32768}


@torch.no_grad()
def evaluate_elbo(
    vae: VAE, x: torch.Tensor, *, batch_size: int, seed: int, y=None
) -> tuple[dict[str, float], torch.Tensor]:
    """Single-sample ELBO terms over `x` with a fixed eps seed: ({recon, kl, elbo}, kl_per_dim)."""
    was_training = vae.training
    vae.eval()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    lik = vae.likelihood
    sums = torch.zeros(3, device=x.device, dtype=torch.float64)
    kl_d = torch.zeros(vae.cfg.latent_dim, device=x.device, dtype=torch.float64)
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], _rows(y, i, batch_size)
        eps = torch.randn((len(xb), vae.noise_dim), generator=gen, device=x.device)
        t = elbo_of(xb, vae.sample(xb, eps, yb), lik)
        n = len(xb)
        sums += n * torch.stack([t.recon, t.kl, t.elbo]).double()
        kl_d += n * t.kl_per_dim.double()
    vae.train(was_training)
    recon, kl, elbo = (sums / len(x)).tolist()
    return {"recon": recon, "kl": kl, "elbo": elbo}, (kl_d / len(x)).float()


def _rows(y, start: int, size: int):
    """Labels of a chunk (None for an unconditional model)."""
    return None if y is None else y[start : start + size]


def iwae_estimate(vae: VAE, x: torch.Tensor, eps: torch.Tensor, y=None) -> torch.Tensor:
    """The IWAE estimate of log p(x) per example for the noise `eps` ([K, B, E], or [K, E]
    shared by every example; E = vae.noise_dim): [B] (nats). The one computation behind the
    evaluate stage's likelihood and scorer.onnx (export.graphs.ScorerGraph), so the two agree
    for the same noise."""
    if eps.dim() == 2:
        eps = eps[:, None, :]  # [K, 1, E]: the same K draws for every example
    return iwae_bound(log_weights(x, vae.sample(x, eps, y), vae.likelihood))


def fixed_noise(k: int, noise_dim: int, seed: int) -> torch.Tensor:
    """The [k, noise_dim] standard-normal noise the scorer uses for every image: a constant
    of scorer.onnx, drawn from a seeded CPU generator so it is the same on every machine."""
    return torch.randn((k, noise_dim), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def iwae_log_likelihood(
    vae: VAE, x: torch.Tensor, k: int, *, seed: int, y=None, rows_per_chunk: int | None = None
) -> torch.Tensor:
    """Per-example IWAE estimate of log p(x) with k importance samples: [N] (nats), the noise
    drawn per example from a generator seeded with `seed`.

    All k samples of a chunk of examples go through the decoder as one [k, B, D] tensor op;
    rows_per_chunk (k x B) defaults to IWAE_ROWS_PER_CHUNK for x's device.
    """
    gen = torch.Generator(device=x.device).manual_seed(seed)

    def noise(n: int) -> torch.Tensor:
        return torch.randn((k, n, vae.noise_dim), generator=gen, device=x.device)

    return _in_chunks(vae, x, k, noise, y=y, rows_per_chunk=rows_per_chunk)


@torch.no_grad()
def fixed_noise_log_likelihood(
    vae: VAE, x: torch.Tensor, eps: torch.Tensor, y=None, rows_per_chunk: int | None = None
) -> torch.Tensor:
    """Per-example IWAE estimate of log p(x) with the same noise eps [k, E] for every example
    (the scorer's fixed noise, what scorer.onnx computes): [N] (nats)."""
    shared = eps.to(x.device)
    return _in_chunks(vae, x, len(eps), lambda n: shared, y=y, rows_per_chunk=rows_per_chunk)


def _in_chunks(vae: VAE, x, k: int, noise, *, y, rows_per_chunk: int | None) -> torch.Tensor:
    vae.eval()
    rows = rows_per_chunk or IWAE_ROWS_PER_CHUNK.get(x.device.type, IWAE_ROWS_PER_CHUNK["cpu"])
    chunk = max(1, rows // k)
    out = torch.empty(len(x), device=x.device)
    with getattr(vae.prior, "held", contextlib.nullcontext)():  # a VampPrior's, encoded once
        for i in range(0, len(x), chunk):
            xb = x[i : i + chunk]
            out[i : i + chunk] = iwae_estimate(vae, xb, noise(len(xb)), _rows(y, i, chunk))
    return out


@torch.no_grad()
def encode_all(
    vae: VAE, x: torch.Tensor, *, batch_size: int, y=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """q(z|x) parameters for every example: (mu, logvar), each [N, D]."""
    vae.eval()
    parts = [
        vae.encode(x[i : i + batch_size], _rows(y, i, batch_size))
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@dataclass
class Reconstruction:
    """Per-example reconstruction figures, each [N]."""

    recon_nll: torch.Tensor  # -log p(x | z = mu(x)) on the evaluated data, nats
    mse: torch.Tensor  # mean over pixels of (E[x | z = mu(x)] - x)^2 on grey images
    psnr: torch.Tensor  # 10 log10(1 / mse), dB


@torch.no_grad()
def reconstruct(
    vae: VAE, x: torch.Tensor, x_grey: torch.Tensor, *, batch_size: int, y=None
) -> Reconstruction:
    """Per-example reconstruction at the posterior mean (no sampling noise in the figures).

    The NLL is on `x`, the data the likelihood is measured on (a binarized draw for a Bernoulli
    model); MSE and PSNR compare grey `x_grey` with its reconstruction, as a user sees them.
    """
    vae.eval()
    nll, mse = [], []
    for i in range(0, len(x), batch_size):
        xb, gb, yb = x[i : i + batch_size], x_grey[i : i + batch_size], _rows(y, i, batch_size)
        nll.append(vae.likelihood.nll(xb, vae.decode(vae.encode(xb, yb)[0], yb)))
        recon = vae.mean(vae.decode(vae.encode(gb, yb)[0], yb))
        mse.append((recon - gb).pow(2).flatten(1).mean(1))
    mse_all = torch.cat(mse)
    # An exact reconstruction has infinite PSNR; clamp so means and plots stay finite (100 dB).
    psnr_all = 10.0 * torch.log10(1.0 / mse_all.clamp_min(1e-10))
    return Reconstruction(recon_nll=torch.cat(nll), mse=mse_all, psnr=psnr_all)


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    v = values.double()
    stderr = v.std(unbiased=True).item() / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return v.mean().item(), stderr


def psnr(mse: float, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB for a mean squared error on [0, peak] images."""
    return 10.0 * math.log10(peak**2 / mse) if mse > 0 else float("inf")
