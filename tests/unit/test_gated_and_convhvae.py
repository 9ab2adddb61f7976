"""Gated hidden layers (`model.activation` gated) and the convolutional two-layer model
(`model.arch` convhvae): what each layer computes, the log densities as written, any image
size, the bad combinations, and model files of the other archs unchanged by them."""

import pytest
import torch
from helpers import params_dict, vae_cfg
from torch.distributions import Independent, Normal

from vaepipe import config
from vaepipe.errors import ConfigError
from vaepipe.model import layers
from vaepipe.model.nets import REFINE_LAYERS
from vaepipe.model.vae import VAE


def _model(shape=(1, 8, 8), **kw) -> VAE:
    torch.manual_seed(0)
    base = {"latent_dim": 3, "hidden": [16], "z1_dim": 4, "channels": [4, 6]}
    return VAE(vae_cfg(image_shape=shape, **{**base, **kw})).eval()


def test_a_gated_layer_is_its_linear_half_times_the_sigmoid_of_the_other():
    torch.manual_seed(0)
    unit = layers.Gated(lambda: torch.nn.Linear(5, 3))
    x = torch.randn(4, 5)
    want = unit.h(x) * torch.sigmoid(unit.g(x))
    torch.testing.assert_close(unit(x), want)
    assert unit.h.weight.data_ptr() != unit.g.weight.data_ptr()  # two layers, not one shared


@pytest.mark.parametrize("arch", ["mlp", "conv", "hvae", "hvae_topdown", "convhvae"])
def test_gated_replaces_every_hidden_nonlinearity_of_every_arch(arch):
    vae = _model(arch=arch, activation="gated", prior="vamp", prior_components=3)
    kinds = {type(m) for m in vae.modules()}
    assert layers.Gated in kinds
    assert not kinds & {a for a in layers.ACTIVATIONS.values()}
    plain = _model(arch=arch, activation="relu", prior="vamp", prior_components=3)
    n_gated = sum(isinstance(m, layers.Gated) for m in vae.modules())
    n_relu = sum(isinstance(m, torch.nn.ReLU) for m in plain.modules())
    assert n_gated == n_relu  # each hidden layer of the plain model is one gated unit here


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 9, 7)])
def test_convhvae_maps_any_image_size_back_to_itself(shape):
    vae = _model(shape, arch="convhvae")
    x = torch.rand(2, *shape).bernoulli()
    with torch.no_grad():
        s = vae.sample(x, torch.randn(5, 2, vae.noise_dim))
        assert s.logits.shape == (5, 2, *shape)
        assert vae.decode(torch.randn(4, 3)).shape == (4, *shape)
    convs = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == REFINE_LAYERS + 1 and convs[-1].kernel_size == (1, 1)


def test_convhvae_log_densities_are_the_two_layers_as_written():
    """q(z2|x) q(z1|x, z2) from one convolutional trunk, p(z2) p(z1|z2) p(x|z1, z2)."""
    vae = _model(arch="convhvae")
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        s = vae.sample(x, eps)
        h = vae.encoder.net[:-1](x)  # the convolutions, flattened: [5, 6 * 2 * 2]
        assert h.shape == (5, 24) == (5, vae.encoder.n_features)
        mu2, logvar2 = vae.encoder(x)
        z2 = mu2 + torch.exp(0.5 * logvar2) * eps[..., 4:]
        mu1, logvar1 = vae.q_z1(torch.cat([h.expand(2, 5, 24), z2], -1)).chunk(2, -1)
        z1 = mu1 + torch.exp(0.5 * logvar1) * eps[..., :4]
        mp, lp = vae.down(z2).chunk(2, -1)

        def n(z, m, lv):
            return Independent(Normal(m, torch.exp(0.5 * lv)), 1).log_prob(z)

        torch.testing.assert_close(s.log_q, n(z1, mu1, logvar1) + n(z2, mu2, logvar2))
        torch.testing.assert_close(s.log_p, n(z1, mp, lp) + n(z2, 0.0, torch.zeros(3)))
        torch.testing.assert_close(s.logits, vae.decoder(torch.cat([z1, z2], -1)))
        z = torch.randn(6, 3)
        want = vae.decoder(torch.cat([vae.down(z).chunk(2, -1)[0], z], -1))
        torch.testing.assert_close(vae.decode(z), want)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"model": {"arch": "convhvae", "channels": []}},
            "'model.channels' must list at least one width for 'model.arch' = 'convhvae'",
        ),
        (
            {"model": {"arch": "convhvae", "conditional": True}},
            "'model.conditional' = true is not supported with 'model.arch' = 'convhvae'",
        ),
        (
            {
                "model": {"arch": "convhvae"},
                "train": {"objective": "iwae", "iwae_gradient": "dreg"},
            },
            "is for one stochastic layer, not 'model.arch' = 'convhvae'",
        ),
        ({"model": {"activation": "glu"}}, "choose one of: relu, silu, elu, tanh, gated"),
    ],
)
def test_bad_convhvae_and_gated_params_are_one_line(raw, message):
    with pytest.raises(ConfigError) as e:
        config.from_dict(params_dict(raw))
    assert message in str(e.value) and "\n" not in str(e.value)
