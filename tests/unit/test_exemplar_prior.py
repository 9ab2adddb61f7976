"""The Exemplar prior (a mixture over the training images' encodings with one learned
variance): its density against torch.distributions, the leave-one-out draw of a training step,
training and exact resume, the model file, the ONNX graphs and the params it refuses."""

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
from vaepipe.model import checkpoint, priors
from vaepipe.model.vae import VAE
from vaepipe.training.loop import fit


def _model(n: int = 30, **kw) -> VAE:
    torch.manual_seed(0)
    options = {"prior": "exemplar", "prior_components": 8, **kw}
    cfg = vae_cfg(image_shape=(1, 8, 8), latent_dim=3, hidden=[16], n_train=n, **options)
    return VAE(cfg).eval()


def _exemplars(n: int = 30) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(5))


def _mixture(mu: torch.Tensor, log_var: torch.Tensor, logits: torch.Tensor):
    scale = torch.exp(0.5 * log_var).expand_as(mu)
    return MixtureSameFamily(Categorical(logits=logits), Independent(Normal(mu, scale), 1))


@pytest.mark.parametrize("block", [priors.EXEMPLAR_BLOCK, 45])  # whole, and in row chunks
def test_density_is_the_uniform_mixture_over_every_exemplars_encoding(block, monkeypatch):
    monkeypatch.setattr(priors, "EXEMPLAR_BLOCK", block)
    vae, x = _model(), _exemplars()
    with torch.no_grad():
        vae.prior.log_var.fill_(-0.7)
        vae.prior.use_exemplars(x)
        vae.prior.refresh(batch=7)  # in batches that do not divide N
        mu = vae.encode(x)[0]
        torch.testing.assert_close(vae.prior.means, mu)
        z = torch.randn(4, 5, 3) * 2
        want = _mixture(mu, vae.prior.log_var, torch.zeros(30)).log_prob(z)
        torch.testing.assert_close(vae.prior.log_prob(z), want, rtol=1e-5, atol=1e-5)


def test_a_training_step_leaves_each_examples_own_image_out_of_its_prior():
    vae, x = _model(prior_components=30), _exemplars()  # every exemplar drawn
    vae.prior.use_exemplars(x)
    rows = torch.tensor([0, 7, 29])
    z = torch.randn(2, 3, 3)  # two samples of three examples
    with vae.prior.drawn(rows, torch.Generator().manual_seed(0)):
        got = vae.prior.log_prob(z)
        got.sum().backward()
    mu = vae.encode(x)[0].detach()
    for j, row in enumerate(rows.tolist()):
        logits = torch.zeros(30)
        logits[row] = -math.inf  # its own exemplar: weight 0, the others 1/29 each
        want = _mixture(mu, vae.prior.log_var.detach(), logits).log_prob(z[:, j])
        torch.testing.assert_close(got[:, j].detach(), want, rtol=1e-5, atol=1e-5)
    # the gradient reaches the shared variance and the encoder through the exemplars
    assert vae.prior.log_var.grad.abs() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.encoder.parameters())
    assert vae.prior._drawn is None  # released: the prior is the full mixture again


def test_a_step_draws_the_number_asked_without_repeats():
    vae, x = _model(prior_components=8), _exemplars()
    vae.prior.use_exemplars(x)
    seen = []
    vae.prior._encode = [lambda images: seen.append(images) or vae.encode(images)]
    with vae.prior.drawn(torch.tensor([1, 2]), torch.Generator().manual_seed(3)):
        mu, log_w = vae.prior._drawn
    assert mu.shape == (8, 3) and log_w.shape == (2, 8)
    assert len(torch.unique(seen[0].reshape(8, -1), dim=0)) == 8
    # each row's weights sum to one over the exemplars that are not its own
    torch.testing.assert_close(torch.logsumexp(log_w, -1), torch.zeros(2))


