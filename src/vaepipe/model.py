"""The VAE: q(z|x) = N(mu, diag(exp(logvar))), z = mu + sigma * eps, p(x|z) from the decoder.

Only the model lives here; the loss is in elbo.py, the loop in train.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn


@dataclass
class VAEConfig:
    image_shape: tuple[int, int, int] = (1, 28, 28)  # (C, H, W)
    latent_dim: int = 32
    hidden: list[int] = field(default_factory=lambda: [512, 256])
    likelihood: str = "bernoulli"  # bernoulli | gaussian
    gaussian_sigma: float = 0.1  # fixed std of the Gaussian likelihood, in pixel units

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_shape"] = list(self.image_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        d = dict(d)
        d["image_shape"] = tuple(d["image_shape"])
        return cls(**d)


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        n_pixels = cfg.image_shape[0] * cfg.image_shape[1] * cfg.image_shape[2]
        self.net = _mlp([n_pixels, *cfg.hidden, 2 * cfg.latent_dim])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(x.flatten(1)).chunk(2, dim=1)  # [B, D] each
        return mu, logvar


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.image_shape = tuple(cfg.image_shape)
        n_pixels = cfg.image_shape[0] * cfg.image_shape[1] * cfg.image_shape[2]
        self.net = _mlp([cfg.latent_dim, *reversed(cfg.hidden), n_pixels])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits of the likelihood's mean, [..., C, H, W] for z [..., D]."""
        out = self.net(z)
        return out.reshape(*z.shape[:-1], *self.image_shape)


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

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

    @staticmethod
    def mean(logits: torch.Tensor) -> torch.Tensor:
        # Both likelihoods parameterise their mean through a sigmoid: Bernoulli probabilities,
        # Gaussian means kept inside the [0, 1] pixel range.
        return torch.sigmoid(logits)

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
