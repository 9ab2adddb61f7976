"""The VAE: q(z|x) = N(mu, diag(exp(logvar))), z = mu + sigma * eps, p(x|z) from the decoder.

Four families, picked by `model.arch`: `mlp` (dense layers of widths `hidden`), `conv`
(stride-2 convolutions of widths `channels`, each halving H and W, then dense layers `hidden`;
the decoder mirrors it with transposed convolutions), `hvae`, the two-stochastic-layer MLP
of Burda et al. (2016): q(z1|x) q(z2|z1), p(z2) p(z1|z2) p(x|z1), z2 the top layer of
`latent_dim` dims and z1 of `z1_dim`, and `hvae_topdown` (below). The prior p(z) of the top
layer is `model.prior`: N(0, I), a VampPrior (Tomczak & Welling 2018: a mixture of the
posteriors of K learned pseudo-inputs) or a learned mixture of K Gaussians (vaepipe.priors).
Only the model lives here; the loss is in model/objectives.py, the loop in training/loop.py.

`hvae_topdown` is the two-layer model of Tomczak & Welling (2018), the one their best results
came from: the same generative chain with skips, p(z2) p(z1|z2) p(x|z1, z2), and top-down
inference q(z2|x) q(z1|x, z2), so the image encoder is q(z2|x) itself (the VampPrior's
components, encoder.onnx) and the decoder sees both layers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import nn

from vaepipe.config.schema import HIERARCHICAL_ARCHS as HIERARCHICAL
from vaepipe.model import likelihoods, priors
from vaepipe.model.gaussian import log_normal_diag, reparameterize


@dataclass
class VAEConfig:
    """The architecture: the image shape the data gave, and the `model` section of the params
    (config.ModelConfig has the same fields, each documented in params.yaml)."""

    image_shape: tuple[int, int, int]  # (C, H, W)
    latent_dim: int
    hidden: list[int]  # dense widths of the encoder; the decoder mirrors them
    likelihood: str  # bernoulli | gaussian | continuous_bernoulli
    gaussian_sigma: float  # std of the Gaussian likelihood (its start when learned), pixels
    arch: str  # mlp | conv | hvae | hvae_topdown
    channels: list[int]  # conv widths (arch conv)
    learn_sigma: bool  # gaussian: one learned std per pixel instead of gaussian_sigma
    min_sigma: float  # gaussian with learn_sigma: the std never goes below this
    prior: str  # standard | vamp | mog: p(z) of the top layer
    prior_components: int  # vamp: pseudo-inputs; mog: mixture components
    z1_dim: int  # arch hvae, hvae_topdown: dims of the lower stochastic layer z1
    conditional: bool  # encoder and decoder also take the label y (one-hot)
    activation: str  # relu | silu | elu | tanh: every hidden layer's nonlinearity
    n_classes: int = 0  # labels of the data (conditional); 0 when unconditional

    @classmethod
    def from_params(cls, image_shape, model, n_classes: int = 0) -> VAEConfig:
        """From the data's image shape (and number of classes) and a config.ModelConfig (the
        same field names)."""
        n = n_classes if model.conditional else 0
        return cls(image_shape=tuple(image_shape), **asdict(model), n_classes=n)

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


# model.activation: the nonlinearity of every hidden layer (dense and convolutional)
ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "elu": nn.ELU, "tanh": nn.Tanh}


def _mlp(sizes: list[int], act: str, last_act: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if last_act or i < len(sizes) - 2:
            layers.append(ACTIVATIONS[act]())
    return nn.Sequential(*layers)


def conv_sizes(h: int, w: int, n: int) -> list[tuple[int, int]]:
    """Spatial sizes after each of n stride-2 convolutions (kernel 3, padding 1): ceil(s / 2)."""
    sizes = [(h, w)]
    for _ in range(n):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        sizes.append((h, w))
    return sizes


def _encoder_latent(cfg: VAEConfig) -> int:
    """Dims of the layer the image encoder outputs: z1 for hvae (bottom-up), z otherwise."""
    return cfg.z1_dim if cfg.arch == "hvae" else cfg.latent_dim


def _decoder_latent(cfg: VAEConfig) -> int:
    """Dims the image decoder reads: z1 for hvae, z1 and z2 for hvae_topdown, z otherwise."""
    if cfg.arch == "hvae_topdown":
        return cfg.z1_dim + cfg.latent_dim
    return _encoder_latent(cfg)


class Encoder(nn.Module):
    """x -> (mu, logvar) of q(z|x); for hvae of q(z1|x), for hvae_topdown of q(z2|x)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        c, h, w = cfg.image_shape
        act = cfg.activation
        out = 2 * _encoder_latent(cfg)
        if cfg.arch == "conv":
            layers: list[nn.Module] = []
            for a, b in zip([c, *cfg.channels[:-1]], cfg.channels, strict=True):
                layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), ACTIVATIONS[act]()]
            fh, fw = conv_sizes(h, w, len(cfg.channels))[-1]
            n_feat = cfg.channels[-1] * fh * fw
            layers += [nn.Flatten(), _mlp([n_feat, *cfg.hidden, out], act)]
            self.net = nn.Sequential(*layers)
        else:
            self.net = _mlp([c * h * w + cfg.n_classes, *cfg.hidden, out], act)
        self.flat = cfg.arch != "conv"

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """y: one-hot labels [B, n_classes] of a conditional model, concatenated to x."""
        mu, logvar = self.net(self._input(x, y)).chunk(2, dim=1)  # [B, D] each
        return mu, logvar

    def _input(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        h = x.flatten(1) if self.flat else x
        return h if y is None else torch.cat([h, y], dim=1)

    def features(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The last hidden layer [B, hidden[-1]] of a dense encoder (what q(z1|x, z2) of
        hvae_topdown reads); `head(features(x))` is `forward(x)`."""
        return self.net[:-1](self._input(x, y))

    def head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) from the last hidden layer of a dense encoder."""
        mu, logvar = self.net[-1](h).chunk(2, dim=-1)
        return mu, logvar


class Decoder(nn.Module):
    """z -> logits of p(x|z); for hvae z1 -> logits of p(x|z1); for hvae_topdown [z1, z2]
    -> logits of p(x|z1, z2)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.image_shape = tuple(cfg.image_shape)
        c, h, w = cfg.image_shape
        act = cfg.activation
        first = _decoder_latent(cfg)
        if cfg.arch == "conv":
            sizes = conv_sizes(h, w, len(cfg.channels))
            fh, fw = sizes[-1]
            chans = list(reversed(cfg.channels))
            layers: list[nn.Module] = [
                _mlp([cfg.latent_dim, *reversed(cfg.hidden), chans[0] * fh * fw], act, True),
                nn.Unflatten(1, (chans[0], fh, fw)),
            ]
            outs = [*chans[1:], c]
            for i, (a, b) in enumerate(zip(chans, outs, strict=True)):
                # output (2 s_in - 1 + pad): back to exactly the encoder's size at that level
                (th, tw), (sh, sw) = sizes[-2 - i], sizes[-1 - i]
                pad = (th - 2 * sh + 1, tw - 2 * sw + 1)
                layers.append(nn.ConvTranspose2d(a, b, 3, stride=2, padding=1, output_padding=pad))
                if i < len(chans) - 1:
                    layers.append(ACTIVATIONS[act]())
            self.net = nn.Sequential(*layers)
        else:
            self.net = _mlp([first + cfg.n_classes, *reversed(cfg.hidden), c * h * w], act)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (natural parameters) of the likelihood, [..., C, H, W] for z [..., D] (and
        one-hot labels y [B, n_classes] of a conditional model, broadcast over z's leading
        sample dims)."""
        if y is not None:
            z = torch.cat([z, y.expand(*z.shape[:-1], y.shape[-1])], dim=-1)
        out = self.net(z.reshape(-1, z.shape[-1]))
        return out.reshape(*z.shape[:-1], *self.image_shape)


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
            self.up = _mlp([cfg.z1_dim, width, 2 * cfg.latent_dim], cfg.activation)
        if cfg.arch in HIERARCHICAL:  # p(z1|z2)
            self.down = _mlp([cfg.latent_dim, width, 2 * cfg.z1_dim], cfg.activation)
        if cfg.arch == "hvae_topdown":  # q(z1|x, z2): the encoder's last hidden layer and z2
            self.q_z1 = _mlp([width + cfg.latent_dim, width, 2 * cfg.z1_dim], cfg.activation)
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
        elif self.cfg.arch == "hvae_topdown":
            z = torch.cat([self.down(z).chunk(2, dim=-1)[0], z], dim=-1)
        return self.decoder(z, self.onehot(y))

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        """E[x|z] under the likelihood (for continuous Bernoulli that is not sigmoid(logits))."""
        return likelihoods.mean(self.cfg.likelihood, logits)

    def sample(self, x: torch.Tensor, eps: torch.Tensor, y=None) -> LatentSample:
        """All latents of x drawn with the noise eps [B, E] or [K, B, E] (E = noise_dim); y:
        the labels of a conditional model."""
        y = self.onehot(y)
        if self.cfg.arch == "hvae_topdown":
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
        """hvae_topdown: z2 ~ q(z2|x), then z1 ~ q(z1|x, z2); p(x|z1, z2) p(z1|z2) p(z2)."""
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
