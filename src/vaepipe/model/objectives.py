"""The VAE's objectives as pure functions that return each term (nats, per example unless
averaged): the (beta-)ELBO, the IWAE bound (Burda et al. 2016) and the DReG surrogate of its
gradient (Tucker et al. 2019).

recon = -log p(x|z) summed over pixels; kl = KL(q(z|x) || p(z)), in closed form for one layer
and the N(0, I) prior; elbo = -(recon + kl); loss = recon + beta * kl, or minus the IWAE bound.
Batch figures are means over the batch. Note the seed tutorial's two traps: its section 4 drops
the KL's minus sign, and its `F.mse_loss` averages over pixels (weighting the KL ~784x too
much). Neither is copied here.

Each function takes a model.vae.LatentSample (one pass of the model with given noise) and the
model's Likelihood.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vaepipe.model.gaussian import kl_per_dim, log_normal_diag, standard_log_prob
from vaepipe.model.likelihoods import Likelihood
from vaepipe.model.vae import LatentSample


@dataclass
class ElboTerms:
    recon: torch.Tensor  # scalar, mean over the batch of -log p(x|z)
    kl: torch.Tensor  # scalar, mean over the batch of KL(q || p)
    kl_per_dim: torch.Tensor  # [D], mean over the batch
    elbo: torch.Tensor  # scalar, -(recon + kl)
    loss: torch.Tensor  # scalar, what is minimised (recon + beta * kl for the ELBO objective)


def elbo_terms(
    x: torch.Tensor, s: LatentSample, lik: Likelihood, *, beta: float, free_bits: float
) -> ElboTerms:
    """ELBO terms of one sample per example, KL in closed form. free_bits > 0: the loss charges
    each latent dim max(free_bits, its batch-mean KL) (Kingma et al. 2016), so a dim may carry
    that many nats for free; the reported kl and elbo stay the true ones."""
    recon = lik.nll(x, s.logits).mean()
    kl_d = kl_per_dim(s.mu, s.logvar).mean(0)
    kl = kl_d.sum()
    charged = kl_d.clamp_min(free_bits).sum() if free_bits > 0 else kl
    return ElboTerms(
        recon=recon, kl=kl, kl_per_dim=kl_d, elbo=-(recon + kl), loss=recon + beta * charged
    )


def iwae_terms(
    x: torch.Tensor, s: LatentSample, lik: Likelihood, log_px_z: torch.Tensor | None = None
) -> ElboTerms:
    """The IWAE objective from K samples per example (s.z [K, B, D]), KL in closed form: loss is
    minus the batch mean of log (1/K) sum_k w_k; recon and elbo are the K-sample averages of the
    single-sample terms (unbiased ELBO estimates). log_px_z: log p(x|z) [K, B] when the caller
    has it already."""
    if log_px_z is None:
        log_px_z = -lik.nll(x, s.logits)  # [K, B]
    log_w = log_weights_of(log_px_z, s.z, s.mu, s.logvar)
    recon = -log_px_z.mean()
    kl_d = kl_per_dim(s.mu, s.logvar).mean(0)
    kl = kl_d.sum()
    return ElboTerms(
        recon=recon, kl=kl, kl_per_dim=kl_d, elbo=-(recon + kl), loss=-iwae_bound(log_w).mean()
    )


def sample_terms(
    x: torch.Tensor,
    s: LatentSample,
    lik: Likelihood,
    *,
    beta: float,
    free_bits: float,
    iwae: bool,
    log_px_z: torch.Tensor | None = None,
) -> ElboTerms:
    """The terms of a LatentSample (one sample [B], or K samples [K, B] for the IWAE objective).
    With the N(0, I) prior and one layer the KL is the closed form (elbo_terms, iwae_terms);
    otherwise it is the single-sample estimate log q(z|x) - log p(z), and kl_per_dim, a
    diagnostic, is the top posterior's per-dim KL against N(0, I). log_px_z: the IWAE
    objective's log p(x|z) [K, B] when the caller has it already (dreg_surrogate's)."""
    if s.log_q is None:
        if iwae:
            return iwae_terms(x, s, lik, log_px_z)
        return elbo_terms(x, s, lik, beta=beta, free_bits=free_bits)
    if log_px_z is None:
        log_px_z = -lik.nll(x, s.logits)  # [..., B]
    kl_sample = s.log_q - s.log_p  # [..., B]
    recon, kl = -log_px_z.mean(), kl_sample.mean()
    kl_d = kl_per_dim(s.top_mu, s.top_logvar).reshape(-1, s.top_mu.shape[-1]).mean(0)
    loss = -iwae_bound(log_px_z - kl_sample).mean() if iwae else recon + beta * kl
    return ElboTerms(recon=recon, kl=kl, kl_per_dim=kl_d, elbo=-(recon + kl), loss=loss)


def elbo_of(x: torch.Tensor, s: LatentSample, lik: Likelihood) -> ElboTerms:
    """The ELBO's own terms (beta 1, no free bits): what evaluation reports."""
    return sample_terms(x, s, lik, beta=1.0, free_bits=0.0, iwae=False)


