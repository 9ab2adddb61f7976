"""Model breadth: the conv arch, the Gaussian and continuous Bernoulli likelihoods, the IWAE
objective, KL warm-up and free bits, lr schedules, and early stopping with the best epoch
kept."""

import math

import numpy as np
import pytest
import torch
from helpers import proto_data, train_cfg, vae_cfg
from torch.distributions import ContinuousBernoulli, Normal

from vaepipe.evaluation.likelihood import evaluate_elbo
from vaepipe.model import likelihoods, objectives
from vaepipe.model.likelihoods import Likelihood
from vaepipe.model.vae import VAE, LatentSample, VAEConfig
from vaepipe.training.distributed import SINGLE, Step
from vaepipe.training.loop import (
    VALIDATION_BATCH,
    _after_epoch,
    _Loop,
    cosine_lr,
    fit,
    kl_weight,
)

ETAS = [
    -80.0,
    -20.0,
    -3.0,
    -0.51,
    -0.5,
    -0.49,
    -1e-3,
    0.0,
    1e-6,
    0.2,
    0.5,
    0.5001,
    2.0,
    30.0,
    90.0,
]


def _grid_integral(f, n=200_001):
    """Simpson's rule of f over [0, 1] in float64."""
    x = np.linspace(0.0, 1.0, n)
    w = np.ones(n)
    w[1:-1:2], w[2:-1:2] = 4, 2
    return (f(x) * w).sum() / (3 * (n - 1))


# --- continuous Bernoulli ---


@pytest.mark.parametrize("eta", ETAS)
def test_continuous_bernoulli_is_a_normalised_density_with_the_stated_mean(eta):
    log_c = likelihoods.cb_log_norm(torch.tensor(eta, dtype=torch.float64)).item()
    # For large |eta| the density piles up at one end: integrate in log space around it.
    shift = max(eta, 0.0)
    mass = _grid_integral(lambda x: np.exp(eta * x - shift))
    assert log_c == pytest.approx(-(math.log(mass) + shift), abs=1e-6)
    mean = _grid_integral(lambda x: x * np.exp(eta * x - shift)) / mass
    got = likelihoods.cb_mean(torch.tensor(eta, dtype=torch.float64)).item()
    assert got == pytest.approx(mean, abs=1e-6)


def test_continuous_bernoulli_matches_torch_distributions_in_float32():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 1, 4, 4, generator=g) * 4
    logits[0] = 0.3  # inside the Taylor band
    x = torch.rand(64, 1, 4, 4, generator=g)
    ours = Likelihood("continuous_bernoulli").nll(x, logits)
    ref = -ContinuousBernoulli(logits=logits.double()).log_prob(x.double()).flatten(1).sum(1)
    torch.testing.assert_close(ours.double(), ref, atol=2e-4, rtol=1e-5)
    ref_mean = ContinuousBernoulli(logits=logits.double()[1:]).mean
    torch.testing.assert_close(
        likelihoods.cb_mean(logits[1:]).double(), ref_mean, atol=1e-5, rtol=0
    )


def test_continuous_bernoulli_is_smooth_across_the_taylor_band_and_has_finite_gradients():
    edge = torch.tensor([0.5 - 1e-6, 0.5 + 1e-6, -0.5 - 1e-6, -0.5 + 1e-6])
    for f in (likelihoods.cb_log_norm, likelihoods.cb_mean):
        v = f(edge)
        assert abs(v[0] - v[1]) < 3e-6 and abs(v[2] - v[3]) < 3e-6  # float32 round-off
    eta = torch.tensor([0.0, 1e-8, -1e-8, 0.5, 100.0, -100.0], requires_grad=True)
    (likelihoods.cb_log_norm(eta).sum() + likelihoods.cb_mean(eta).sum()).backward()
    assert torch.isfinite(eta.grad).all()
    assert likelihoods.cb_mean(torch.tensor([-200.0, 200.0])).tolist() == pytest.approx(
        [1 / 200, 1 - 1 / 200]
    )


