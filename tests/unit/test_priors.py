"""Learned priors (VampPrior, mixture of Gaussians) and the two-stochastic-layer VAE: densities
against torch.distributions, the KL estimate against Monte Carlo, bounds, training, ONNX parity."""

import copy
import math

import numpy as np
import pytest
import torch
from helpers import params_dict, proto_data, train_cfg, vae_cfg
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from vaepipe import config
from vaepipe.errors import ConfigError
from vaepipe.evaluation import likelihood
from vaepipe.export import graphs
from vaepipe.inference import runtime
from vaepipe.model import objectives, priors
from vaepipe.model.layers import ACTIVATIONS as VAE_ACTIVATIONS
from vaepipe.model.vae import VAE, VAEConfig
from vaepipe.training.loop import fit


def _model(**kw) -> VAE:
    torch.manual_seed(0)
    return VAE(vae_cfg(image_shape=(1, 8, 8), latent_dim=3, hidden=[16], **kw)).eval()


def _mixture(mu, logvar, logits) -> MixtureSameFamily:
    comp = Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)
    return MixtureSameFamily(Categorical(logits=logits), comp)


@pytest.mark.parametrize("kind", ["mog", "vamp"])
def test_prior_densities_equal_torch_distributions_mixtures(kind):
    vae = _model(prior=kind, prior_components=7)
    with torch.no_grad():
        if kind == "mog":
            vae.prior.logits.copy_(torch.randn(7))
            mu, logvar, logits = vae.prior.mu, vae.prior.logvar, vae.prior.logits
        else:
            mu, logvar = vae.prior.components()
            logits = torch.zeros(7)
        z = torch.randn(4, 5, 3) * 2
        want = _mixture(mu, logvar, logits).log_prob(z)
        torch.testing.assert_close(vae.prior.log_prob(z), want, rtol=1e-5, atol=1e-5)
    standard = _model()
    z = torch.randn(6, 3)
    torch.testing.assert_close(
        standard.prior.log_prob(z), Independent(Normal(0, torch.ones(3)), 1).log_prob(z)
    )


def test_mixture_samples_follow_the_weights_and_components():
    vae = _model(prior="mog", prior_components=3)
    with torch.no_grad():
        vae.prior.mu.copy_(torch.tensor([[-10.0, 0, 0], [0, 10, 0], [0, 0, 10]]))
        vae.prior.logvar.zero_()
        vae.prior.logits.copy_(torch.log(torch.tensor([0.2, 0.3, 0.5])))
        g = torch.Generator().manual_seed(0)
        n = 20_000
        z = vae.sample_prior(torch.randn(n, 3, generator=g), torch.rand(n, generator=g))
    which = torch.stack([z[:, 0] < -5, z[:, 1] > 5, z[:, 2] > 5], 1).float().mean(0)
    torch.testing.assert_close(which, torch.tensor([0.2, 0.3, 0.5]), atol=0.015, rtol=0)
    first = z[z[:, 0] < -5]
    assert abs(first[:, 0].mean() + 10) < 0.05 and abs(first[:, 0].std() - 1) < 0.05
    # the components are picked by u alone: the cumulative weights 0.2, 0.5, 1.0
    u = torch.tensor([0.0, 0.19, 0.21, 0.49, 0.51, 0.999])
    assert priors.pick(u, vae.prior.logits).argmax(1).tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize(
    ("arch", "prior"),
    [("mlp", "vamp"), ("mlp", "mog"), ("hvae", "standard"), ("hvae_topdown", "vamp")],
)
def test_single_sample_kl_estimates_the_expected_log_ratio(arch, prior):
    """Averaged over many draws, the KL term of the sample-based ELBO is E_q[log q - log p];
    and with the N(0, I) prior it agrees with the closed form (one layer)."""
    vae = _model(arch=arch, prior=prior, prior_components=5, z1_dim=4)
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1)).bernoulli()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        draws = [
            objectives.elbo_of(
                x, vae.sample(x, torch.randn(8, vae.noise_dim, generator=g)), vae.likelihood
            )
            for _ in range(3000)
        ]
        kl = torch.stack([t.kl for t in draws]).mean()
        # an independent Monte Carlo of the same expectation, with torch.distributions densities
        eps = torch.randn(3000, 8, vae.noise_dim, generator=g)
        s = vae.sample(x, eps)
        assert s.log_q is not None
        if arch == "mlp":
            q = Independent(Normal(s.mu, torch.exp(0.5 * s.logvar)), 1).log_prob(s.z)
            torch.testing.assert_close(s.log_q, q, rtol=1e-5, atol=1e-4)
        mc = (s.log_q - s.log_p).mean()
    assert kl.item() == pytest.approx(mc.item(), abs=0.15)


