"""Conditional generation: encoder and decoder take the label; the graphs take one-hot y; the
CLI and the served model pass it; bad combinations are one line."""

import numpy as np
import pytest
import torch
from helpers import params_dict, train_cfg, vae_cfg

from vaepipe import cli, config
from vaepipe.errors import ConfigError
from vaepipe.evaluation import likelihood
from vaepipe.export import graphs
from vaepipe.inference import runtime, serving
from vaepipe.model.vae import VAE
from vaepipe.training.loop import fit


def labelled(n: int = 600, seed: int = 0):
    """Images of 4 classes: class c lights up quarter c of the 8x8 image; (x, y) train and val."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.full((n, 1, 8, 8), 0.05)
    for c in range(4):
        r, k = divmod(c, 2)
        x[y == c, :, 4 * r : 4 * r + 4, 4 * k : 4 * k + 4] = 0.95
    return (x[:500], y[:500]), (x[500:], y[500:])


def _vae(**kw) -> VAE:
    torch.manual_seed(0)
    cfg = vae_cfg((1, 8, 8), n_classes=4, latent_dim=2, hidden=[32], conditional=True, **kw)
    return VAE(cfg)


def test_the_label_decides_what_the_decoder_draws():
    (x, y), (xv, yv) = labelled()
    vae = _vae()
    hist = fit(vae, x, xv, train_cfg(epochs=30, batch_size=50, lr=3e-3), "dynamic",
               progress=False, labels=(y, yv))  # fmt: skip
    assert hist[-1].val["elbo"] > hist[0].val["elbo"]
    vae.eval()
    with torch.no_grad():
        z = torch.randn(400, 2, generator=torch.Generator().manual_seed(1))
        for c in range(4):
            images = vae.mean(vae.decode(z[c * 100 : (c + 1) * 100], torch.full((100,), c)))
            r, k = divmod(c, 2)
            lit = images[:, 0, 4 * r : 4 * r + 4, 4 * k : 4 * k + 4].mean()
            rest = (images.sum() / 100 - lit * 16) / 48  # mean of the other three quarters
            assert lit > 0.6 and lit > 3 * rest, (c, lit, rest)  # its quarter, little else
        # the likelihood of an image is higher under its own label than under another
        right = likelihood.iwae_log_likelihood(vae, xv, 16, seed=0, y=yv)
        wrong = likelihood.iwae_log_likelihood(vae, xv, 16, seed=0, y=(yv + 1) % 4)
    assert (right > wrong).float().mean() > 0.95


def test_graphs_take_one_hot_labels_and_match_pytorch(tmp_path, capsys):
    vae = _vae().eval()
    eps = likelihood.fixed_noise(8, vae.noise_dim, 0)
    paths = graphs.export_models(vae, tmp_path, 18, {"dataset": "quarters"}, eps, 0)
    sessions = {k: runtime.open_session(p, "cpu") for k, p in paths.items()}
    for name in ("encoder", "decoder", "scorer"):
        assert [i.name for i in sessions[name].session.get_inputs()][1:] == ["y"], name
    errs = graphs.parity_of(vae, sessions, eps)
    assert max(errs.values()) < 1e-3, errs
    # the CLI: --label for every row; without it, one line saying what to pass
    out = tmp_path / "g.npz"
    dec = str(paths["decoder"])
    assert (
        cli.main(["generate", "--model", dec, "--label", "2", "--n", "5", "--out", str(out)]) == 0
    )
    with np.load(out) as f:
        z, x = f["z"], f["x_mean"]
    y = np.eye(4, dtype=np.float32)[[2] * 5]
    np.testing.assert_allclose(x, sessions["decoder"].run({"z": z, "y": y})[0], atol=1e-6)
    for argv, message in (
        (["generate", "--model", dec, "--out", str(out)], "is conditional: pass --label"),
        (["generate", "--model", dec, "--label", "7", "--out", str(out)], "it has 4 (0..3)"),
    ):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_served_conditional_decoder_needs_its_labels(tmp_path):
    from mlflow.exceptions import MlflowException

    vae = _vae().eval()
    path = graphs.export_models(vae, tmp_path, 18, {"dataset": "quarters"})["decoder"]
    model = serving.OnnxVaeModel(path, {"provider": "cpu", "max_batch": 10})
    z = np.zeros((3, 2), np.float32)
    y = np.eye(4, dtype=np.float32)[[0, 1, 3]]
    assert model.predict({"z": z, "y": y})["x_mean"].shape == (3, 1, 8, 8)
    for payload, message in (
        ({"z": z}, "this model is conditional"),
        ({"z": z, "y": y[:2]}, "has 2 rows"),
        ({"z": z, "y": np.full((3, 4), 2.0, np.float32)}, "values in [2, 2]"),
    ):
        with pytest.raises(MlflowException, match=message.replace("[", r"\[")) as info:
            model.predict(payload)
        assert info.value.get_http_status_code() == 400


def test_an_unconditional_model_refuses_a_label(tmp_path, capsys):
    torch.manual_seed(0)
    vae = VAE(vae_cfg(image_shape=(1, 8, 8), latent_dim=2, hidden=[16])).eval()
    dec = str(graphs.export_models(vae, tmp_path, 18, {"dataset": "d"})["decoder"])
    with pytest.raises(SystemExit):
        cli.main(["generate", "--model", dec, "--label", "1", "--out", str(tmp_path / "g.png")])
    assert "is not conditional (no input y)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"model": {"conditional": True, "arch": "conv"}},
            "not supported with 'model.arch' = 'conv'",
        ),
        ({"model": {"conditional": True, "prior": "vamp"}}, "does not fit 'model.prior' = 'vamp'"),
    ],
)
def test_bad_combinations_are_one_line(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config.from_dict(params_dict(raw))
