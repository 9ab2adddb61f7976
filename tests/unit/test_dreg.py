"""The doubly reparameterized IWAE gradient (train.iwae_gradient = dreg, Tucker et al. 2019):
the IWAE gradient in expectation, the same decoder and prior gradient draw by draw, a quieter
encoder gradient, and training that learns."""

import pytest
import torch
from helpers import proto_data, train_cfg, vae_cfg

from vaepipe.model.vae import VAE
from vaepipe.training.distributed import SINGLE
from vaepipe.training.loop import _Loop, fit
from vaepipe.training.step import forward


def _gradients(vae, x, gradient: str, seeds: range) -> tuple[dict, list[list[float]]]:
    """Each parameter's gradient [draws, ...] of the training loss, one draw of eps per seed,
    and per draw the step's reported bound and logged terms (loss, recon, kl, elbo)."""
    cfg = train_cfg(objective="iwae", iwae_k=8, iwae_gradient=gradient)
    loop = _Loop(vae, cfg, torch.device("cpu"), SINGLE)
    grads: dict[str, list[torch.Tensor]] = {n: [] for n, _ in vae.named_parameters()}
    bounds = []
    for seed in seeds:
        torch.manual_seed(seed)
        loss, check, terms = forward(loop, x, 1.0)
        vae.zero_grad()
        loss.backward()
        bounds.append([check.item(), *terms.tolist()])
        for n, p in vae.named_parameters():
            grads[n].append(p.grad.clone())
    return {n: torch.stack(g) for n, g in grads.items()}, bounds


@pytest.mark.parametrize("prior", ["standard", "vamp"])
def test_dreg_is_the_iwae_gradient_in_expectation_and_quieter_for_the_encoder(prior):
    torch.manual_seed(0)
    cfg = vae_cfg(latent_dim=3, hidden=[16], prior=prior, prior_components=4)
    vae = VAE(cfg)
    x = proto_data(n=132)[0][:32].bernoulli(generator=torch.Generator().manual_seed(1))
    draws = range(600)
    std, b_std = _gradients(vae, x, "standard", draws)
    dreg, b_dreg = _gradients(vae, x, "dreg", draws)
    assert b_std == b_dreg  # the same draws: the same reported bound and logged terms
    for name in std:
        if not name.startswith("encoder."):
            # the decoder (and the prior, held at z) get sum_k w~_k grad log w_k either way
            torch.testing.assert_close(dreg[name], std[name], rtol=1e-4, atol=1e-6)
    enc = [n for n in std if n.startswith("encoder.")]
    a = torch.cat([std[n].flatten(1) for n in enc], 1).double()  # [draws, params]
    b = torch.cat([dreg[n].flatten(1) for n in enc], 1).double()
    # unbiased: the difference of the means is noise, measured against its own standard error
    # (mean t^2 is 1.48 and 1.41 here, the same at 2,400 draws: heavy tails, not a bias, which
    # would grow it fourfold; the relative difference halves, 0.07 -> 0.037, as noise does)
    se = ((a.var(0) + b.var(0)) / len(draws)).sqrt()
    live = se > 0  # a dead ReLU's weights get no gradient from either
    t = (a.mean(0) - b.mean(0))[live] / se[live]
    assert t.pow(2).mean().item() < 2.0, t.abs().max()
    assert (a.mean(0) - b.mean(0)).norm() < 0.12 * a.mean(0).norm()
    # and the encoder's gradient noise is smaller (the point of the estimator)
    assert b.var(0).sum() < 0.8 * a.var(0).sum()


def test_training_with_dreg_learns():
    x, xv = proto_data()
    torch.manual_seed(0)
    vae = VAE(vae_cfg(latent_dim=3, hidden=[32], prior="vamp", prior_components=6))
    cfg = train_cfg(epochs=4, batch_size=50, objective="iwae", iwae_gradient="dreg")
    hist = fit(vae, x, xv, cfg, "dynamic", progress=False)
    assert hist[-1].val["iwae"] > hist[0].val["iwae"] > -1e9