def test_hvae_log_densities_are_the_two_layers_as_written():
    vae = _model(arch="hvae", z1_dim=4)
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        s = vae.sample(x, eps)
        mu1, logvar1 = vae.encoder(x)
        z1 = mu1 + torch.exp(0.5 * logvar1) * eps[:, :4]
        mu2, logvar2 = vae.up(z1).chunk(2, -1)
        z2 = mu2 + torch.exp(0.5 * logvar2) * eps[:, 4:]
        mp, lp = vae.down(z2).chunk(2, -1)

        def n(z, m, lv):
            return Independent(Normal(m, torch.exp(0.5 * lv)), 1).log_prob(z)

        torch.testing.assert_close(s.log_q, n(z1, mu1, logvar1) + n(z2, mu2, logvar2))
        std = Independent(Normal(torch.zeros(3), torch.ones(3)), 1)
        torch.testing.assert_close(s.log_p, n(z1, mp, lp) + std.log_prob(z2))
        torch.testing.assert_close(s.z, z2)
        torch.testing.assert_close(s.logits, vae.decoder(z1))


def test_hvae_topdown_log_densities_are_the_two_layers_as_written():
    """Tomczak & Welling's two layers: q(z2|x) q(z1|x, z2), p(z2) p(z1|z2) p(x|z1, z2)."""
    vae = _model(arch="hvae_topdown", z1_dim=4, prior="mog", prior_components=3)
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        s = vae.sample(x, eps)
        h = vae.encoder.net[:-1](x.flatten(1))
        mu2, logvar2 = vae.encoder(x)  # q(z2|x): the encoder itself
        z2 = mu2 + torch.exp(0.5 * logvar2) * eps[..., 4:]
        mu1, logvar1 = vae.q_z1(torch.cat([h.expand(2, 5, 16), z2], -1)).chunk(2, -1)
        z1 = mu1 + torch.exp(0.5 * logvar1) * eps[..., :4]
        mp, lp = vae.down(z2).chunk(2, -1)

        def n(z, m, lv):
            return Independent(Normal(m, torch.exp(0.5 * lv)), 1).log_prob(z)

        torch.testing.assert_close(s.log_q, n(z1, mu1, logvar1) + n(z2, mu2, logvar2))
        p = vae.prior
        mix = _mixture(p.mu, p.logvar, p.logits)
        torch.testing.assert_close(s.log_p, n(z1, mp, lp) + mix.log_prob(z2))
        torch.testing.assert_close(s.z, z2)
        torch.testing.assert_close(s.logits, vae.decoder(torch.cat([z1, z2], -1)))
        # what decoder.onnx exports: the decoder at z1 = the mean of p(z1|z2), beside z2
        z = torch.randn(6, 3)
        want = vae.decoder(torch.cat([vae.down(z).chunk(2, -1)[0], z], -1))
        torch.testing.assert_close(vae.decode(z), want)
        torch.testing.assert_close(vae.encode(x)[0], mu2)


