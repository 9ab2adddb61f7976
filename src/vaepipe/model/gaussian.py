"""Diagonal Gaussians, the one place their densities are written: log N(z; mu, diag(var)), the
standard normal, the per-dim KL to N(0, 1), the reparameterization and mixtures of them.

The posteriors q(z|x), the priors (N(0, I), VampPrior, mixture of Gaussians), the ELBO, the
IWAE bound and the aggregate-posterior figures of evaluation all call these.
"""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2 * math.pi)


def log_normal_diag(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last dim."""
    return -0.5 * ((z - mu).pow(2) / logvar.exp() + logvar + LOG_2PI).sum(-1)


def standard_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dim (log_normal_diag at mu = 0, logvar = 0, to the
    last bit)."""
    return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) for each latent dimension, in closed form: [B, D]."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps: a draw of N(mu, diag(exp(logvar))) as a differentiable function of
    the standard-normal noise eps (whose leading dims, [K, B] or [B], the result takes)."""
    return mu + torch.exp(0.5 * logvar) * eps


def mixture_log_prob(
    z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, log_weights: torch.Tensor
) -> torch.Tensor:
    """log sum_k w_k N(z; mu_k, var_k) for z [..., D], components [K, D], log w [K] (or any
    shape that broadcasts to [..., K], such as one row of weights per example): [...], in z's
    dtype.

    The quadratic form sum_d (z_d - mu_kd)^2 / var_kd and the normalizer are one matrix product,
    [z^2, z, 1] @ [1/var, -2 mu/var, sum_d mu^2/var + log|2 pi var|]^T, so no [..., K, D] tensor
    is made (that broadcast cost as much as the rest of a VampPrior IWAE step) and few passes go
    over the [..., K] block (each a large part of a VampPrior's IWAE estimate). The terms reach
    thousands where a posterior's variance is small, and cancel: they are summed in float64.
    The mixture's log-sum-exp is shifted by the max by hand (not torch.logsumexp): ONNX's
    ReduceLogSumExp underflows. For many z (the aggregate posterior of 10,000 test images) the
    caller splits z into chunks: the [chunk, K] block stays small."""
    zd, md, lv = z.double(), mu.double(), logvar.double()
    prec = torch.exp(-lv)  # [K, D]
    norm = lv.sum(-1) + z.shape[-1] * LOG_2PI  # [K]
    lhs = torch.cat([zd * zd, zd, torch.ones_like(zd[..., :1])], -1)  # [..., 2D + 1]
    rhs = torch.cat([prec, -2 * md * prec, ((md * md * prec).sum(-1) + norm)[:, None]], -1)
    quad_norm = torch.maximum(lhs @ rhs.T, norm)  # [..., K]; the quadratic form is >= 0
    comp = torch.add(log_weights.double(), quad_norm, alpha=-0.5).to(z.dtype)
    top = comp.max(dim=-1, keepdim=True).values.detach()
    return (top + torch.log(torch.exp(comp - top).sum(-1, keepdim=True))).squeeze(-1)
