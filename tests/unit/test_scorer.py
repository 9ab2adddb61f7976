"""scorer.onnx (x -> nll): the evaluate stage's IWAE NLL with fixed noise, deterministic, served
and scored by `vaepipe score`; and what the score separates (vaepipe.ood)."""

import math
import re

import numpy as np
import onnx
import pytest
import torch
from helpers import vae_cfg
from PIL import Image

from vaepipe import cli
from vaepipe.evaluation import likelihood, ood
from vaepipe.export import graphs
from vaepipe.inference import runtime
from vaepipe.model.vae import VAE

K = 16


@pytest.fixture(scope="module", params=["bernoulli", "gaussian", "continuous_bernoulli"])
def scorer(request, tmp_path_factory):
    torch.manual_seed(0)
    vae = VAE(vae_cfg(image_shape=(1, 8, 8), latent_dim=3, hidden=[16], likelihood=request.param))
    eps = likelihood.fixed_noise(K, 3, seed=7)
    out = tmp_path_factory.mktemp("scorer")
    paths = graphs.export_models(vae.eval(), out, 18, {"dataset": "digits"}, eps, scorer_seed=7)
    return vae.eval(), eps, paths["scorer"]


def test_scorer_matches_the_evaluate_stage_per_image_nll_for_the_same_noise(scorer):
    vae, eps, path = scorer
    x = torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    if vae.cfg.likelihood == "bernoulli":
        x = x.bernoulli(generator=torch.Generator().manual_seed(2))  # as evaluate scores it
    expected = -likelihood.fixed_noise_log_likelihood(vae, x, eps).numpy()  # the stage's function
    sess = runtime.open_session(path, "cpu")
    (nll,) = sess.run({"x": x.numpy()})
    assert nll.shape == (300,)
    np.testing.assert_allclose(nll, expected, atol=1e-3, rtol=0)
    (again,) = sess.run({"x": x.numpy()})
    assert np.array_equal(nll, again)  # deterministic: the noise is a constant of the graph


def test_fixed_noise_nll_matches_a_bare_loop_with_torch_distributions():
    """The fixed noise is the same [K, D] draw for every image: a bare per-image loop with
    that noise (torch.distributions densities, not ours) gives the same NLL."""
    from torch.distributions import Independent, Normal

    torch.manual_seed(0)
    vae = VAE(vae_cfg(image_shape=(1, 8, 8), latent_dim=3, hidden=[16], likelihood="gaussian"))
    vae = vae.eval()
    eps = likelihood.fixed_noise(K, 3, seed=7)
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mu, logvar = vae.encode(x)
        std = torch.exp(0.5 * logvar)
        for i in range(5):
            z = mu[i] + std[i] * eps  # [K, D]
            mean = vae.mean(vae.decode(z))  # [K, 1, 8, 8]
            log_px = Independent(Normal(mean, vae.cfg.gaussian_sigma), 3).log_prob(x[i])
            log_w = (
                log_px
                + Normal(0, 1).log_prob(z).sum(-1)
                - Normal(mu[i], std[i]).log_prob(z).sum(-1)
            )
            want = -(torch.logsumexp(log_w, 0) - math.log(K))
            got = -likelihood.fixed_noise_log_likelihood(vae, x[i : i + 1], eps)[0]
            assert got.item() == pytest.approx(want.item(), abs=1e-3)


def test_scorer_metadata_records_k_and_seed_and_has_no_random_op(scorer):
    _, _, path = scorer
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["scorer_k"] == str(K) and meta["scorer_seed"] == "7"
    assert not {n.op_type for n in model.graph.node} & graphs.RANDOM_OPS
    assert [i.name for i in model.graph.input] == ["x"]
    assert [o.name for o in model.graph.output] == ["nll"]


