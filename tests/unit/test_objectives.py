"""The objectives against hand-computed cases and independent computations: the per-pixel
summed NLL of each likelihood, the closed-form KL (and its sign), the ELBO's weights, the IWAE
log weight against torch.distributions."""

import math

import pytest
import torch
import torch.nn.functional as F

from vaepipe.model.gaussian import kl_per_dim, log_normal_diag
from vaepipe.model.likelihoods import Likelihood, bernoulli_nll
from vaepipe.model.objectives import elbo_terms, iwae_bound, log_weights
from vaepipe.model.vae import LatentSample

BERNOULLI = Likelihood("bernoulli")
ELBO = {"beta": 1.0, "free_bits": 0.0}


def one_sample(logits, mu, logvar, z=None):
    """A LatentSample of given tensors (the closed-form KL applies)."""
    return LatentSample.one_layer(logits, mu if z is None else z, mu, logvar)


def recon_nll(x, logits, kind, sigma=None):
    return Likelihood(kind, sigma).nll(x, logits)


def test_shapes_and_finiteness(tiny_vae):
    x = torch.rand(5, 1, 8, 8).bernoulli()
    logits, mu, logvar = tiny_vae(x)
    assert logits.shape == (5, 1, 8, 8) and mu.shape == (5, 3) and logvar.shape == (5, 3)
    t = elbo_terms(x, one_sample(logits, mu, logvar), BERNOULLI, **ELBO)
    assert t.kl_per_dim.shape == (3,)
    for v in (t.recon, t.kl, t.elbo, t.loss):
        assert v.shape == () and torch.isfinite(v)


def test_bernoulli_nll_hand_computed():
    # two pixels: x=1 with p=sigmoid(0)=0.5, x=0 with p=sigmoid(log 3)=0.75 -> -log .5 - log .25
    x = torch.tensor([1.0, 0.0, 1.0, 1.0]).reshape(1, 1, 2, 2)
    logits = torch.tensor([0.0, math.log(3), 0.0, 0.0]).reshape(1, 1, 2, 2)
    expected = -3 * math.log(0.5) - math.log(0.25)
    assert recon_nll(x, logits, "bernoulli").item() == pytest_approx(expected)


def test_bernoulli_nll_in_pytorch_is_the_exported_graphs_formula_for_any_logit():
    # Training and evaluation take BCE-with-logits (one kernel); an exported graph takes the
    # spelled-out form. Both are finite for saturated logits and agree, gradients too, with K
    # samples of logits broadcast against one x.
    logits = torch.cat([torch.linspace(-200, 200, 61), torch.randn(39)]).reshape(1, 1, 10, 10)
    logits = torch.cat([logits, -logits]).unsqueeze(1).repeat(1, 3, 1, 1, 1)  # [K 2, B 3, ...]
    logits.requires_grad_(True)
    x = torch.rand(3, 1, 10, 10, generator=torch.Generator().manual_seed(0)).bernoulli()
    eager = bernoulli_nll(logits, x)
    spelled = logits.clamp_min(0) + torch.log1p(torch.exp(-logits.abs())) - x * logits
    assert eager.shape == spelled.shape == (2, 3, 1, 10, 10) and torch.isfinite(eager).all()
    torch.testing.assert_close(eager, spelled, atol=1e-5, rtol=1e-6)
    (g_eager,) = torch.autograd.grad(eager.sum(), logits)
    (g_spelled,) = torch.autograd.grad(spelled.sum(), logits)
    torch.testing.assert_close(g_eager, g_spelled, atol=1e-6, rtol=1e-6)


def test_gaussian_nll_is_a_density_summed_over_pixels():
    sigma = 0.1
    x = torch.full((2, 1, 2, 2), 0.5)
    logits = torch.zeros(2, 1, 2, 2)  # mean = sigmoid(0) = 0.5 -> residual 0
    per_pixel = math.log(sigma) + 0.5 * math.log(2 * math.pi)
    assert torch.allclose(recon_nll(x, logits, "gaussian", sigma), torch.full((2,), 4 * per_pixel))
    # The seed tutorial's F.mse_loss averages over pixels; ours is the NLL summed over pixels,
    # so a residual of 0.1 everywhere costs 4 * 0.5 * (0.1/sigma)^2 more, not its mean.
    x2 = torch.full((1, 1, 2, 2), 0.6)
    gap = recon_nll(x2, logits[:1], "gaussian", sigma) - recon_nll(
        x[:1], logits[:1], "gaussian", sigma
    )
    assert gap.item() == pytest_approx(4 * 0.5 * 1.0)
    assert gap.item() != pytest_approx(F.mse_loss(torch.sigmoid(logits[:1]), x2).item())