@pytest.mark.parametrize("options", [{}, {"arch": "hvae_topdown", "z1_dim": 4}])
def test_training_improves_refreshes_the_encodings_and_resumes_exactly(options):
    x, xv = proto_data()
    cfg = train_cfg(epochs=4, batch_size=50)
    make = lambda: VAE(  # noqa: E731
        vae_cfg(
            image_shape=(1, 8, 8), latent_dim=3, hidden=[32], n_train=len(x),
            prior="exemplar", prior_components=40, **options,
        )
    )  # fmt: skip
    vae = make()
    saved = []  # copies: the state's tensors are the live weights until written to disk
    keep = lambda state: saved.append(copy.deepcopy(state))  # noqa: E731
    hist = fit(vae, x, xv, cfg, "dynamic", on_checkpoint=keep, progress=False)
    assert hist[-1].val["elbo"] > hist[0].val["elbo"] and math.isfinite(hist[-1].val["kl"])
    with torch.no_grad():  # the model handed back carries its own weights' encodings
        torch.testing.assert_close(vae.prior.means, vae.encode(x)[0], rtol=1e-5, atol=1e-5)
    resumed = make()
    fit(resumed, x, xv, cfg, "dynamic", resume=saved[1], progress=False)
    for a, b in zip(vae.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_the_model_file_carries_the_encodings(tmp_path):
    vae, x = _model(), _exemplars()
    with torch.no_grad():
        vae.prior.log_var.fill_(-1.5)
        vae.prior.use_exemplars(x)
        vae.prior.refresh()
    path = tmp_path / "vae.pt"
    checkpoint.save(path, vae, {"dataset": "digits"})
    loaded, _ = checkpoint.load(path)
    assert loaded.cfg.n_exemplars == 30 and loaded.cfg.prior == "exemplar"
    torch.testing.assert_close(loaded.prior.means, vae.prior.means)
    z = torch.randn(5, 3)
    torch.testing.assert_close(loaded.prior.log_prob(z), vae.prior.log_prob(z))


def test_graphs_match_pytorch_and_prior_onnx_picks_exemplars(tmp_path):
    vae, x = _model(), _exemplars()
    with torch.no_grad():
        vae.prior.use_exemplars(x)
        vae.prior.refresh()
    eps = likelihood.fixed_noise(8, vae.noise_dim, 0)
    paths = graphs.export_models(vae, tmp_path, 18, {"dataset": "digits"}, eps, 0)
    sessions = {k: runtime.open_session(p, "cpu") for k, p in paths.items()}
    errs = graphs.parity_of(vae, sessions, eps)
    assert {"prior_b1", "scorer_b257"} <= set(errs) and max(errs.values()) < 1e-3, errs
    assert sessions["prior"].metadata()["prior"] == "exemplar"
    with torch.no_grad():  # a tiny variance: each draw is its exemplar's encoding
        vae.prior.log_var.fill_(-30.0)
    paths = graphs.export_models(vae, tmp_path / "narrow", 18, {"dataset": "digits"})
    u = np.array([0.0, 0.5, 0.999999], dtype=np.float32)
    feed = {"eps": np.ones((3, 3), dtype=np.float32), "u": u}
    (z,) = runtime.open_session(paths["prior"], "cpu").run(feed)
    np.testing.assert_allclose(z, vae.prior.means[[0, 15, 29]].numpy(), atol=1e-5)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"model": {"prior": "exemplar", "conditional": True}},
            "does not fit 'model.prior' = 'exemplar': its exemplars would need labels",
        ),
        (
            {"model": {"prior": "exemplar", "prior_components": 1}},
            "'model.prior_components' = 1 is too few exemplars",
        ),
        (
            {"model": {"prior": "exemplar"}, "train": {"nproc": 2}},
            "trains in one process, not nproc x nnodes = 2",
        ),
        (
            {"model": {"prior": "exemplar"}, "train": {"compile": "default"}},
            "does not take 'model.prior' = 'exemplar'",
        ),
        ({"model": {"prior": "knn"}}, "choose one of: standard, vamp, mog, exemplar"),
    ],
)
def test_params_the_exemplar_prior_refuses(raw, message):
    with pytest.raises(ConfigError) as e:
        config.from_dict(params_dict(raw))
    assert message in str(e.value)


def test_vaepipe_score_keeps_to_the_scorers_max_batch(tmp_path, monkeypatch):
    from vaepipe import cli

    vae, x = _model(), _exemplars()
    with torch.no_grad():
        vae.prior.use_exemplars(x)
        vae.prior.refresh()
    monkeypatch.setattr(graphs, "SCORER_BLOCK", 8 * 30 * 3)  # three images a run
    eps = likelihood.fixed_noise(8, vae.noise_dim, 0)
    path = graphs.export_models(vae, tmp_path, 18, {"dataset": "digits"}, eps, 0)["scorer"]
    sess = runtime.open_session(path, "cpu")
    assert sess.metadata()["max_batch"] == "3"
    images = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(2)).bernoulli()
    np.savez(tmp_path / "x.npz", x=images.numpy())
    out = tmp_path / "nll.npz"
    rows, run_batched = [], runtime.Session.run_batched
    monkeypatch.setattr(
        runtime.Session,
        "run_batched",
        lambda self, x, n, extra=None: rows.append(n) or run_batched(self, x, n, extra),
    )
    args = ["score", str(tmp_path / "x.npz"), "--model", str(path), "--out", str(out)]
    assert cli.main(args) == 0
    assert rows == [3]  # not the command's 64
    with np.load(out) as f, torch.no_grad():
        want = -likelihood.iwae_estimate(vae, images, eps).numpy()
        np.testing.assert_allclose(f["nll"], want, atol=1e-3)


def test_iwae_training_with_dreg_and_bfloat16_takes_the_exemplar_prior():
    x, xv = proto_data()
    cfg = train_cfg(
        epochs=3, batch_size=50, objective="iwae", iwae_k=4, iwae_gradient="dreg",
        precision="bf16",
    )  # fmt: skip
    options = {"latent_dim": 3, "hidden": [32], "prior": "exemplar", "prior_components": 40}
    vae = VAE(vae_cfg(image_shape=(1, 8, 8), n_train=len(x), **options))
    log_var = vae.prior.log_var.item()
    hist = fit(vae, x, xv, cfg, "dynamic", progress=False)
    assert hist[-1].val["iwae"] > hist[0].val["iwae"] and math.isfinite(hist[-1].val["iwae"])
    assert vae.prior.log_var.item() != log_var  # the shared variance learns


def test_a_model_file_without_exemplars_is_refused_as_damaged(tmp_path):
    vae = _model()
    path = tmp_path / "vae.pt"
    checkpoint.save(path, vae, {"dataset": "digits"})
    payload = torch.load(path, weights_only=True)
    payload["model_config"]["n_exemplars"] = 0  # as a file written by hand might say
    payload.pop("sha256", None)
    torch.save(payload, path)
    with pytest.raises(checkpoint.ModelFileError, match="needs training images, not 0"):
        checkpoint.load(path)