def test_continuous_bernoulli_decoder_mean_is_not_the_sigmoid():
    vae = VAE(
        vae_cfg(image_shape=(1, 4, 4), latent_dim=2, hidden=[8], likelihood="continuous_bernoulli")
    )
    logits = torch.tensor([[-3.0, 0.0, 3.0]])
    mean = vae.mean(logits)
    assert mean[0, 1].item() == pytest.approx(0.5)
    assert mean[0, 2].item() == pytest.approx(1 / (1 - math.exp(-3)) - 1 / 3, abs=1e-6)
    assert abs(mean[0, 2].item() - torch.sigmoid(logits)[0, 2].item()) > 0.1


# --- Gaussian ---


def test_gaussian_nll_is_the_normal_log_density_with_scalar_or_per_pixel_std():
    g = torch.Generator().manual_seed(1)
    x, logits = torch.rand(5, 1, 3, 3, generator=g), torch.randn(5, 1, 3, 3, generator=g)
    sigma = torch.rand(1, 3, 3, generator=g) * 0.3 + 0.02
    ref = -Normal(torch.sigmoid(logits), sigma).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(Likelihood("gaussian", sigma).nll(x, logits), ref)
    ref_scalar = -Normal(torch.sigmoid(logits), 0.1).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(Likelihood("gaussian", 0.1).nll(x, logits), ref_scalar)


def test_learned_sigma_starts_at_gaussian_sigma_never_drops_below_the_floor_and_learns():
    cfg = vae_cfg(
        image_shape=(1, 8, 8),
        latent_dim=3,
        hidden=[32],
        likelihood="gaussian",
        gaussian_sigma=0.3,
        learn_sigma=True,
        min_sigma=0.02,
    )
    torch.manual_seed(0)
    vae = VAE(cfg)
    torch.testing.assert_close(vae.sigma, torch.full((1, 8, 8), 0.3))
    with torch.no_grad():
        vae.raw_sigma.fill_(-1e4)
    assert (vae.sigma >= 0.02).all() and torch.isfinite(
        vae.likelihood.nll(torch.rand(2, 1, 8, 8), torch.zeros(2, 1, 8, 8))
    ).all()
    # On data far less noisy than sigma = 0.3 the learned std shrinks and the ELBO improves
    # beyond what the fixed std allows.
    x, xv = proto_data()
    torch.manual_seed(0)
    learned = VAE(cfg)
    tcfg = train_cfg(epochs=8, batch_size=50, lr=1e-2)
    hist = fit(learned, x, xv, tcfg, "none", progress=False)
    torch.manual_seed(0)
    fixed = VAE(VAEConfig(**{**cfg.to_dict(), "image_shape": (1, 8, 8), "learn_sigma": False}))
    hist_fixed = fit(fixed, x, xv, tcfg, "none", progress=False)
    assert learned.sigma.mean().item() < 0.2
    assert hist[-1].val["elbo"] > hist_fixed[-1].val["elbo"] + 10


# --- conv arch ---


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (3, 9, 7), (1, 5, 5)])
def test_conv_vae_maps_any_image_size_back_to_itself(shape):
    cfg = vae_cfg(image_shape=shape, latent_dim=4, hidden=[16], arch="conv", channels=[4, 8])
    vae = VAE(cfg)
    x = torch.rand(3, *shape)
    logits, mu, logvar = vae(x)
    assert logits.shape == x.shape and mu.shape == logvar.shape == (3, 4)
    assert vae.decode(torch.randn(5, 3, 4)).shape == (5, 3, *shape)  # [K, B, D] samples
    assert any(isinstance(m, torch.nn.Conv2d) for m in vae.encoder.modules())
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in vae.decoder.modules())


def test_conv_vae_learns():
    x, xv = proto_data()
    torch.manual_seed(0)
    vae = VAE(
        vae_cfg(image_shape=(1, 8, 8), latent_dim=3, hidden=[32], arch="conv", channels=[8, 16])
    )
    hist = fit(vae, x, xv, train_cfg(epochs=8, batch_size=50, lr=3e-3), "dynamic", progress=False)
    assert hist[-1].val["elbo"] > hist[0].val["elbo"] + 1


# --- IWAE objective ---


def _terms_from_eps(vae, x, eps, objective):
    s = Step(vae)(x, eps)
    if objective == "iwae":
        return objectives.iwae_terms(x, s, vae.likelihood)
    return objectives.elbo_terms(x, s, vae.likelihood, beta=1.0, free_bits=0.0)


