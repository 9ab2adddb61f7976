"""Priors p(z) of the top latent layer: N(0, I), the VampPrior, a learned mixture of Gaussians,
the Exemplar prior.

Each has log_prob(z) (nats, summed over the last dim, for z [..., D]) and sample(eps, u): a
draw from the prior as a deterministic function of standard-normal noise eps [B, D] and
uniforms u [B] (which component), so the exported prior.onnx has no random op and a caller
draws the noise. The VampPrior (Tomczak & Welling 2018) is the mixture (1/K) sum_k
q(z | u_k) of the encoder's posteriors at K learned pseudo-inputs u_k; the mixture of
Gaussians has learned means, variances and weights; the Exemplar prior (Norouzi et al. 2020)
is the mixture over the training images themselves. Each is what the ELBO's KL term is taken
against, as a single-sample estimate log q(z|x) - log p(z) (no closed form).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from vaepipe.model.gaussian import mixture_log_prob, reparameterize, standard_log_prob


def pick(u: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """The component index of each uniform u [B] in [0, 1) under weights exp(log_weights) [K]:
    a one-hot [B, K] (searchsorted on the cumulative weights, written with comparisons and no
    read of K, so it exports to ONNX as it runs)."""
    cdf = torch.cumsum(torch.softmax(log_weights, dim=0), dim=0)  # [K]
    # how many of the first K-1 components u is past: past the last one too is rounding
    # (cdf[-1] may be below 1), and u stays with the last
    index = (u[:, None] >= cdf[None, :-1]).to(cdf.dtype).sum(-1)  # [B], counted exactly
    ids = torch.cumsum(torch.ones_like(cdf), 0) - 1  # 0 .. K-1
    return (index[:, None] == ids[None, :]).to(u.dtype)


class StandardPrior(nn.Module):
    """N(0, I): no parameters (model files without a prior load unchanged)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return standard_log_prob(z)

    def sample(self, eps: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return eps + 0 * u[:, None]  # u unused, but an input of prior.onnx all the same


class MogPrior(nn.Module):
    """sum_k w_k N(mu_k, diag(var_k)), K components with learned means, log-variances and
    weights (softmax of logits). Starts as N(0, I) spread: means N(0, 1), unit variances."""

    def __init__(self, latent_dim: int, components: int):
        super().__init__()
        self.mu = nn.Parameter(torch.randn(components, latent_dim))
        self.logvar = nn.Parameter(torch.zeros(components, latent_dim))
        self.logits = nn.Parameter(torch.zeros(components))

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return mixture_log_prob(z, self.mu, self.logvar, torch.log_softmax(self.logits, 0))

    def sample(self, eps: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        onehot = pick(u, self.logits)  # [B, K]
        return reparameterize(onehot @ self.mu, onehot @ self.logvar, eps)


class VampPrior(nn.Module):
    """(1/K) sum_k q(z | u_k): the encoder's posteriors at K learned pseudo-inputs u_k, images
    kept in [0, 1] as the sigmoid of free parameters. `encode` is the model's encoder (x ->
    mu, logvar of the top layer); it is passed in, not owned, so its weights are not copied."""

    def __init__(self, latent_dim: int, components: int, image_shape, encode):
        super().__init__()
        # small noise around grey 0.5; training.loop starts them at training images
        self.raw = nn.Parameter(0.01 * torch.randn(components, *image_shape))
        self._encode = [encode]  # a list: not registered as a submodule (no double weights)
        self.register_buffer("log_w", torch.full((components,), -math.log(components)))
        self._held: tuple[torch.Tensor, torch.Tensor] | None = None  # see held()

    def init_from(self, images: torch.Tensor) -> None:
        """Start the pseudo-inputs at K training images (Tomczak & Welling's better start)."""
        with torch.no_grad():
            p = images[: len(self.raw)].clamp(0.05, 0.95)
            self.raw[: len(p)] = torch.log(p) - torch.log1p(-p)

    def components(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._held is not None:
            return self._held
        return self._encode[0](torch.sigmoid(self.raw))  # ([K, D], [K, D])

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Within it the components are encoded once, not at every call: for a model that does
        not change meanwhile (the IWAE estimate calls the prior for every chunk of samples)."""
        self._held = self.components()
        try:
            yield
        finally:
            self._held = None

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.components()
        return mixture_log_prob(z, mu, logvar, self.log_w)

    def sample(self, eps: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.components()
        onehot = pick(u, self.log_w)
        return reparameterize(onehot @ mu, onehot @ logvar, eps)


# Most [rows, N] entries one Exemplar-prior density block holds (float64: 64 MB): z beyond it
# is taken in row chunks, so scoring against 50,000 exemplars needs no more memory than that.
EXEMPLAR_BLOCK = 2**23


class ExemplarPrior(nn.Module):
    """(1/N) sum_n N(z; mu(x_n), s^2 I): the Exemplar VAE's prior (Norouzi et al. 2020), a
    mixture over the N training images x_n (the exemplars), each component a Gaussian at the
    encoder's mean of x_n with one learned variance s^2 that all share.

    A training step takes it over `per_step` exemplars drawn at random, encoded with the
    gradient, each example's own image left out of its mixture (leave-one-out: an example is
    never its own exemplar, else the prior would learn to copy the training set); see
    `drawn`. Everywhere else (validation, evaluation, prior.onnx, scorer.onnx) it is the
    mixture over all N at `means`, the exemplars' encodings, which the training loop refreshes
    after every epoch (`refresh`) and the model file carries. `encode` is the model's encoder,
    passed in, not owned."""

    def __init__(self, latent_dim: int, count: int, per_step: int, encode):
        super().__init__()
        if count < 1:  # a model file's n_exemplars, or the data's training images
            raise ValueError(f"the Exemplar prior needs training images, not {count}")
        self.log_var = nn.Parameter(torch.zeros(()))  # log s^2
        self.register_buffer("means", torch.zeros(count, latent_dim))
        self.count, self.per_step = count, per_step  # ints: a traced graph reads no len()
        self._encode = [encode]  # a list: not registered as a submodule (no double weights)
        self._images: torch.Tensor | None = None  # the exemplars, given by the training loop
        self._drawn: tuple[torch.Tensor, torch.Tensor] | None = None  # a step's (mu, log w)

    def use_exemplars(self, images: torch.Tensor) -> None:
        """The training images [N, C, H, W] as the exemplars (not saved: `means` is)."""
        if len(images) != self.count:
            raise ValueError(f"{len(images)} exemplar images for a prior of {self.count}")
        self._images = images

    @torch.no_grad()
    def refresh(self, batch: int = 1000) -> None:
        """`means` = the exemplars' encodings under the encoder's current weights."""
        for i in range(0, self.count, batch):
            self.means[i : i + batch] = self._encode[0](self._images[i : i + batch])[0]

    @contextlib.contextmanager
    def drawn(self, rows: torch.Tensor, generator: torch.Generator) -> Iterator[None]:
        """Within it the prior of the batch whose examples are exemplars `rows` [B] is the
        mixture over `per_step` exemplars drawn without replacement (all N when fewer), each
        row's own image masked out of its mixture and its weights renormalized over the rest:
        [B, M] log weights that broadcast over the samples' leading dims."""
        n = self.count
        idx = torch.randperm(n, generator=generator, device=generator.device)[: self.per_step]
        mu = self._encode[0](self._images[idx])[0]  # [M, D], with the gradient
        own = rows[:, None] == idx[None, :]  # [B, M]
        others = (len(idx) - own.sum(-1, keepdim=True)).clamp(min=1)  # [B, 1]
        log_w = torch.where(own, -math.inf, -torch.log(others.to(mu.dtype)))
        self._drawn = (mu, log_w)
        try:
            yield
        finally:
            self._drawn = None

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        if self._drawn is not None:
            mu, log_w = self._drawn
            return mixture_log_prob(z, mu, self.log_var.expand_as(mu), log_w)
        mu, n = self.means, self.count
        log_w = torch.full((n,), -math.log(n), dtype=mu.dtype, device=mu.device)
        logvar = self.log_var.expand_as(mu)
        if torch.jit.is_tracing():  # an exported graph takes z whole
            return mixture_log_prob(z, mu, logvar, log_w)
        flat = z.reshape(-1, z.shape[-1])
        rows = max(1, EXEMPLAR_BLOCK // n)
        if len(flat) <= rows:
            return mixture_log_prob(z, mu, logvar, log_w)
        parts = [mixture_log_prob(c, mu, logvar, log_w) for c in flat.split(rows)]
        return torch.cat(parts).reshape(z.shape[:-1])

    def sample(self, eps: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """A uniformly picked exemplar's component: floor(u N), then its mean + s eps."""
        index = (u * self.count).long().clamp(0, self.count - 1)
        return reparameterize(self.means[index], self.log_var.reshape(1), eps)


def make_prior(cfg, encode) -> nn.Module:
    """p(z) of the top layer for a VAEConfig; `encode`: the model's encoder (the VampPrior's
    components and the exemplars' are its posteriors)."""
    kind, latent_dim, components = cfg.prior, cfg.latent_dim, cfg.prior_components
    if kind == "exemplar":
        return ExemplarPrior(latent_dim, cfg.n_exemplars, components, encode)
    if kind == "vamp":
        return VampPrior(latent_dim, components, cfg.image_shape, encode)
    if kind == "mog":
        return MogPrior(latent_dim, components)
    return StandardPrior(latent_dim)
