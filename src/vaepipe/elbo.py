"""The VAE loss, as pure functions that return each term (nats, per example unless averaged).

recon = -log p(x|z) summed over pixels; kl = KL(q(z|x) || N(0, I)) in closed form;
elbo = -(recon + kl); loss = recon + beta * kl. Batch figures are means over the batch.
Note the seed tutorial's two traps: its section 4 drops the KL's minus sign, and its
`F.mse_loss` averages over pixels (weighting the KL ~784x too much). Neither is copied here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


def recon_nll(
    x: torch.Tensor, logits: torch.Tensor, likelihood: str, sigma: float = 0.1
) -> torch.Tensor:
    """-log p(x|z) per example, summed over pixels: [...] for x, logits [..., C, H, W]."""
    if likelihood == "bernoulli":
        nll = F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
    elif likelihood == "gaussian":
        mean = torch.sigmoid(logits)
        nll = 0.5 * ((x - mean) / sigma) ** 2 + math.log(sigma) + 0.5 * LOG_2PI
    else:
        raise ValueError(f"unknown likelihood {likelihood!r}")
    return nll.flatten(-3).sum(-1)


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) for each latent dimension: [B, D]."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) per example: [B]."""
    return kl_per_dim(mu, logvar).sum(-1)


@dataclass
class ElboTerms:
    recon: torch.Tensor  # scalar, mean over the batch of -log p(x|z)
    kl: torch.Tensor  # scalar, mean over the batch of KL(q || p)
    kl_per_dim: torch.Tensor  # [D], mean over the batch
    elbo: torch.Tensor  # scalar, -(recon + kl)
    loss: torch.Tensor  # scalar, recon + beta * kl (what is minimised)


def elbo_terms(
    x: torch.Tensor,
    logits: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    likelihood: str,
    sigma: float = 0.1,
    beta: float = 1.0,
) -> ElboTerms:
    recon = recon_nll(x, logits, likelihood, sigma).mean()
    kl_d = kl_per_dim(mu, logvar).mean(0)
    kl = kl_d.sum()
    return ElboTerms(
        recon=recon, kl=kl, kl_per_dim=kl_d, elbo=-(recon + kl), loss=recon + beta * kl
    )


def log_normal_diag(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last dim."""
    return -0.5 * ((z - mu).pow(2) / logvar.exp() + logvar + LOG_2PI).sum(-1)


def iwae_log_weights(
    x: torch.Tensor,
    logits: torch.Tensor,
    z: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    likelihood: str,
    sigma: float = 0.1,
) -> torch.Tensor:
    """log p(x|z) + log p(z) - log q(z|x) for z [K, B, D], logits [K, B, C, H, W]: [K, B]."""
    log_px_z = -recon_nll(x, logits, likelihood, sigma)
    log_pz = log_normal_diag(z, torch.zeros_like(z), torch.zeros_like(z))
    log_qz_x = log_normal_diag(z, mu, logvar)
    return log_px_z + log_pz - log_qz_x


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """The importance-weighted bound log (1/K) sum_k w_k per example: [B] from [K, B]."""
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])