def test_kl_closed_form_matches_hand_value_and_sign():
    mu = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(4.0)]])
    # 0.5 * (mu^2 + s^2 - log s^2 - 1): dim0 = 0.5, dim1 = 0.5 * (4 - log 4 - 1)
    expected = [0.5, 0.5 * (3 - math.log(4))]
    assert torch.allclose(kl_per_dim(mu, logvar), torch.tensor([expected]))
    # The tutorial's section 4 drops the minus sign: that version is negative here; ours is not.
    wrong = 0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum()
    assert wrong.item() < 0 < kl_per_dim(mu, logvar).sum(-1).item()


def test_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.randn(4, 3), torch.randn(4, 3) * 0.5
    z = mu + torch.exp(0.5 * logvar) * torch.randn(200_000, 4, 3)
    zeros = torch.zeros_like(z)
    mc = (log_normal_diag(z, mu, logvar) - log_normal_diag(z, zeros, zeros)).mean(0)
    assert torch.allclose(mc, kl_per_dim(mu, logvar).sum(-1), atol=0.02)


def test_gradients_reach_encoder_through_reparameterize(tiny_vae):
    tiny_vae.train()
    x = torch.rand(6, 1, 8, 8).bernoulli()
    logits, mu, logvar = tiny_vae(x)
    elbo_terms(x, one_sample(logits, mu, logvar), BERNOULLI, **ELBO).loss.backward()
    for p in tiny_vae.encoder.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_recon_only_gradient_flows_to_encoder_via_z(tiny_vae):
    # Without the KL the encoder is reached only through z = mu + sigma * eps.
    x = torch.rand(6, 1, 8, 8).bernoulli()
    mu, logvar = tiny_vae.encode(x)
    z = tiny_vae.reparameterize(mu, logvar)
    recon_nll(x, tiny_vae.decode(z), "bernoulli").mean().backward()
    assert all(p.grad.abs().sum() > 0 for p in tiny_vae.encoder.parameters())


def test_loss_weights_kl_by_beta():
    x = torch.rand(3, 1, 2, 2).bernoulli()
    logits, mu, logvar = torch.randn(3, 1, 2, 2), torch.randn(3, 2), torch.randn(3, 2)
    t = elbo_terms(x, one_sample(logits, mu, logvar), BERNOULLI, beta=4.0, free_bits=0.0)
    assert torch.allclose(t.loss, t.recon + 4.0 * t.kl)
    assert torch.allclose(t.elbo, -(t.recon + t.kl))


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "continuous_bernoulli"])
def test_iwae_k1_is_the_log_weight_computed_with_torch_distributions(likelihood):
    """With K = 1 the bound is log p(x|z) + log p(z) - log q(z|x) of the one sample, each term
    computed here independently by torch.distributions (not our own densities)."""
    from torch.distributions import ContinuousBernoulli, Independent, Normal

    torch.manual_seed(0)
    x = torch.rand(4, 1, 2, 2)
    x = x.bernoulli() if likelihood == "bernoulli" else x.clamp(0.01, 0.99)
    mu, logvar = torch.randn(4, 2), torch.randn(4, 2)
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn(1, 4, 2)
    logits = torch.randn(1, 4, 1, 2, 2)
    log_w = log_weights(x, one_sample(logits, mu, logvar, z), Likelihood(likelihood, sigma=0.3))
    if likelihood == "bernoulli":
        p_x = torch.distributions.Bernoulli(logits=logits)
    elif likelihood == "gaussian":
        p_x = Normal(torch.sigmoid(logits), 0.3)
    else:
        p_x = ContinuousBernoulli(logits=logits)
    log_px_z = Independent(p_x, 3).log_prob(x)  # [1, 4]
    log_pz = Independent(Normal(torch.zeros(2), torch.ones(2)), 1).log_prob(z)
    log_qz = Independent(Normal(mu, std), 1).log_prob(z)
    expected = log_px_z + log_pz - log_qz
    torch.testing.assert_close(log_w, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(iwae_bound(log_w), expected[0], rtol=1e-4, atol=1e-4)


def pytest_approx(v):
    import pytest

    return pytest.approx(v, rel=1e-5, abs=1e-5)
