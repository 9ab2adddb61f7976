"""Evaluation metrics: likelihood (IWAE bound), ELBO terms, reconstruction error per example,
and posterior-collapse diagnostics (active units, mutual information, aggregate-posterior KL).

Pure tensor-in, numbers-out functions; the evaluate stage does the file and MLflow work.
Latent-quality scores that need scikit-learn live in latent.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vaepipe.elbo import LOG_2PI, iwae_bound, iwae_log_weights, sample_terms
from vaepipe.model import VAE

# Rows the decoder sees per tensor op in the IWAE loop (K samples x B examples), per device. On
# CPU, logits that stay in cache (2048 x 784 floats = 6 MB) run ~1.7x faster than 32768-row
# chunks (100 MB, page-faulted afresh on every allocation); a GPU wants big ops.
IWAE_ROWS_PER_CHUNK = {"cpu": 2048, "cuda": 32768}
# Samples z per matmul block of the aggregate-posterior density: the [M, N] float64 block is
# 20 MB for N = 10k test examples, small enough to be reused rather than page-faulted afresh.
MIXTURE_ROWS_PER_CHUNK = 256


@torch.no_grad()
def evaluate_elbo(
    vae: VAE, x: torch.Tensor, batch_size: int = 1000, seed: int = 0, y=None
) -> tuple[dict[str, float], torch.Tensor]:
    """Single-sample ELBO terms over `x` with a fixed eps seed: ({recon, kl, elbo}, kl_per_dim)."""
    was_training = vae.training
    vae.eval()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    cfg = vae.cfg
    sums = torch.zeros(3, device=x.device, dtype=torch.float64)
    kl_d = torch.zeros(cfg.latent_dim, device=x.device, dtype=torch.float64)
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], _rows(y, i, batch_size)
        eps = torch.randn((len(xb), vae.noise_dim), generator=gen, device=x.device)
        t = sample_terms(xb, vae.sample(xb, eps, yb), cfg.likelihood, vae.sigma)
        n = len(xb)
        sums += n * torch.stack([t.recon, t.kl, t.elbo]).double()
        kl_d += n * t.kl_per_dim.double()
    vae.train(was_training)
    recon, kl, elbo = (sums / len(x)).tolist()
    return {"recon": recon, "kl": kl, "elbo": elbo}, (kl_d / len(x)).float()


def _rows(y, start: int, size: int):
    """Labels of a chunk (None for an unconditional model)."""
    return None if y is None else y[start : start + size]


def iwae_weights_of(vae: VAE, x: torch.Tensor, eps: torch.Tensor, y=None) -> torch.Tensor:
    """The IWAE estimate of log p(x) per example for the noise `eps` ([K, B, E], or [K, E]
    shared by every example; E = vae.noise_dim): [B] (nats). The one computation behind the
    evaluate stage's likelihood and scorer.onnx (export.ScorerGraph), so the two agree for the
    same noise."""
    cfg = vae.cfg
    if eps.dim() == 2:
        eps = eps[:, None, :]  # [K, 1, E]: the same K draws for every example
    s = vae.sample(x, eps, y)  # logits [K, B, C, H, W]
    if s.log_q is None:  # one layer, N(0, I) prior
        log_w = iwae_log_weights(x, s.logits, s.z, s.mu, s.logvar, cfg.likelihood, vae.sigma)
    else:
        log_w = -vae.recon_nll(x, s.logits) + s.log_p - s.log_q
    return iwae_bound(log_w)


def fixed_noise(k: int, noise_dim: int, seed: int) -> torch.Tensor:
    """The [k, noise_dim] standard-normal noise the scorer uses for every image: a constant
    of scorer.onnx, drawn from a seeded CPU generator so it is the same on every machine."""
    return torch.randn((k, noise_dim), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def iwae_log_likelihood(
    vae: VAE,
    x: torch.Tensor,
    k: int,
    seed: int = 0,
    rows_per_chunk: int | None = None,
    eps: torch.Tensor | None = None,
    y=None,
) -> torch.Tensor:
    """Per-example IWAE estimate of log p(x) with k importance samples: [N] (nats).

    The noise is drawn per example from a generator seeded with `seed`, or is `eps` [k, D],
    shared by every example (the scorer's fixed noise). All k samples of a chunk of examples go
    through the decoder as one [k, B, D] tensor op; rows_per_chunk (k x B) defaults to
    IWAE_ROWS_PER_CHUNK for x's device.
    """
    vae.eval()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    rows = rows_per_chunk or IWAE_ROWS_PER_CHUNK.get(x.device.type, IWAE_ROWS_PER_CHUNK["cpu"])
    chunk = max(1, rows // k)
    out = torch.empty(len(x), device=x.device)
    for i in range(0, len(x), chunk):
        xb = x[i : i + chunk]
        if eps is None:
            noise = torch.randn((k, len(xb), vae.noise_dim), generator=gen, device=x.device)
        else:
            noise = eps.to(x.device)
        out[i : i + chunk] = iwae_weights_of(vae, xb, noise, _rows(y, i, chunk))
    return out


@torch.no_grad()
def encode_all(
    vae: VAE, x: torch.Tensor, batch_size: int = 1000, y=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """q(z|x) parameters for every example: (mu, logvar), each [N, D]."""
    vae.eval()
    parts = [
        vae.encode(x[i : i + batch_size], _rows(y, i, batch_size))
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# --- reconstruction ------------------------------------------------------------------------------


@dataclass
class Reconstruction:
    """Per-example reconstruction figures, each [N]."""

    recon_nll: torch.Tensor  # -log p(x | z = mu(x)) on the evaluated data, nats
    mse: torch.Tensor  # mean over pixels of (E[x | z = mu(x)] - x)^2 on grey images
    psnr: torch.Tensor  # 10 log10(1 / mse), dB


@torch.no_grad()
def reconstruct(
    vae: VAE, x: torch.Tensor, x_grey: torch.Tensor, batch_size: int = 1000, y=None
) -> Reconstruction:
    """Per-example reconstruction at the posterior mean (no sampling noise in the figures).

    The NLL is on `x`, the data the likelihood is measured on (a binarized draw for a Bernoulli
    model); MSE and PSNR compare grey `x_grey` with its reconstruction, as a user sees them.
    """
    vae.eval()
    nll, mse = [], []
    for i in range(0, len(x), batch_size):
        xb, gb, yb = x[i : i + batch_size], x_grey[i : i + batch_size], _rows(y, i, batch_size)
        nll.append(vae.recon_nll(xb, vae.decode(vae.encode(xb, yb)[0], yb)))
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


# --- posterior collapse --------------------------------------------------------------------------


def activity(mu: torch.Tensor) -> torch.Tensor:
    """Cov_x(E_q[z_u]) for each latent dim u: the variance of mu across examples, [D]."""
    return mu.double().var(dim=0, unbiased=True).float()


def active_units(mu: torch.Tensor, threshold: float = 0.01) -> tuple[int, torch.Tensor]:
    """(count, [D] bool mask) of dims whose activity exceeds `threshold` (Burda et al. 2016).

    A dim whose mean does not move with x carries no information about x, whatever its KL.
    """
    mask = activity(mu) > threshold
    return int(mask.sum()), mask


def _log_mixture_density(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log (1/N) sum_n N(z_m; mu_n, diag(exp(logvar_n))) for z [M, D], mu/logvar [N, D]: [M].

    The squared distance is expanded into matmuls, sum_d (z - mu)^2 / var =
    z^2 @ (1/var)^T - 2 z @ (mu/var)^T + sum_d mu^2/var, so no [M, N, D] tensor is built; float64
    keeps the expansion from cancelling badly when a posterior variance is tiny.
    """
    z, mu, logvar = z.double(), mu.double(), logvar.double()
    inv_var = torch.exp(-logvar)  # [N, D]
    const = (mu.pow(2) * inv_var).sum(1) + logvar.sum(1) + mu.shape[1] * LOG_2PI  # [N]
    out = torch.empty(len(z), dtype=torch.float64, device=z.device)
    for i in range(0, len(z), MIXTURE_ROWS_PER_CHUNK):
        zb = z[i : i + MIXTURE_ROWS_PER_CHUNK]  # [m, D]
        sq = zb.pow(2) @ inv_var.T - 2.0 * zb @ (mu * inv_var).T  # [m, N]
        out[i : i + len(zb)] = torch.logsumexp(-0.5 * (sq + const), dim=1)
    return out - math.log(len(mu))


def posterior_information(
    mu: torch.Tensor, logvar: torch.Tensor, seed: int = 0, log_prior=None
) -> dict[str, float]:
    """Monte Carlo estimates, in nats, from one z_n ~ q(z|x_n) per example:

    mutual_info = I_q(x; z) = E_n[log q(z_n|x_n) - log q(z_n)] and
    aggregate_kl = KL(q(z) || p(z)) = E_n[log q(z_n) - log p(z_n)],
    where q(z) = (1/N) sum_n q(z|x_n) is the aggregate posterior (Hoffman & Johnson 2016). Their
    sum is E_x KL(q(z|x) || p(z)) (same samples). An encoder that ignores x gives
    q(z|x_n) = q(z), hence mutual_info = 0 exactly. The mixture holds each sample's own
    posterior with weight 1/N, so mutual_info <= log N: when the posteriors barely overlap
    (mutual_info near log N) it is biased low and aggregate_kl high; both are estimates, and
    aggregate_kl can dip below 0 by noise when q(z) ~ p(z).
    """
    gen = torch.Generator(device=mu.device).manual_seed(seed)
    eps = torch.randn(mu.shape, generator=gen, device=mu.device)
    z = (mu + torch.exp(0.5 * logvar) * eps).double()  # [N, D]
    log_q_z_x = -0.5 * (eps.double().pow(2) + logvar.double() + LOG_2PI).sum(1)  # [N]
    log_q_z = _log_mixture_density(z, mu, logvar)  # [N]
    # log p(z): N(0, I), or the model's learned prior (`log_prior`, e.g. vae.prior.log_prob)
    log_p_z = (
        -0.5 * (z.pow(2) + LOG_2PI).sum(1)
        if log_prior is None
        else torch.cat([log_prior(c.float()).double() for c in z.split(MIXTURE_ROWS_PER_CHUNK)])
    )  # [N]
    return {
        "mutual_info": (log_q_z_x - log_q_z).mean().item(),
        "aggregate_kl": (log_q_z - log_p_z).mean().item(),
    }