def run(*argv) -> int:
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def test_vaepipe_score_npz_and_png_folder(scorer, tmp_path, capsys):
    vae, eps, path = scorer
    x = np.random.default_rng(0).integers(0, 256, (20, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", x=x, y=np.arange(20))
    assert run("score", tmp_path / "images.npz", "--model", path, "--out", tmp_path / "s.npz") == 0
    out = capsys.readouterr().out
    assert "score: NLL of 20 images (IWAE, k = 16 fixed samples)" in out
    with np.load(tmp_path / "s.npz") as f:
        nll, y = f["nll"], f["y"]
    expected = -likelihood.fixed_noise_log_likelihood(
        vae, torch.from_numpy(x[:, None] / 255.0).float(), eps
    )
    np.testing.assert_allclose(nll, expected.numpy(), atol=1e-3)
    assert list(y) == list(range(20))
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(x[i]).save(folder / f"{i}.png")
    assert run("score", folder, "--model", path, "--out", tmp_path / "p.npz") == 0
    with np.load(tmp_path / "p.npz") as f:
        np.testing.assert_allclose(f["nll"], nll[:3], atol=1e-3)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((4, 9, 9), np.float32), "expects [batch, 1, 8, 8]"),
        (np.full((2, 1, 8, 8), np.nan, np.float32), "NaN or infinite"),
        (np.full((2, 1, 8, 8), 1.5, np.float32), "expects values in [0, 1]"),
        (np.zeros((0, 1, 8, 8), np.float32), "is empty"),
    ],
)
def test_vaepipe_score_bad_inputs_are_one_error_line(scorer, tmp_path, capsys, images, message):
    _, _, path = scorer
    np.savez(tmp_path / "bad.npz", x=images)
    assert run("score", tmp_path / "bad.npz", "--model", path, "--out", tmp_path / "s.npz") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "s.npz").exists()


def test_served_scorer_refuses_bad_payloads_with_400(scorer):
    from mlflow.exceptions import MlflowException

    from vaepipe.inference import serving

    _, _, path = scorer
    model = serving.OnnxVaeModel(path, {"provider": "cpu", "max_batch": 4, "value_range": [0, 1]})
    assert model.predict(np.zeros((2, 1, 8, 8), np.float32))["nll"].shape == (2,)
    for payload, message in (
        (np.full((1, 1, 8, 8), 2.0, np.float32), "expects values in [0, 1]"),
        (np.zeros((5, 1, 8, 8), np.float32), "more than the limit of 4"),
        (np.zeros((1, 64), np.float32), "shape"),
    ):
        with pytest.raises(MlflowException, match=re.escape(message)) as info:
            model.predict(payload)
        assert info.value.get_http_status_code() == 400


# --- vaepipe.ood -------------------------------------------------------------------------------


def test_corruptions_are_what_they_say():
    x = torch.rand(6, 1, 10, 10, generator=torch.Generator().manual_seed(0))
    c = ood.corruptions(x, seed=0)
    assert torch.equal(c["inverted"], 1 - x)
    s = ood.SHIFT_PIXELS
    assert torch.equal(c["shifted"][..., s:, s:], x[..., :-s, :-s])
    assert (c["shifted"][..., :s, :] == 0).all() and (c["shifted"][..., :, :s] == 0).all()
    noise = c["noise"] - x
    assert 0 <= c["noise"].min() and c["noise"].max() <= 1 and noise.abs().max() > 0.1


def test_auroc_counts_pairs_in_which_the_outsider_scores_higher():
    inside, outside = np.array([1.0, 2.0, 3.0]), np.array([2.5, 4.0])
    # pairs (in, out) with out > in: 2.5 beats 1, 2; 4 beats all three -> 5 of 6
    assert ood.auroc(inside, outside) == pytest.approx(5 / 6)
    assert ood.auroc(inside, inside) == pytest.approx(0.5)
    # scores that overflowed (nan, inf) rank above every finite one, tied among themselves
    overflowed = np.array([np.nan, np.inf, 2.5])
    assert ood.auroc(inside, overflowed) == pytest.approx((3 + 3 + 2) / 9)
    assert ood.auroc(np.array([np.nan]), np.array([np.inf])) == pytest.approx(0.5)