@pytest.mark.parametrize(
    ("arch", "prior"),
    [
        ("hvae", "standard"),
        ("mlp", "vamp"),
        ("hvae", "mog"),
        ("hvae_topdown", "standard"),
        ("convhvae", "vamp"),
    ],
)
def test_iwae_bound_tightens_with_k_and_one_sample_is_the_elbo(arch, prior):
    vae = _model(arch=arch, prior=prior, prior_components=4, z1_dim=4, channels=[4])
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0)).bernoulli()
    eps1 = torch.randn(1, 40, vae.noise_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        one = likelihood.iwae_estimate(vae, x, eps1)
        t = objectives.elbo_of(x, vae.sample(x, eps1[0]), vae.likelihood)
        # K = 1: the bound is the single-sample ELBO of the same draw, image by image
        assert one.mean().item() == pytest.approx(t.elbo.item(), abs=1e-4)
        low = likelihood.iwae_log_likelihood(vae, x, 1, seed=3).mean()
        high = likelihood.iwae_log_likelihood(vae, x, 200, seed=3).mean()
    assert high > low


@pytest.mark.parametrize(
    "options",
    [
        {"arch": "hvae"},
        {"arch": "hvae_topdown", "prior": "vamp", "prior_components": 10},
        {"arch": "convhvae", "channels": [4], "activation": "gated"},
        {"prior": "vamp", "prior_components": 10},
        {"prior": "mog", "prior_components": 10},
    ],
)
def test_training_improves_and_resumes_exactly(options):
    x, xv = proto_data()
    cfg = train_cfg(epochs=4, batch_size=50)
    vae = VAE(vae_cfg(image_shape=(1, 8, 8), latent_dim=3, hidden=[32], z1_dim=6, **options))
    saved = []  # copies: the state's tensors are the live weights until written to disk
    keep = lambda state: saved.append(copy.deepcopy(state))  # noqa: E731
    hist = fit(vae, x, xv, cfg, "dynamic", on_checkpoint=keep, progress=False)
    assert hist[-1].val["elbo"] > hist[0].val["elbo"] and math.isfinite(hist[-1].val["kl"])
    resumed = VAE(vae_cfg(image_shape=(1, 8, 8), latent_dim=3, hidden=[32], z1_dim=6, **options))
    fit(resumed, x, xv, cfg, "dynamic", resume=saved[1], progress=False)
    for a, b in zip(vae.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "options",
    [
        {"arch": "hvae", "z1_dim": 5},
        {"prior": "vamp", "prior_components": 6},
        {"prior": "mog", "prior_components": 6},
        {"arch": "hvae", "z1_dim": 5, "prior": "vamp", "prior_components": 6},
        {"arch": "hvae_topdown", "z1_dim": 5, "prior": "vamp", "prior_components": 6},
        {"arch": "convhvae", "z1_dim": 5, "prior": "vamp", "prior_components": 6, "channels": [4]},
    ],
)
def test_every_graph_matches_pytorch_for_new_archs_and_priors(options, tmp_path):
    vae = _model(**options)
    eps = likelihood.fixed_noise(8, vae.noise_dim, 0)
    paths = graphs.export_models(vae, tmp_path, 18, {"dataset": "digits"}, eps, 0)
    sessions = {k: runtime.open_session(p, "cpu") for k, p in paths.items()}
    errs = graphs.parity_of(vae, sessions, eps)
    assert set(errs) >= {
        f"{g}_b{b}" for g in ("encoder", "decoder", "scorer", "prior") for b in (1, 257)
    }
    assert max(errs.values()) < 1e-3, errs
    meta = sessions["prior"].metadata()
    assert meta["prior"] == vae.cfg.prior and meta["arch"] == vae.cfg.arch


def test_prior_onnx_of_the_standard_prior_is_the_noise_itself(tmp_path):
    vae = _model()
    path = graphs.export_models(vae, tmp_path, 18, {"dataset": "digits"})["prior"]
    eps = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    u = np.random.default_rng(1).random(4).astype(np.float32)
    (z,) = runtime.open_session(path, "cpu").run({"eps": eps, "u": u})
    np.testing.assert_array_equal(z, eps)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"model": {"prior": "vamp"}, "train": {"free_bits": 0.1}},
            "'train.free_bits' = 0.1 needs",
        ),
        (
            {"model": {"arch": "hvae"}, "train": {"free_bits": 0.2}},
            "does not apply to 'model.arch'",
        ),
        ({"model": {"arch": "hvae", "hidden": []}}, "'model.hidden' must list at least one"),
        (
            {"model": {"arch": "hvae_topdown", "hidden": []}},
            "for 'model.arch' = 'hvae_topdown'",
        ),
        (
            {"model": {"arch": "hvae_topdown"}, "train": {"free_bits": 0.2}},
            "'model.arch' = 'hvae_topdown' (its KL",
        ),
        ({"model": {"arch": "ladder"}}, "choose one of: mlp, conv, hvae, hvae_topdown"),
        ({"model": {"activation": "gelu"}}, "choose one of: relu, silu, elu, tanh"),
        ({"train": {"iwae_gradient": "dreg"}}, "'train.iwae_gradient' = 'dreg' needs"),
        (
            {"model": {"arch": "hvae"}, "train": {"objective": "iwae", "iwae_gradient": "dreg"}},
            "is for one stochastic layer, not 'model.arch' = 'hvae'",
        ),
        ({"model": {"prior": "flow"}}, "choose one of: standard, vamp, mog"),
        (
            {"train": {"compile": "default", "nproc": 2}},
            "'train.compile' = 'default' is for one training process, not nproc x nnodes = 2",
        ),
        (
            {
                "train": {
                    "compile": "reduce-overhead",
                    "objective": "iwae",
                    "iwae_gradient": "dreg",
                }
            },
            "does not take 'train.iwae_gradient' = 'dreg'",
        ),
        ({"train": {"compile": "fast"}}, "choose one of: none, default, reduce-overhead"),
        ({"train": {"compile": False}}, "'train.compile'"),  # YAML's `off`
        ({"model": {"prior_components": 0}}, "'model.prior_components' = 0 is out of range"),
    ],
)
def test_bad_combinations_are_one_line(raw, message):
    with pytest.raises(ConfigError) as e:
        config.from_dict(params_dict(raw))
    assert message in str(e.value)