def test_iwae_objective_with_one_sample_is_the_elbo_and_with_more_is_tighter(tiny_vae):
    x = torch.bernoulli(torch.full((6, 1, 8, 8), 0.3), generator=torch.Generator().manual_seed(0))
    eps = torch.randn(1, 6, 3, generator=torch.Generator().manual_seed(1))
    one = _terms_from_eps(tiny_vae, x, eps, "iwae")
    plain = _terms_from_eps(tiny_vae, x, eps[0], "elbo")
    torch.testing.assert_close(one.elbo, plain.elbo)  # same sample, same terms
    # one sample: minus the loss is the Monte Carlo ELBO (KL sampled, not closed form), whose
    # mean over draws is the closed-form ELBO
    g = torch.Generator().manual_seed(3)
    draws = [
        _terms_from_eps(tiny_vae, x, torch.randn(1, 6, 3, generator=g), "iwae")
        for _ in range(4000)
    ]
    mc = -torch.stack([d.loss for d in draws]).mean()
    closed = torch.stack([d.elbo for d in draws]).mean()
    assert mc.item() == pytest.approx(closed.item(), abs=0.1)
    eps = torch.randn(50, 6, 3, generator=torch.Generator().manual_seed(2))
    many = _terms_from_eps(tiny_vae, x, eps, "iwae")
    # log-mean-exp >= mean-log (Jensen) for the very same samples
    assert -many.loss.item() > many.elbo.item()


def test_iwae_training_logs_the_validation_bound_and_keeps_it_above_the_elbo():
    x, xv = proto_data()
    torch.manual_seed(0)
    vae = VAE(vae_cfg(image_shape=(1, 8, 8), latent_dim=3, hidden=[32]))
    cfg = train_cfg(epochs=4, batch_size=50, objective="iwae", iwae_k=10)
    hist = fit(vae, x, xv, cfg, "dynamic", progress=False)
    assert all(h.val["iwae"] > h.val["elbo"] for h in hist)
    assert hist[-1].val["iwae"] > hist[0].val["iwae"]
    assert "iwae/val" in hist[-1].metrics()


# --- KL schedules ---


def test_kl_warmup_ramps_linearly_per_step_and_is_logged_per_epoch():
    cfg = train_cfg(beta=2.0, warmup_epochs=4)
    assert kl_weight(cfg, 0, 10) == pytest.approx(2.0 / 40)
    assert kl_weight(cfg, 19, 10) == pytest.approx(1.0)
    assert kl_weight(cfg, 39, 10) == kl_weight(cfg, 500, 10) == 2.0
    assert kl_weight(train_cfg(beta=0.5), 0, 10) == 0.5
    x, xv = proto_data()
    hist = fit(
        _mlp(),
        x,
        xv,
        train_cfg(epochs=3, batch_size=100, warmup_epochs=2),
        "dynamic",
        progress=False,
    )
    assert [h.beta for h in hist] == pytest.approx([0.5, 1.0, 1.0])
    assert [h.metrics()["beta"] for h in hist] == pytest.approx([0.5, 1.0, 1.0])


def test_free_bits_charge_each_dim_at_least_the_floor_and_leave_the_elbo_true():
    g = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.full((8, 1, 2, 2), 0.5), generator=g)
    logits = torch.randn(8, 1, 2, 2, generator=g)
    mu = torch.cat([torch.zeros(8, 2), torch.full((8, 1), 3.0)], 1)  # KL 0, 0 and 4.5 nats
    logvar = torch.zeros(8, 3)
    bernoulli = Likelihood("bernoulli")
    s = LatentSample.one_layer(logits, mu, mu, logvar)
    plain = objectives.elbo_terms(x, s, bernoulli, beta=1.0, free_bits=0.0)
    fb = objectives.elbo_terms(x, s, bernoulli, beta=1.0, free_bits=0.5)
    assert fb.elbo == plain.elbo and fb.kl == plain.kl
    torch.testing.assert_close(fb.loss, plain.recon + 0.5 + 0.5 + 4.5)
    # below the floor a dim gets no gradient from the KL: nothing pushes it to collapse
    mu2 = torch.full((8, 3), 0.1, requires_grad=True)
    s2 = LatentSample.one_layer(logits, mu2, mu2, logvar)
    objectives.elbo_terms(x, s2, bernoulli, beta=1.0, free_bits=0.5).loss.backward()
    assert torch.count_nonzero(mu2.grad) == 0


