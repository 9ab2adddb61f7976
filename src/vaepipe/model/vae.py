"""The VAE: q(z|x) = N(mu, diag(exp(logvar))), z = mu + sigma * eps, p(x|z) from the decoder.

Five families, picked by `model.arch` (the image encoder and decoder of each: model/nets.py):
`mlp` (dense layers of widths `hidden`), `conv` (stride-2 convolutions of widths `channels`,
then dense layers `hidden`; the decoder mirrors it with transposed convolutions), `hvae`, the
two-stochastic-layer MLP of Burda et al. (2016): q(z1|x) q(z2|z1), p(z2) p(z1|z2) p(x|z1), z2
the top layer of `latent_dim` dims and z1 of `z1_dim`, and the two top-down models below. The
prior p(z) of the top layer is `model.prior`: N(0, I), a VampPrior (Tomczak & Welling 2018: a
mixture of the posteriors of K learned pseudo-inputs), a learned mixture of K Gaussians or the
Exemplar prior (Norouzi et al. 2020: a mixture over the training images; model/priors.py).
Only the model lives here; the loss is in model/objectives.py, the loop in training/loop.py.

`hvae_topdown` is the two-layer model of Tomczak & Welling (2018), the one their best results
came from: the same generative chain with skips, p(z2) p(z1|z2) p(x|z1, z2), and top-down
inference q(z2|x) q(z1|x, z2), so the image encoder is q(z2|x) itself (the VampPrior's
components, encoder.onnx) and the decoder sees both layers. `convhvae` is the same model with
convolutions: q(z2|x) and the features q(z1|x, z2) reads come from a convolutional encoder, and
the decoder ends in full-resolution convolutions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import nn

from vaepipe.config.schema import HIERARCHICAL_ARCHS as HIERARCHICAL
from vaepipe.model import likelihoods, priors
from vaepipe.model.gaussian import log_normal_diag, reparameterize
from vaepipe.model.layers import dense
from vaepipe.model.nets import TOPDOWN, Decoder, Encoder


@dataclass
class VAEConfig:
    """The architecture: the image shape the data gave, and the `model` section of the params
    (config.ModelConfig has the same fields, each documented in params.yaml)."""

    image_shape: tuple[int, int, int]  # (C, H, W)
    latent_dim: int
    hidden: list[int]  # dense widths of the encoder; the decoder mirrors them
    likelihood: str  # bernoulli | gaussian | continuous_bernoulli
    gaussian_sigma: float  # std of the Gaussian likelihood (its start when learned), pixels
    arch: str  # mlp | conv | hvae | hvae_topdown | convhvae
    channels: list[int]  # conv widths (arch conv, convhvae)
    learn_sigma: bool  # gaussian: one learned std per pixel instead of gaussian_sigma
    min_sigma: float  # gaussian with learn_sigma: the std never goes below this
    prior: str  # standard | vamp | mog | exemplar: p(z) of the top layer
    prior_components: int  # vamp: pseudo-inputs; mog: mixture components; exemplar: per step
    z1_dim: int  # arch hvae, hvae_topdown, convhvae: dims of the lower stochastic layer z1
    conditional: bool  # encoder and decoder also take the label y (one-hot)
    activation: str  # relu | silu | elu | tanh: every hidden layer's nonlinearity
    n_classes: int = 0  # labels of the data (conditional); 0 when unconditional
    n_exemplars: int = 0  # prior exemplar: the training images it is a mixture over; else 0

    @classmethod
    def from_params(cls, image_shape, model, n_classes: int = 0, n_train: int = 0) -> VAEConfig:
        """From the data's image shape (number of classes, of training images) and a
        config.ModelConfig (the same field names)."""
        n = n_classes if model.conditional else 0
        n_exemplars = n_train if model.prior == "exemplar" else 0
        return cls(
            image_shape=tuple(image_shape), **asdict(model), n_classes=n, n_exemplars=n_exemplars
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_shape"] = list(self.image_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        # model files written before the conv arch and the learned sigma existed are MLPs with
        # a fixed sigma: that is what their missing keys mean
        d = {**LEGACY_MODEL_KEYS, **d}
        d["image_shape"] = tuple(d["image_shape"])
        return cls(**d)


# The meaning of keys absent from the model files of format 1 written before they existed.
LEGACY_MODEL_KEYS = {
    "arch": "mlp",
    "channels": [],
    "learn_sigma": False,
    "min_sigma": 0.0,
    "prior": "standard",
    "prior_components": 1,
    "z1_dim": 0,
    "conditional": False,
    "n_classes": 0,
    "activation": "relu",
}


@dataclass
class LatentSample:
    """One pass through the model with given noise: what the ELBO and IWAE need. Leading dims
    [..., B] follow the noise ([B] or [K, B])."""

    logits: torch.Tensor  # [..., B, C, H, W] of p(x | z) (hvae: of p(x | z1))
    z: torch.Tensor  # [..., B, D] the top-layer sample
    mu: torch.Tensor  # [B, D1] the encoder's q (q(z|x); hvae: q(z1|x); hvae_topdown: q(z2|x))
    logvar: torch.Tensor  # [B, D1]
    log_q: torch.Tensor | None  # [..., B] log q(all latents | x); None: the closed form applies
    log_p: torch.Tensor | None  # [..., B] log p(all latents)
    top_mu: torch.Tensor  # [..., B, D] the top layer's posterior (= mu but for hvae: q(z2|z1))
    top_logvar: torch.Tensor

    @classmethod
    def one_layer(cls, logits, z, mu, logvar, *, log_q=None, log_p=None) -> LatentSample:
        """A sample whose top layer is the encoder's posterior (mlp, conv, hvae_topdown's
        z2); log_q and log_p None: the KL has its closed form (one layer, N(0, I) prior)."""
        return cls(logits, z, mu, logvar, log_q=log_q, log_p=log_p, top_mu=mu, top_logvar=logvar)

    def float(self) -> LatentSample:
        """Every tensor in float32 (what a bfloat16 autocast forward hands the loss)."""
        return replace(self, **{f.name: _float(getattr(self, f.name)) for f in fields(self)})


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        width = cfg.hidden[-1] if cfg.hidden else 0
        if cfg.arch == "hvae":  # q(z2|z1): one hidden layer of the last width
            self.up = dense([cfg.z1_dim, width, 2 * cfg.latent_dim], cfg.activation)
        if cfg.arch in HIERARCHICAL:  # p(z1|z2)
            self.down = dense([cfg.latent_dim, width, 2 * cfg.z1_dim], cfg.activation)
        if cfg.arch in TOPDOWN:  # q(z1|x, z2): the encoder's last hidden layer and z2
            n_feat = self.encoder.n_features
            self.q_z1 = dense([n_feat + cfg.latent_dim, width, 2 * cfg.z1_dim], cfg.activation)
        self.prior = priors.make_prior(cfg, self.encode)
        if cfg.likelihood == "gaussian" and cfg.learn_sigma:
            # sigma = min_sigma + softplus(raw), one per pixel, starting at gaussian_sigma
            start = max(cfg.gaussian_sigma - cfg.min_sigma, 1e-6)
            raw = math.log(math.expm1(start))
            self.raw_sigma = nn.Parameter(torch.full(cfg.image_shape, raw))

    @property
    def sigma(self) -> torch.Tensor | float:
        """Std of the Gaussian likelihood: a float, or [C, H, W] when learned."""
        if hasattr(self, "raw_sigma"):
            return self.cfg.min_sigma + nn.functional.softplus(self.raw_sigma)
        return self.cfg.gaussian_sigma

    @property
    def noise_dim(self) -> int:
        """Standard-normal draws one sample of all latents takes (two layers: z1's, then
        z2's)."""
        two = self.cfg.arch in HIERARCHICAL
        return self.cfg.latent_dim + (self.cfg.z1_dim if two else 0)

    @property
    def closed_form_kl(self) -> bool:
        """KL(q(z|x) || p(z)) in closed form: one layer and the N(0, I) prior."""
        return self.cfg.arch not in HIERARCHICAL and self.cfg.prior == "standard"

    @property
    def likelihood(self) -> likelihoods.Likelihood:
        """p(x|z): -log p(x|z) per example (`.nll(x, logits)`) and E[x|z] (`.mean(logits)`)."""
        gaussian = self.cfg.likelihood == "gaussian"
        return likelihoods.Likelihood(self.cfg.likelihood, self.sigma if gaussian else None)

    def onehot(self, y: torch.Tensor | None) -> torch.Tensor | None:
        """Labels [B] (ints) or one-hot [B, n_classes] as the one-hot a conditional model
        takes; None for an unconditional one (which takes no label)."""
        if not self.cfg.conditional:
            return None
        if y is None:
            raise ValueError("a conditional model needs the labels y")
        if y.dim() == 2:
            return y.float()
        return nn.functional.one_hot(y.long(), self.cfg.n_classes).float()

    def encode(self, x: torch.Tensor, y=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of the top layer's posterior; for hvae q(z2 | z1 = mu1(x)), through
        the mean of z1 (what encoder.onnx exports and the latent pictures use); for
        hvae_topdown q(z2|x) itself."""
        mu, logvar = self.encoder(x, self.onehot(y))
        if self.cfg.arch == "hvae":
            mu, logvar = self.up(mu).chunk(2, dim=-1)
        return mu, logvar

    @staticmethod
    def reparameterize(
        mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """z = mu + sigma * eps, eps drawn here when not given."""
        return reparameterize(mu, logvar, torch.randn_like(mu) if eps is None else eps)

    def decode(self, z: torch.Tensor, y=None) -> torch.Tensor:
        """Decoder logits of a top-layer z; `mean(decode(z))` is E[x|z] (for hvae E[x | z1],
        for hvae_topdown E[x | z1, z2], at z1 = the mean of p(z1|z2): what decoder.onnx
        exports)."""
        if self.cfg.arch == "hvae":
            z = self.down(z).chunk(2, dim=-1)[0]
        elif self.cfg.arch in TOPDOWN:
            z = torch.cat([self.down(z).chunk(2, dim=-1)[0], z], dim=-1)
        return self.decoder(z, self.onehot(y))

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        """E[x|z] under the likelihood (for continuous Bernoulli that is not sigmoid(logits))."""
        return likelihoods.mean(self.cfg.likelihood, logits)

    def sample(self, x: torch.Tensor, eps: torch.Tensor, y=None) -> LatentSample:
        """All latents of x drawn with the noise eps [B, E] or [K, B, E] (E = noise_dim); y:
        the labels of a conditional model."""
        y = self.onehot(y)
        if self.cfg.arch in TOPDOWN:
            return self._sample_topdown(x, eps, y)
        mu, logvar = self.encoder(x, y)  # [B, D1]
        if self.cfg.arch != "hvae":
            z = reparameterize(mu, logvar, eps)
            logits = self.decoder(z, y)
            if self.closed_form_kl:
                return LatentSample.one_layer(logits, z, mu, logvar)
            log_q, log_p = log_normal_diag(z, mu, logvar), self.prior.log_prob(z)
            return LatentSample.one_layer(logits, z, mu, logvar, log_q=log_q, log_p=log_p)
        d1 = self.cfg.z1_dim
        z1 = reparameterize(mu, logvar, eps[..., :d1])
        mu2, logvar2 = self.up(z1).chunk(2, dim=-1)
        z2 = reparameterize(mu2, logvar2, eps[..., d1:])
        mu1p, logvar1p = self.down(z2).chunk(2, dim=-1)
        return LatentSample(
            logits=self.decoder(z1, y),
            z=z2,
            mu=mu,
            logvar=logvar,
            log_q=log_normal_diag(z1, mu, logvar) + log_normal_diag(z2, mu2, logvar2),
            log_p=log_normal_diag(z1, mu1p, logvar1p) + self.prior.log_prob(z2),
            top_mu=mu2,
            top_logvar=logvar2,
        )

    def _sample_topdown(self, x: torch.Tensor, eps: torch.Tensor, y) -> LatentSample:
        """The top-down models: z2 ~ q(z2|x), then z1 ~ q(z1|x, z2); p(x|z1, z2) p(z1|z2)
        p(z2)."""
        d1 = self.cfg.z1_dim
        h = self.encoder.features(x, y)  # [B, W]
        mu2, logvar2 = self.encoder.head(h)  # [B, D]
        z2 = reparameterize(mu2, logvar2, eps[..., d1:])  # [..., B, D]
        hz = torch.cat([h.expand(*z2.shape[:-1], h.shape[-1]), z2], dim=-1)
        mu1, logvar1 = self.q_z1(hz).chunk(2, dim=-1)  # [..., B, D1]
        z1 = reparameterize(mu1, logvar1, eps[..., :d1])
        mu1p, logvar1p = self.down(z2).chunk(2, dim=-1)
        log_q = log_normal_diag(z1, mu1, logvar1) + log_normal_diag(z2, mu2, logvar2)
        log_p = log_normal_diag(z1, mu1p, logvar1p) + self.prior.log_prob(z2)
        logits = self.decoder(torch.cat([z1, z2], dim=-1), y)
        return LatentSample.one_layer(logits, z2, mu2, logvar2, log_q=log_q, log_p=log_p)

    def sample_prior(self, eps: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """A top-layer z from p(z) for noise eps [B, D] and uniforms u [B]."""
        return self.prior.sample(eps, u)

    def forward(self, x: torch.Tensor, y=None):
        mu, logvar = self.encode(x, y)
        z = self.reparameterize(mu, logvar)
        return self.decode(z, y), mu, logvar


class PriorSampler(nn.Module):
    """(eps [B, D], u [B]) -> z [B, D] from p(z): the graph exported as prior.onnx."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, eps: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.vae.sample_prior(eps, u)


class DecoderMean(nn.Module):
    """z -> x_mean, the graph exported as decoder.onnx."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.vae.mean(self.vae.decode(z, y))
