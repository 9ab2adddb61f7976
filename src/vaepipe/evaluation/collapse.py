"""Posterior collapse: which latent dims carry information about x (active units), how much
the codes tell about the image (mutual information I(x; z)), and how far the codes the decoder
sees are from the prior it samples (KL of the aggregate posterior). Pure tensor functions.
"""

from __future__ import annotations

import math

import torch

from vaepipe.model.gaussian import (
    log_normal_diag,
    mixture_log_prob,
    reparameterize,
    standard_log_prob,
)

# Samples z per block of the aggregate-posterior density: the [M, N] float64 block is 20 MB for
# N = 10k test examples, small enough to be reused rather than page-faulted afresh.
MIXTURE_ROWS_PER_CHUNK = 256


def activity(mu: torch.Tensor) -> torch.Tensor:
    """Cov_x(E_q[z_u]) for each latent dim u: the variance of mu across examples, [D]."""
    return mu.double().var(dim=0, unbiased=True).float()


def active_units(mu: torch.Tensor, threshold: float) -> tuple[int, torch.Tensor]:
    """(count, [D] bool mask) of dims whose activity exceeds `threshold` (Burda et al. 2016).

    A dim whose mean does not move with x carries no information about x, whatever its KL.
    """
    mask = activity(mu) > threshold
    return int(mask.sum()), mask


def aggregate_log_density(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log q(z) = log (1/N) sum_n N(z_m; mu_n, diag(exp(logvar_n))) for z [M, D] and the N
    posteriors mu/logvar [N, D]: [M], float64 (the mixture density of vaepipe.model.gaussian,
    equal weights, in blocks of z)."""
    z, mu, logvar = z.double(), mu.double(), logvar.double()
    log_w = torch.full((len(mu),), -math.log(len(mu)), dtype=torch.float64, device=mu.device)
    return torch.cat(
        [mixture_log_prob(c, mu, logvar, log_w) for c in z.split(MIXTURE_ROWS_PER_CHUNK)]
    )


def posterior_information(
    mu: torch.Tensor, logvar: torch.Tensor, *, seed: int, log_prior=None
) -> dict[str, float]:
    """Monte Carlo estimates, in nats, from one z_n ~ q(z|x_n) per example:

    mutual_info = I_q(x; z) = E_n[log q(z_n|x_n) - log q(z_n)] and
    aggregate_kl = KL(q(z) || p(z)) = E_n[log q(z_n) - log p(z_n)],
    where q(z) = (1/N) sum_n q(z|x_n) is the aggregate posterior (Hoffman & Johnson 2016). Their
    sum is E_x KL(q(z|x) || p(z)) (same samples). An encoder that ignores x gives
    q(z|x_n) = q(z), hence mutual_info = 0 exactly. The mixture holds each sample's own
    posterior with weight 1/N, so mutual_info <= log N: when the posteriors barely overlap
    (mutual_info near log N) it is biased low and aggregate_kl high; both are estimates, and
    aggregate_kl can dip below 0 by noise when q(z) ~ p(z). log_prior: the model's learned
    prior (e.g. vae.prior.log_prob); N(0, I) when None.
    """
    gen = torch.Generator(device=mu.device).manual_seed(seed)
    eps = torch.randn(mu.shape, generator=gen, device=mu.device)
    mu, logvar = mu.double(), logvar.double()
    z = reparameterize(mu, logvar, eps.double())  # [N, D]
    log_q_z_x = log_normal_diag(z, mu, logvar)  # [N]
    log_q_z = aggregate_log_density(z, mu, logvar)  # [N]
    log_p_z = (
        standard_log_prob(z)
        if log_prior is None
        else torch.cat([log_prior(c.float()).double() for c in z.split(MIXTURE_ROWS_PER_CHUNK)])
    )  # [N]
    return {
        "mutual_info": (log_q_z_x - log_q_z).mean().item(),
        "aggregate_kl": (log_q_z - log_p_z).mean().item(),
    }
