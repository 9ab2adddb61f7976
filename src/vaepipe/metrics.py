"""Evaluation metrics: likelihood (IWAE bound), ELBO terms and reconstruction error.

Pure tensor-in, numbers-out functions; the evaluate stage does the file and MLflow work.
"""

from __future__ import annotations

import math

import torch

from vaepipe.elbo import elbo_terms, iwae_bound, iwae_log_weights
from vaepipe.model import VAE

# Rows the decoder sees per tensor op in the IWAE loop: K samples x B examples. Large enough to
# keep the matmuls efficient, small enough for ~100 MB of logits on 28x28 images.
IWAE_ROWS_PER_CHUNK = 32768


@torch.no_grad()
def evaluate_elbo(
    vae: VAE, x: torch.Tensor, batch_size: int = 1000, seed: int = 0
) -> tuple[dict[str, float], torch.Tensor]:
    """Single-sample ELBO terms over `x` with a fixed eps seed: ({recon, kl, elbo}, kl_per_dim)."""
    was_training = vae.training
    vae.eval()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    cfg = vae.cfg
    sums = torch.zeros(3, device=x.device, dtype=torch.float64)
    kl_d = torch.zeros(cfg.latent_dim, device=x.device, dtype=torch.float64)
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        mu, logvar = vae.encode(xb)
        eps = torch.randn(mu.shape, generator=gen, device=mu.device)
        logits = vae.decode(vae.reparameterize(mu, logvar, eps))
        t = elbo_terms(xb, logits, mu, logvar, cfg.likelihood, cfg.gaussian_sigma)
        n = len(xb)
        sums += n * torch.stack([t.recon, t.kl, t.elbo]).double()
        kl_d += n * t.kl_per_dim.double()
    vae.train(was_training)
    recon, kl, elbo = (sums / len(x)).tolist()
    return {"recon": recon, "kl": kl, "elbo": elbo}, (kl_d / len(x)).float()


@torch.no_grad()
def iwae_log_likelihood(
    vae: VAE, x: torch.Tensor, k: int, seed: int = 0, rows_per_chunk: int = IWAE_ROWS_PER_CHUNK
) -> torch.Tensor:
    """Per-example IWAE estimate of log p(x) with k importance samples: [N] (nats).

    All k samples of a chunk of examples go through the decoder as one [k, B, D] tensor op.
    """
    vae.eval()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    cfg = vae.cfg
    chunk = max(1, rows_per_chunk // k)
    out = torch.empty(len(x), device=x.device)
    for i in range(0, len(x), chunk):
        xb = x[i : i + chunk]
        mu, logvar = vae.encode(xb)  # [B, D]
        eps = torch.randn((k, *mu.shape), generator=gen, device=x.device)  # [K, B, D]
        z = mu + torch.exp(0.5 * logvar) * eps
        logits = vae.decode(z)  # [K, B, C, H, W]
        log_w = iwae_log_weights(xb, logits, z, mu, logvar, cfg.likelihood, cfg.gaussian_sigma)
        out[i : i + chunk] = iwae_bound(log_w)
    return out


@torch.no_grad()
def reconstruction_errors(vae: VAE, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Per-example mean squared error between x and E[x | z = mu(x)]: [N]."""
    vae.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        mu, _ = vae.encode(xb)
        out.append((vae.mean(vae.decode(mu)) - xb).pow(2).flatten(1).mean(1))
    return torch.cat(out)


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    v = values.double()
    stderr = v.std(unbiased=True).item() / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return v.mean().item(), stderr


def psnr(mse: float, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB for a mean squared error on [0, peak] images."""
    return 10.0 * math.log10(peak**2 / mse) if mse > 0 else float("inf")
