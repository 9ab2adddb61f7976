"""The VAE: q(z|x) = N(mu, diag(exp(logvar))), z = mu + sigma * eps, p(x|z) from the decoder.

Two families, picked by `model.arch`: `mlp` (dense layers of widths `hidden`) and `conv`
(stride-2 convolutions of widths `channels`, each halving H and W, then dense layers `hidden`;
the decoder mirrors it with transposed convolutions). Only the model lives here; the loss is in
elbo.py, the loop in train.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from vaepipe import elbo


@dataclass
class VAEConfig:
    """The architecture: the image shape the data gave, and the `model` section of the params
    (config.ModelConfig has the same fields, each documented in params.yaml)."""

    image_shape: tuple[int, int, int]  # (C, H, W)
    latent_dim: int
    hidden: list[int]  # dense widths of the encoder; the decoder mirrors them
    likelihood: str  # bernoulli | gaussian | continuous_bernoulli
    gaussian_sigma: float  # std of the Gaussian likelihood (its start when learned), pixels
    arch: str  # mlp | conv
    channels: list[int]  # conv widths (arch conv)
    learn_sigma: bool  # gaussian: one learned std per pixel instead of gaussian_sigma
    min_sigma: float  # gaussian with learn_sigma: the std never goes below this

    @classmethod
    def from_params(cls, image_shape, model) -> VAEConfig:
        """From the data's image shape and a config.ModelConfig (same field names)."""
        return cls(image_shape=tuple(image_shape), **asdict(model))

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
LEGACY_MODEL_KEYS = {"arch": "mlp", "channels": [], "learn_sigma": False, "min_sigma": 0.0}


def _mlp(sizes: list[int], last_act: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if last_act or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def conv_sizes(h: int, w: int, n: int) -> list[tuple[int, int]]:
    """Spatial sizes after each of n stride-2 convolutions (kernel 3, padding 1): ceil(s / 2)."""
    sizes = [(h, w)]
    for _ in range(n):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        sizes.append((h, w))
    return sizes


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        c, h, w = cfg.image_shape
        if cfg.arch == "conv":
            layers: list[nn.Module] = []
            for a, b in zip([c, *cfg.channels[:-1]], cfg.channels, strict=True):
                layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.ReLU()]
            fh, fw = conv_sizes(h, w, len(cfg.channels))[-1]
            n_feat = cfg.channels[-1] * fh * fw
            layers += [nn.Flatten(), _mlp([n_feat, *cfg.hidden, 2 * cfg.latent_dim])]
            self.net = nn.Sequential(*layers)
        else:
            self.net = _mlp([c * h * w, *cfg.hidden, 2 * cfg.latent_dim])
        self.flat = cfg.arch != "conv"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(x.flatten(1) if self.flat else x).chunk(2, dim=1)  # [B, D] each
        return mu, logvar


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.image_shape = tuple(cfg.image_shape)
        c, h, w = cfg.image_shape
        if cfg.arch == "conv":
            sizes = conv_sizes(h, w, len(cfg.channels))
            fh, fw = sizes[-1]
            chans = list(reversed(cfg.channels))
            layers: list[nn.Module] = [
                _mlp([cfg.latent_dim, *reversed(cfg.hidden), chans[0] * fh * fw], last_act=True),
                nn.Unflatten(1, (chans[0], fh, fw)),
            ]
            outs = [*chans[1:], c]
            for i, (a, b) in enumerate(zip(chans, outs, strict=True)):
                # output (2 s_in - 1 + pad): back to exactly the encoder's size at that level
                (th, tw), (sh, sw) = sizes[-2 - i], sizes[-1 - i]
                pad = (th - 2 * sh + 1, tw - 2 * sw + 1)
                layers.append(nn.ConvTranspose2d(a, b, 3, stride=2, padding=1, output_padding=pad))
                if i < len(chans) - 1:
                    layers.append(nn.ReLU())
            self.net = nn.Sequential(*layers)
        else:
            self.net = _mlp([cfg.latent_dim, *reversed(cfg.hidden), c * h * w])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits (natural parameters) of the likelihood, [..., C, H, W] for z [..., D]."""
        out = self.net(z.reshape(-1, z.shape[-1]))
        return out.reshape(*z.shape[:-1], *self.image_shape)


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
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

    def recon_nll(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """-log p(x|z) per example in nats, summed over pixels."""
        return elbo.recon_nll(x, logits, self.cfg.likelihood, self.sigma)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)

    @staticmethod
    def reparameterize(
        mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None
    ) -> torch.Tensor:
        std = torch.exp(0.5 * logvar)
        if eps is None:
            eps = torch.randn_like(std)
        return mu + std * eps

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder logits; `mean(decode(z))` is E[x|z]."""
        return self.decoder(z)

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        """E[x|z] under the likelihood (for continuous Bernoulli that is not sigmoid(logits))."""
        return elbo.likelihood_mean(logits, self.cfg.likelihood)

    def forward(self, x: torch.Tensor):
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


class DecoderMean(nn.Module):
    """z -> x_mean, the graph exported as decoder.onnx."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.mean(self.vae.decode(z))
