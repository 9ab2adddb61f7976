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

LOG_2PI = math.log(2 * math.pi)


def recon_nll(
    x: torch.Tensor, logits: torch.Tensor, likelihood: str, sigma: float | torch.Tensor = 0.1
) -> torch.Tensor:
    """-log p(x|z) per example, summed over pixels: [...] for x, logits [..., C, H, W].

    Every likelihood is a proper log-probability (bernoulli, on binary x) or log-density
    (gaussian, continuous_bernoulli, on x in [0, 1]) in nats, so runs of one kind compare.
    sigma: the Gaussian's std, a float or one per pixel [C, H, W].
    """
    if likelihood == "bernoulli":
        nll = bernoulli_nll(logits, x)
    elif likelihood == "gaussian":
        mean = torch.sigmoid(logits)
        if isinstance(sigma, torch.Tensor):
            log_sigma = torch.log(sigma)
        else:
            log_sigma = math.log(sigma)
        nll = 0.5 * ((x - mean) / sigma) ** 2 + log_sigma + 0.5 * LOG_2PI
    elif likelihood == "continuous_bernoulli":
        nll = -(logits * x + cb_log_norm(logits))
    else:
        raise ValueError(f"unknown likelihood {likelihood!r}")
    return nll.flatten(-3).sum(-1)