def dreg_surrogate(
    x: torch.Tensor, s: LatentSample, lik: Likelihood
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(surrogate loss, normalized weights w~ [K, B], log p(x|z) [K, B]) for the doubly
    reparameterized IWAE gradient (DReG, Tucker et al. 2019) of a one-layer LatentSample of K
    samples. log p(x|z) comes back so the step's logged terms reuse it (sample_terms).

    The IWAE gradient is sum_k w~_k grad log w_k. For the decoder and the prior (held at z)
    that is what -sum_k sg(w~_k) log w_k gives. For the encoder, log q is taken with its mean
    and variance stopped, so q reaches the loss only through z = mu + sigma eps, and that path
    is charged w~_k^2 instead of w~_k: the caller scales the gradient arriving at z by w~
    (`torch.Tensor.register_hook` on the z the decoder and prior read). The expectation is the
    IWAE gradient; its variance does not blow up with K as the standard estimator's does. With
    the VampPrior the encoder is part of p(z) too: that direct use keeps the weight w~."""
    log_px_z = -lik.nll(x, s.logits)  # [K, B]
    log_w = log_weights_of(log_px_z, s.z, s.mu.detach(), s.logvar.detach(), s.log_p)
    w = torch.softmax(log_w.detach(), dim=0)
    return -(w * log_w).sum(0).mean(), w, log_px_z


def log_weights(x: torch.Tensor, s: LatentSample, lik: Likelihood) -> torch.Tensor:
    """The importance weights log p(x|z) + log p(z) - log q(z|x) of every sample of `s` (K
    samples [K, B]; both layers of a two-layer model): [K, B]."""
    log_px_z = -lik.nll(x, s.logits)
    if s.log_q is None:  # one layer, N(0, I) prior
        return log_weights_of(log_px_z, s.z, s.mu, s.logvar)
    return log_px_z + s.log_p - s.log_q


def log_weights_of(log_px_z, z, mu, logvar, log_pz=None) -> torch.Tensor:
    """log p(x|z) + log p(z) - log N(z; mu, exp(logvar)) of a one-layer model; log_pz: a
    learned prior's log p(z), N(0, I)'s when None."""
    if log_pz is None:
        log_pz = standard_log_prob(z)
    return log_px_z + log_pz - log_normal_diag(z, mu, logvar)


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """The importance-weighted bound log (1/K) sum_k w_k per example: [B] from [K, B].

    The log-sum-exp is shifted by its max by hand: log weights are hundreds of nats below 0,
    and ONNX's ReduceLogSumExp (what torch.logsumexp exports to) sums exp() unshifted, which
    underflows to log(0) = -inf in the exported scorer."""
    top = log_w.max(dim=0).values.detach()  # [B]; a constant shift: no gradient through it
    return top + torch.log(torch.exp(log_w - top).mean(0))