def test_vaepipe_generate_samples_the_learned_prior_through_prior_onnx(tmp_path, capsys):
    from vaepipe import cli

    vae = _model(prior="mog", prior_components=4)
    with torch.no_grad():
        vae.prior.mu.mul_(10)  # components far apart: N(0, I) draws would look nothing alike
    paths = graphs.export_models(vae, tmp_path, 18, {"dataset": "digits"})
    out = tmp_path / "s.npz"
    assert (
        cli.main(["generate", "--model", str(paths["decoder"]), "--n", "200", "--out", str(out)])
        == 0
    )
    assert "of the mog prior" in capsys.readouterr().out
    with np.load(out) as f:
        z = torch.from_numpy(f["z"])
    rng = np.random.default_rng(0)  # the CLI's draws for --seed 0
    eps = torch.from_numpy(rng.standard_normal((200, 3), dtype=np.float32))
    u = torch.from_numpy(rng.random(200, dtype=np.float32))
    with torch.no_grad():
        torch.testing.assert_close(z, vae.sample_prior(eps, u), atol=1e-5, rtol=1e-5)
    plain = tmp_path / "p.npz"
    cli.main(
        [
            "generate",
            "--model",
            str(paths["decoder"]),
            "--n",
            "200",
            "--prior",
            "none",
            "--out",
            str(plain),
        ]
    )
    with np.load(plain) as f:
        torch.testing.assert_close(torch.from_numpy(f["z"]), eps)


@pytest.mark.parametrize(("arch", "act"), [("mlp", "silu"), ("conv", "elu"), ("hvae", "tanh")])
def test_activation_is_every_hidden_layers_and_exports_with_parity(arch, act, tmp_path):
    vae = _model(arch=arch, activation=act, channels=[4], z1_dim=4)
    kinds = {type(m) for m in vae.modules()}
    assert VAE_ACTIVATIONS[act] in kinds and torch.nn.ReLU not in kinds
    eps = likelihood.fixed_noise(8, vae.noise_dim, 0)
    paths = graphs.export_models(vae, tmp_path, 18, {"dataset": "digits"}, eps, 0)
    sessions = {k: runtime.open_session(p, "cpu") for k, p in paths.items()}
    errs = graphs.parity_of(vae, sessions, eps)
    assert max(errs.values()) < 1e-3, errs
    # a model file written before the key existed is the ReLU model it was
    d = vae.cfg.to_dict()
    del d["activation"]
    assert VAE(VAEConfig.from_dict(d)).cfg.activation == "relu"


def test_a_held_vamp_prior_encodes_its_pseudo_inputs_once_and_estimates_the_same():
    vae = _model(prior="vamp", prior_components=5)
    x = torch.bernoulli(torch.full((6, 1, 8, 8), 0.3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # in chunks of one image: the prior is called six times, its components held
        held = likelihood.iwae_log_likelihood(vae, x, 50, seed=0, rows_per_chunk=50)
        per_call = torch.cat(
            [likelihood.iwae_estimate(vae, x[i : i + 1], n) for i, n in enumerate(_noise(6))]
        )
        mu, _ = vae.prior.components()
        with vae.prior.held():
            vae.prior.raw.add_(1.0)  # new pseudo-inputs: held components do not see them
            assert torch.equal(vae.prior.components()[0], mu)
        assert not torch.equal(vae.prior.components()[0], mu)  # released: encoded again
    torch.testing.assert_close(held, per_call, rtol=0, atol=1e-4)


def _noise(n: int) -> list[torch.Tensor]:
    """iwae_log_likelihood's per-chunk draws for k = 50, one image per chunk, seed 0."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn((50, 1, 3), generator=gen) for _ in range(n)]
