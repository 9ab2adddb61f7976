"""The image encoder x -> (mu, logvar) and the image decoder z -> logits of each family.

mlp: dense layers of widths `hidden`. conv: stride-2 3x3 convolutions of widths `channels`,
each halving H and W, then dense layers `hidden`; the decoder mirrors it with transposed
convolutions. hvae, hvae_topdown: dense, as mlp (vae.py adds the layers between z1 and z2).
convhvae, the convolutional two-layer model of Tomczak & Welling (2018): per width of
`channels` a 3x3 convolution and a stride-2 3x3 one, flattened into q(z2|x)'s linear head;
the decoder maps [z1, z2] through dense layers `hidden` to a full-size image of features
that REFINE_LAYERS 3x3 convolutions of channels[-1] channels and a 1x1 one turn into logits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from vaepipe.model.layers import conv, conv_sizes, dense, hidden

if TYPE_CHECKING:
    from vaepipe.model.vae import VAEConfig

TOPDOWN = ("hvae_topdown", "convhvae")  # q(z2|x) q(z1|x, z2); the decoder reads z1 and z2
CONV_INPUT = ("conv", "convhvae")  # the encoder keeps the image's [C, H, W] shape
REFINE_LAYERS = 4  # convhvae: full-resolution convolutions of the decoder


def encoder_latent(cfg: VAEConfig) -> int:
    """Dims of the layer the image encoder outputs: z1 for hvae (bottom-up), z otherwise."""
    return cfg.z1_dim if cfg.arch == "hvae" else cfg.latent_dim


def decoder_latent(cfg: VAEConfig) -> int:
    """Dims the image decoder reads: z1 for hvae, z1 and z2 for the top-down models, z
    otherwise."""
    if cfg.arch in TOPDOWN:
        return cfg.z1_dim + cfg.latent_dim
    return encoder_latent(cfg)


def _conv_trunk(cfg: VAEConfig) -> tuple[list[nn.Module], int]:
    """The convolutions of a conv or convhvae encoder and the size of their flattened
    output."""
    c, h, w = cfg.image_shape
    act, layers = cfg.activation, []
    for a, b in zip([c, *cfg.channels[:-1]], cfg.channels, strict=True):
        if cfg.arch == "convhvae":
            layers += conv(a, b, act)
            a = b
        layers += conv(a, b, act, stride=2)
    fh, fw = conv_sizes(h, w, len(cfg.channels))[-1]
    return [*layers, nn.Flatten()], cfg.channels[-1] * fh * fw


class Encoder(nn.Module):
    """x -> (mu, logvar) of q(z|x); for hvae of q(z1|x), for the top-down models of q(z2|x)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        c, h, w = cfg.image_shape
        act = cfg.activation
        out = 2 * encoder_latent(cfg)
        if cfg.arch == "conv":  # the dense layers one block after the convolutions
            trunk, n_feat = _conv_trunk(cfg)
            self.net = nn.Sequential(*trunk, dense([n_feat, *cfg.hidden, out], act))
        elif cfg.arch == "convhvae":  # the convolutions, then the linear head
            trunk, n_feat = _conv_trunk(cfg)
            self.net = nn.Sequential(*trunk, nn.Linear(n_feat, out))
            self.n_features = n_feat
        else:
            self.net = dense([c * h * w + cfg.n_classes, *cfg.hidden, out], act)
            self.n_features = cfg.hidden[-1] if cfg.hidden else 0
        self.flat = cfg.arch not in CONV_INPUT

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
        """The last hidden layer [B, n_features] (what q(z1|x, z2) of the top-down models
        reads); `head(features(x))` is `forward(x)`."""
        return self.net[:-1](self._input(x, y))

    def head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) from the last hidden layer."""
        mu, logvar = self.net[-1](h).chunk(2, dim=-1)
        return mu, logvar


class Decoder(nn.Module):
    """z -> logits of p(x|z); for hvae z1 -> logits of p(x|z1); for the top-down models
    [z1, z2] -> logits of p(x|z1, z2)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.image_shape = tuple(cfg.image_shape)
        c, h, w = cfg.image_shape
        act = cfg.activation
        first = decoder_latent(cfg) + cfg.n_classes
        if cfg.arch == "conv":
            self.net = _transposed(cfg)
        elif cfg.arch == "convhvae":
            width = cfg.channels[-1]
            layers = [dense([first, *reversed(cfg.hidden), c * h * w], act, True)]
            layers += [nn.Unflatten(1, (c, h, w)), *conv(c, width, act)]
            for _ in range(REFINE_LAYERS - 1):
                layers += conv(width, width, act)
            self.net = nn.Sequential(*layers, nn.Conv2d(width, c, 1))
        else:
            self.net = dense([first, *reversed(cfg.hidden), c * h * w], act)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (natural parameters) of the likelihood, [..., C, H, W] for z [..., D] (and
        one-hot labels y [B, n_classes] of a conditional model, broadcast over z's leading
        sample dims)."""
        if y is not None:
            z = torch.cat([z, y.expand(*z.shape[:-1], y.shape[-1])], dim=-1)
        out = self.net(z.reshape(-1, z.shape[-1]))
        return out.reshape(*z.shape[:-1], *self.image_shape)


def _transposed(cfg: VAEConfig) -> nn.Sequential:
    """The conv decoder: dense layers to the smallest feature map, then transposed stride-2
    convolutions back to exactly the encoder's size at each level."""
    c, h, w = cfg.image_shape
    act = cfg.activation
    sizes = conv_sizes(h, w, len(cfg.channels))
    fh, fw = sizes[-1]
    chans = list(reversed(cfg.channels))
    layers: list[nn.Module] = [
        dense([cfg.latent_dim, *reversed(cfg.hidden), chans[0] * fh * fw], act, True),
        nn.Unflatten(1, (chans[0], fh, fw)),
    ]
    outs = [*chans[1:], c]
    for i, (a, b) in enumerate(zip(chans, outs, strict=True)):
        # output (2 s_in - 1 + pad): back to exactly the encoder's size at that level
        (th, tw), (sh, sw) = sizes[-2 - i], sizes[-1 - i]
        pad = (th - 2 * sh + 1, tw - 2 * sw + 1)

        def make(a=a, b=b, pad=pad):
            return nn.ConvTranspose2d(a, b, 3, stride=2, padding=1, output_padding=pad)

        layers += hidden(make, act) if i < len(chans) - 1 else [make()]
    return nn.Sequential(*layers)
