"""Likelihood, reconstruction and posterior-collapse metrics against hand-built cases."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import vae_cfg

from vaepipe.evaluation import collapse, likelihood
from vaepipe.model.vae import VAE


def binary_images(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, 8, 8), generator=gen).bernoulli(generator=gen)


def mean_iwae(vae: VAE, x: torch.Tensor, k: int, seeds=range(3)) -> float:
    return sum(likelihood.iwae_log_likelihood(vae, x, k, seed=s).mean().item() for s in seeds) / 3


def test_iwae_matches_a_bare_loop_with_the_same_noise(tiny_vae):
    x, k, seed = binary_images(20), 7, 3
    ours = likelihood.iwae_log_likelihood(tiny_vae, x, k, seed=seed)  # one chunk: 7 x 20 rows
    with torch.no_grad():
        mu, logvar = tiny_vae.encode(x)  # [B, D]
        eps = torch.randn((k, *mu.shape), generator=torch.Generator().manual_seed(seed))
        z = mu + (0.5 * logvar).exp() * eps  # [K, B, D]
        logits = tiny_vae.decode(z).flatten(2)  # [K, B, P]
        target = x.flatten(1).expand_as(logits)
        log_px_z = -F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1)
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_qz = torch.distributions.Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(-1)
        expected = torch.logsumexp(log_px_z + log_pz - log_qz, 0) - math.log(k)
    assert torch.allclose(ours, expected, atol=1e-4)


def test_iwae_is_at_least_the_elbo_and_grows_with_k(tiny_vae):
    with torch.no_grad():
        tiny_vae.decoder.net[0].weight.mul_(3.0)  # z matters more: a clear ELBO-IWAE gap
    x = binary_images(300)
    elbo = (
        sum(
            likelihood.evaluate_elbo(tiny_vae, x, batch_size=100, seed=s)[0]["elbo"]
            for s in range(3)
        )
        / 3
    )
    bounds = [mean_iwae(tiny_vae, x, k) for k in (1, 4, 16, 64)]
    # k = 1 is the ELBO itself, up to Monte Carlo noise; more samples tighten the bound.
    assert bounds[0] == pytest.approx(elbo, abs=0.5)
    assert all(a < b for a, b in zip(bounds, bounds[1:], strict=False)), bounds
    assert bounds[-1] > elbo + 1.0


def test_iwae_is_chunking_invariant_in_distribution(tiny_vae):
    x = binary_images(64)
    one = likelihood.iwae_log_likelihood(tiny_vae, x, 32, seed=0)
    many = likelihood.iwae_log_likelihood(tiny_vae, x, 32, seed=0, rows_per_chunk=32 * 5)
    assert one.shape == many.shape == (64,) and torch.isfinite(many).all()
    assert one.mean().item() == pytest.approx(many.mean().item(), abs=0.5)


def vae_with_dead_dims(dead: list[int], latent_dim: int = 4) -> VAE:
    """An encoder whose mu ignores x in the `dead` dims (zero weights and bias there)."""
    torch.manual_seed(0)
    vae = VAE(vae_cfg(image_shape=(1, 8, 8), latent_dim=latent_dim, hidden=[16])).eval()
    last = vae.encoder.net[-1]  # outputs [mu, logvar]: rows 0..D-1 are mu
    with torch.no_grad():
        last.weight[:latent_dim] *= 10.0  # live dims move clearly with x
        last.weight[dead] = 0.0
        last.bias[dead] = 0.0
    return vae


def test_active_units_count_the_dims_a_model_leaves_dead():
    vae = vae_with_dead_dims([1, 3])
    mu, _ = likelihood.encode_all(vae, torch.rand(500, 1, 8, 8), batch_size=128)
    n, mask = collapse.active_units(mu, threshold=0.01)
    assert n == 2 and mask.tolist() == [True, False, True, False]
    assert collapse.activity(mu)[[1, 3]].abs().max() == 0
    assert collapse.active_units(mu, threshold=1e6)[0] == 0


def test_mixture_density_matches_the_direct_sum():
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn((50, 3), generator=gen, dtype=torch.float64)
    logvar = torch.randn((50, 3), generator=gen, dtype=torch.float64) - 2.0
    z = torch.randn((70, 3), generator=gen, dtype=torch.float64)
    comps = torch.distributions.Normal(mu, (0.5 * logvar).exp())  # batch [N, D]
    direct = comps.log_prob(z[:, None, :]).sum(-1)  # [M, N]
    expected = torch.logsumexp(direct, 1) - math.log(50)
    assert torch.allclose(collapse.aggregate_log_density(z, mu, logvar), expected, atol=1e-9)


def test_mutual_information_is_zero_for_an_encoder_that_ignores_x():
    vae = vae_with_dead_dims([0, 1, 2, 3])
    with torch.no_grad():
        vae.encoder.net[-1].weight.zero_()  # logvar ignores x too
        vae.encoder.net[-1].bias[4:] = torch.tensor([-1.0, 0.0, 0.5, -2.0])
        vae.encoder.net[-1].bias[:4] = torch.tensor([0.5, -1.0, 0.0, 2.0])
    mu, logvar = likelihood.encode_all(vae, torch.rand(2000, 1, 8, 8), batch_size=1000)
    info = collapse.posterior_information(mu, logvar, seed=0)
    assert abs(info["mutual_info"]) < 1e-6
    # q(z) = q(z|x) here, so KL(q(z) || p(z)) is the closed-form KL of that one Gaussian.
    closed = 0.5 * (mu[0].pow(2) + logvar[0].exp() - logvar[0] - 1).sum().item()
    assert info["aggregate_kl"] == pytest.approx(closed, abs=0.15)


def test_mutual_information_is_large_for_an_informative_encoder():
    n = 1000
    gen = torch.Generator().manual_seed(0)
    mu = 3.0 * torch.randn((n, 2), generator=gen)  # codes spread far wider than each posterior
    logvar = torch.full((n, 2), math.log(0.01))
    info = collapse.posterior_information(mu, logvar, seed=1)  # eps independent of mu
    assert 4.0 < info["mutual_info"] <= math.log(n) + 1e-9
    mean_kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(1).mean().item()
    # MI + KL(q(z) || p(z)) = E_x KL(q(z|x) || p(z)), up to Monte Carlo noise.
    assert info["mutual_info"] + info["aggregate_kl"] == pytest.approx(mean_kl, abs=0.3)


def test_reconstruction_per_example(tiny_vae):
    grey = torch.rand(30, 1, 8, 8)
    x = grey.bernoulli()
    rec = likelihood.reconstruct(tiny_vae, x, grey, batch_size=7)
    assert rec.recon_nll.shape == rec.mse.shape == rec.psnr.shape == (30,)
    assert (rec.recon_nll > 0).all() and (rec.mse > 0).all()
    assert torch.allclose(rec.psnr, 10 * torch.log10(1 / rec.mse))
    with torch.no_grad():
        recon = tiny_vae.mean(tiny_vae.decode(tiny_vae.encode(grey)[0]))
    assert torch.allclose(rec.mse, (recon - grey).pow(2).mean((1, 2, 3)))
    assert likelihood.psnr(0.01) == pytest.approx(20.0)