def test_free_bits_keep_more_latent_dims_in_use():
    x, xv = proto_data(n=1200)
    hists = {}
    for fb in (0.0, 1.0):
        torch.manual_seed(0)
        vae = VAE(vae_cfg(image_shape=(1, 8, 8), latent_dim=8, hidden=[32]))
        hists[fb] = fit(
            vae,
            x,
            xv,
            train_cfg(epochs=6, batch_size=50, free_bits=fb),
            "dynamic",
            progress=False,
        )
    active = {fb: sum(k > 0.1 for k in h[-1].kl_per_dim) for fb, h in hists.items()}
    assert active[1.0] > active[0.0]


# --- lr schedules, early stopping, best epoch ---


def test_cosine_lr_goes_from_lr_to_lr_min_and_is_logged():
    cfg = train_cfg(epochs=4, lr=1e-3, lr_schedule="cosine", lr_min=1e-5)
    assert cosine_lr(cfg, 0) == pytest.approx(1e-3)
    assert cosine_lr(cfg, 2) == pytest.approx((1e-3 + 1e-5) / 2)
    assert cosine_lr(cfg, 4) == pytest.approx(1e-5)
    x, xv = proto_data()
    hist = fit(_mlp(), x, xv, cfg, "dynamic", progress=False)
    assert [h.lr for h in hist] == pytest.approx([cosine_lr(cfg, e) for e in range(4)])


def test_plateau_cuts_lr_and_early_stopping_stops_on_the_validation_objective():
    vae = _mlp()
    cfg = train_cfg(
        lr=1e-3, lr_schedule="plateau", lr_patience=2, lr_factor=0.5, lr_min=3e-4, early_stopping=4
    )
    loop = _Loop(vae, cfg, torch.device("cpu"), SINGLE)
    seen = []
    for score in [-10.0, -9.0, -9.5, -9.2, -8.0, -8.5, -8.6, -8.7, -8.8]:
        loop.epoch += 1
        _after_epoch(loop, cfg, score)
        seen.append((loop.best_epoch, loop.opt.param_groups[0]["lr"], loop.stopped))
    assert [s[0] for s in seen] == [1, 2, 2, 2, 5, 5, 5, 5, 5]
    # two epochs without a better score -> halve (epoch 4); the improvement at 5 restarts the
    # count; two more -> halve, but not below lr_min (epoch 7); two more: stays at lr_min
    assert [s[1] for s in seen] == pytest.approx(
        [1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 5e-4, 3e-4, 3e-4, 3e-4]
    )
    assert [s[2] for s in seen] == [False] * 8 + [True]  # epochs 6-9: 4 without improvement


def test_early_stopping_ends_training_and_hands_back_the_best_epoch():
    # Validation images the training data never shows (inverted prototypes): the model gets
    # worse on them as it fits the training set, so its best epoch is an early one.
    x, _ = proto_data(n=1200)
    xv = 1.0 - x[:200]
    torch.manual_seed(0)
    vae = VAE(vae_cfg(image_shape=(1, 8, 8), latent_dim=3, hidden=[32], likelihood="gaussian"))
    cfg = train_cfg(epochs=40, batch_size=50, early_stopping=3)
    hist = fit(vae, x, xv, cfg, "none", progress=False)
    best = hist[-1].best_epoch
    assert len(hist) == best + 3 < 40
    assert hist[best - 1].val["elbo"] == max(h.val["elbo"] for h in hist)
    # the weights handed back are the best epoch's, not the last one's
    val, _ = evaluate_elbo(vae, xv, batch_size=VALIDATION_BATCH, seed=cfg.seed)
    assert val["elbo"] == pytest.approx(hist[best - 1].val["elbo"], abs=1e-9)
    assert val["elbo"] != pytest.approx(hist[-1].val["elbo"], abs=1e-6)


# --- helpers ---


def _mlp():
    torch.manual_seed(0)
    return VAE(vae_cfg(image_shape=(1, 8, 8), latent_dim=3, hidden=[32]))