def test_separation_reports_overflowing_images_instead_of_failing():
    """A VAE whose encoder variance overflows on inverted images (e^100, as a trained ELU
    model's did) still gets its AUROCs, with the overflows counted."""
    from helpers import vae_cfg

    from vaepipe.evaluation import likelihood
    from vaepipe.model.vae import VAE

    torch.manual_seed(0)
    vae = VAE(vae_cfg(image_shape=(1, 8, 8), latent_dim=2, hidden=[8])).eval()
    with torch.no_grad():
        # logvar = 300 * (mean pixel - 0.15): about 0 on these dark images, 210 on their
        # inverses (a std of e^105: inf in float32)
        last = vae.encoder.net[-1]
        last.weight.zero_()
        last.bias.zero_()
        vae.encoder.net[0].weight.fill_(1 / 64)
        vae.encoder.net[0].bias.zero_()
        last.weight[2:, :] = 300.0 / 8
        last.bias[2:] = -0.15 * 300
    x = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.3
    eps = likelihood.fixed_noise(10, vae.noise_dim, 0)
    out, _ = ood.separation(vae, x, eps, dataset="npz", seed=0)
    assert out["inverted"]["nonfinite"] == 20 and out["inverted"]["auroc"] == 1.0
    assert math.isfinite(out["test"]["nll_mean"]) and "nonfinite" not in out["test"]


def test_other_dataset_is_mnist_for_28x28_and_digits_resized_otherwise():
    name, x = ood.other_dataset((1, 28, 28), "fashion-mnist", 50, seed=0)
    assert name == "mnist" and x.shape == (50, 1, 28, 28) and x.dtype == np.float32
    assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.9
    name, x = ood.other_dataset((1, 12, 12), "npz", 10, seed=0)
    assert name == "digits" and x.shape == (10, 1, 12, 12)
    name, why = ood.other_dataset((3, 28, 28), "npz", 10, seed=0)
    assert name is None and "3-channel" in why


def test_paired_difference_is_the_mean_and_stderr_of_the_per_image_differences():
    from vaepipe.tracking import promotion

    rng = np.random.default_rng(0)
    champion = rng.normal(230, 30, 1000)  # images differ a lot; the models differ little
    candidate = champion - 0.5 + rng.normal(0, 2, 1000)
    p = promotion.paired_difference(candidate, champion)
    d = candidate - champion
    assert p.diff == pytest.approx(d.mean()) and p.n == 1000
    assert p.stderr == pytest.approx(d.std(ddof=1) / math.sqrt(1000))
    assert p.better == pytest.approx((d < 0).mean())
    assert p.significant  # -0.5 nats at a stderr of ~0.06: 8 standard errors
    # unpaired, the same difference would be lost in the spread of the images (30 nats)
    assert 2 * champion.std() / math.sqrt(1000) > abs(p.diff)
    assert not promotion.paired_difference(champion + 0.01, champion).significant
    with pytest.raises(promotion.PromotionError, match="cannot be paired"):
        promotion.paired_difference(candidate[:10], champion)


def test_a_saturated_decoder_scores_finite_nlls_in_onnxruntime(tmp_path):
    """A trained decoder's logits reach +-100 on background pixels: ONNX's exports of
    BCE-with-logits (log of a sigmoid) and of logsumexp (unshifted) turn those into inf; ours
    stay finite and equal to PyTorch."""
    torch.manual_seed(0)
    vae = VAE(vae_cfg(image_shape=(1, 8, 8), latent_dim=3, hidden=[16])).eval()
    with torch.no_grad():
        last = vae.decoder.net[-1]
        last.bias.copy_(torch.linspace(-120, 120, 64))  # saturated both ways
    eps = likelihood.fixed_noise(K, 3, seed=0)
    path = graphs.export_models(vae, tmp_path, 18, {"dataset": "digits"}, eps, 0)["scorer"]
    x = torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(0)).bernoulli()
    (nll,) = runtime.open_session(path, "cpu").run({"x": x.numpy()})
    expected = -likelihood.fixed_noise_log_likelihood(vae, x, eps).numpy()
    assert np.isfinite(nll).all() and nll.min() > 100  # hundreds of nats, not inf
    np.testing.assert_allclose(nll, expected, rtol=1e-6, atol=1e-3)