def bernoulli_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log Bernoulli(x; sigmoid(logits)) elementwise, = softplus(l) - x l, written so that no
    exp overflows and no log meets 0 for any logit: what BCE-with-logits computes, spelled out
    because ONNX exports F.binary_cross_entropy_with_logits as log(sigmoid(l)), which is -inf
    once sigmoid underflows (a saturated pixel of a trained decoder)."""
    return logits.clamp_min(0) + torch.log1p(torch.exp(-logits.abs())) - x * logits


# Below |eta| < this the closed forms of the continuous Bernoulli cancel catastrophically in
# float32; their Taylor series (error < 1e-7 there) take over.
_CB_TAYLOR = 0.5


def cb_log_norm(eta: torch.Tensor) -> torch.Tensor:
    """log C(eta) of the continuous Bernoulli p(x) = C exp(eta x) on [0, 1], eta = logit(lambda).

    C = eta / (e^eta - 1) (Loaiza-Ganem & Cunningham 2019, in natural-parameter form); written
    as log|eta| - max(eta, 0) - log(1 - e^-|eta|) so no exp overflows.
    """
    small = eta.abs() < _CB_TAYLOR
    safe = torch.where(small, torch.ones_like(eta), eta)  # no log(0) feeding a NaN gradient
    a = safe.abs()
    exact = torch.log(a) - safe.clamp_min(0) - torch.log(-torch.expm1(-a))
    e2 = eta * eta  # log C = -eta/2 + log(s / sinh s), s = eta/2, expanded in s
    series = -eta / 2 - e2 / 24 + e2 * e2 / 2880 - e2 * e2 * e2 / 90720
    return torch.where(small, series, exact)


def cb_mean(eta: torch.Tensor) -> torch.Tensor:
    """E[x] of the continuous Bernoulli with natural parameter eta: 1/(1 - e^-eta) - 1/eta."""
    small = eta.abs() < _CB_TAYLOR
    safe = torch.where(small, torch.ones_like(eta), eta)
    a = safe.abs()  # mean(-eta) = 1 - mean(eta): only e^-|eta| is ever formed, no overflow
    upper = -1.0 / torch.expm1(-a) - 1.0 / a
    exact = torch.where(safe > 0, upper, 1.0 - upper)
    e2 = eta * eta
    series = 0.5 + eta / 12 - eta * e2 / 720 + eta * e2 * e2 / 30240
    return torch.where(small, series, exact)


def likelihood_mean(logits: torch.Tensor, likelihood: str) -> torch.Tensor:
    """E[x|z] from decoder logits: sigmoid for bernoulli and gaussian (means kept in [0, 1])."""
    if likelihood == "continuous_bernoulli":
        return cb_mean(logits)
    return torch.sigmoid(logits)


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) for each latent dimension: [B, D]."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0)


@dataclass
class ElboTerms:
    recon: torch.Tensor  # scalar, mean over the batch of -log p(x|z)
    kl: torch.Tensor  # scalar, mean over the batch of KL(q || p)
    kl_per_dim: torch.Tensor  # [D], mean over the batch
    elbo: torch.Tensor  # scalar, -(recon + kl)
    loss: torch.Tensor  # scalar, what is minimised (recon + beta * kl for the ELBO objective)


def elbo_terms(
    x: torch.Tensor,
    logits: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    likelihood: str,
    sigma: float | torch.Tensor = 0.1,
    beta: float = 1.0,
    free_bits: float = 0.0,
) -> ElboTerms:
    """ELBO terms of one sample per example. free_bits > 0: the loss charges each latent dim
    max(free_bits, its batch-mean KL) (Kingma et al. 2016), so a dim may carry that many nats
    for free; the reported kl and elbo stay the true ones."""
    recon = recon_nll(x, logits, likelihood, sigma).mean()
    kl_d = kl_per_dim(mu, logvar).mean(0)
    kl = kl_d.sum()
    charged = kl_d.clamp_min(free_bits).sum() if free_bits > 0 else kl
    return ElboTerms(
        recon=recon, kl=kl, kl_per_dim=kl_d, elbo=-(recon + kl), loss=recon + beta * charged
    )


def iwae_terms(
    x: torch.Tensor,
    logits: torch.Tensor,
    z: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    likelihood: str,
    sigma: float | torch.Tensor = 0.1,
    log_px_z: torch.Tensor | None = None,
) -> ElboTerms:
    """The IWAE objective (Burda et al. 2016) from K samples per example (z [K, B, D]): loss is
    minus the batch mean of log (1/K) sum_k w_k; recon and elbo are the K-sample averages of the
    single-sample terms (unbiased ELBO estimates), kl the closed form. log_px_z: log p(x|z)
    [K, B] when the caller has it already (computed from x and logits otherwise)."""
    if log_px_z is None:
        log_px_z = -recon_nll(x, logits, likelihood, sigma)  # [K, B]
    log_w = _log_weights(log_px_z, z, mu, logvar)
    recon = -log_px_z.mean()
    kl_d = kl_per_dim(mu, logvar).mean(0)
    kl = kl_d.sum()
    return ElboTerms(
        recon=recon, kl=kl, kl_per_dim=kl_d, elbo=-(recon + kl), loss=-iwae_bound(log_w).mean()
    )


def sample_terms(
    x: torch.Tensor,
    s,
    likelihood: str,
    sigma: float | torch.Tensor = 0.1,
    beta: float = 1.0,
    free_bits: float = 0.0,
    iwae: bool = False,
    log_px_z: torch.Tensor | None = None,
) -> ElboTerms:
    """The terms of a model.LatentSample (one sample [B], or K samples [K, B] for the IWAE
    objective). With the N(0, I) prior and one layer the KL is the closed form (elbo_terms,
    iwae_terms); otherwise it is the single-sample estimate log q(z|x) - log p(z), and
    kl_per_dim, a diagnostic, is the top posterior's per-dim KL against N(0, I). log_px_z: the
    IWAE objective's log p(x|z) [K, B] when the caller has it already (dreg_surrogate's)."""
    if s.log_q is None:
        if iwae:
            return iwae_terms(x, s.logits, s.z, s.mu, s.logvar, likelihood, sigma, log_px_z)
        return elbo_terms(x, s.logits, s.mu, s.logvar, likelihood, sigma, beta, free_bits)
    if log_px_z is None:
        log_px_z = -recon_nll(x, s.logits, likelihood, sigma)  # [..., B]
    kl_sample = s.log_q - s.log_p  # [..., B]
    recon, kl = -log_px_z.mean(), kl_sample.mean()
    kl_d = kl_per_dim(s.top_mu, s.top_logvar).reshape(-1, s.top_mu.shape[-1]).mean(0)
    loss = -iwae_bound(log_px_z - kl_sample).mean() if iwae else recon + beta * kl
    return ElboTerms(recon=recon, kl=kl, kl_per_dim=kl_d, elbo=-(recon + kl), loss=loss)


def dreg_surrogate(
    x: torch.Tensor, s, likelihood: str, sigma: float | torch.Tensor = 0.1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(surrogate loss, normalized weights w~ [K, B], log p(x|z) [K, B]) for the doubly
    reparameterized IWAE gradient (DReG, Tucker et al. 2019) of a one-layer model.LatentSample
    of K samples. log p(x|z) comes back so the step's logged terms reuse it (sample_terms).

    The IWAE gradient is sum_k w~_k grad log w_k. For the decoder and the prior (held at z)
    that is what -sum_k sg(w~_k) log w_k gives. For the encoder, log q is taken with its mean
    and variance stopped, so q reaches the loss only through z = mu + sigma eps, and that path
    is charged w~_k^2 instead of w~_k: the caller scales the gradient arriving at z by w~
    (`torch.Tensor.register_hook` on the z the decoder and prior read). The expectation is the
    IWAE gradient; its variance does not blow up with K as the standard estimator's does. With
    the VampPrior the encoder is part of p(z) too: that direct use keeps the weight w~."""
    log_px_z = -recon_nll(x, s.logits, likelihood, sigma)  # [K, B]
    log_w = _log_weights(log_px_z, s.z, s.mu.detach(), s.logvar.detach(), s.log_p)
    w = torch.softmax(log_w.detach(), dim=0)
    return -(w * log_w).sum(0).mean(), w, log_px_z


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
    sigma: float | torch.Tensor = 0.1,
) -> torch.Tensor:
    """log p(x|z) + log p(z) - log q(z|x) for z [K, B, D], logits [K, B, C, H, W]: [K, B]."""
    return _log_weights(-recon_nll(x, logits, likelihood, sigma), z, mu, logvar)


def _log_weights(log_px_z, z, mu, logvar, log_pz=None) -> torch.Tensor:
    """log p(x|z) + log p(z) - log N(z; mu, exp(logvar)); log_pz: a learned prior's log p(z),
    N(0, I)'s when None."""
    if log_pz is None:
        log_pz = log_normal_diag(z, torch.zeros_like(z), torch.zeros_like(z))
    return log_px_z + log_pz - log_normal_diag(z, mu, logvar)


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """The importance-weighted bound log (1/K) sum_k w_k per example: [B] from [K, B].

    The log-sum-exp is shifted by its max by hand: log weights are hundreds of nats below 0,
    and ONNX's ReduceLogSumExp (what torch.logsumexp exports to) sums exp() unshifted, which
    underflows to log(0) = -inf in the exported scorer."""
    top = log_w.max(dim=0).values.detach()  # [B]; a constant shift: no gradient through it
    return top + torch.log(torch.exp(log_w - top).sum(0)) - math.log(log_w.shape[0])
