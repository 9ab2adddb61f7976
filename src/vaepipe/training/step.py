"""One optimizer step's parts: the forward pass and its loss terms, the NaN/Inf check taken
before the step is applied, and the optimizer. `loop.fit` runs them in order."""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from vaepipe.config import TrainConfig
from vaepipe.errors import VaepipeError
from vaepipe.model.objectives import dreg_surrogate, sample_terms
from vaepipe.model.vae import VAE
from vaepipe.training import distributed


class TrainingDiverged(VaepipeError):
    """The loss or a gradient became NaN/Inf; raised before the bad step is applied."""


def adam(params, lr: float) -> torch.optim.Adam:
    """Adam with the fused kernel (one pass over each parameter for the whole update; the
    training devices, CPU and CUDA, have it): up to 1.3x a CPU step of the default model
    against torch's default implementation, whose rounding differs by ~1e-7
    (benchmarks/train.py)."""
    return torch.optim.Adam(params, lr=lr, fused=True)


def check_finite(vae: VAE, loss: torch.Tensor, epoch: int, batch: int) -> None:
    # One pass over the gradients (a sum: any NaN/Inf makes it NaN/Inf, and it is the cheapest
    # reduction, ~1% of a CPU step) and one host sync for loss and gradients together (each
    # sync stalls a GPU's queue); only when it is not finite do we look element by element
    # (huge but finite gradients can overflow the sum alone: those are not a NaN/Inf).
    total = torch.stack([p.grad.sum() for p in vae.parameters() if p.grad is not None]).sum()
    if bool(torch.isfinite(loss + total)):
        return
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"loss is {loss.item()} at epoch {epoch}, batch {batch}")
    bad = [
        n
        for n, p in vae.named_parameters()
        if p.grad is not None and not torch.isfinite(p.grad).all()
    ]
    if bad:
        raise TrainingDiverged(
            f"gradient of {', '.join(bad)} is NaN/Inf at epoch {epoch}, batch {batch}"
        )


def forward(loop, xb: torch.Tensor, beta: float, yb: torch.Tensor | None = None):
    """One global batch: (loss to backpropagate, loss to check, n * (loss, recon, kl, elbo)).

    Under torchrun each rank takes its slice of the batch and of one global eps draw (the
    numbers one process draws), so the gradient DDP averages is the global batch's.
    """
    vae, group, tcfg = loop.vae, loop.group, loop.cfg
    iwae = tcfg.objective == "iwae"
    shape = (tcfg.iwae_k, len(xb), vae.noise_dim) if iwae else (len(xb), vae.noise_dim)
    eps = torch.randn(shape, device=xb.device)
    x_local = distributed.local_slice(xb, group)  # [b, C, H, W], b ~ B / world_size
    y_local = None if yb is None else distributed.local_slice(yb, group)
    eps_local = distributed.local_slice(eps, group, dim=-2)
    if len(x_local) == 0:  # a last batch smaller than the world: join the all-reduce only
        return _no_examples(loop, x_local, eps_local, y_local)
    if iwae and tcfg.iwae_gradient == "dreg":
        loss, check, t = _dreg(loop, x_local, eps_local, y_local, beta)
    else:
        if loop.beta_scalar is not None:  # compiled: a new KL weight is no new graph, and
            beta = loop.beta_scalar.fill_(beta)  # filling a device scalar waits for no GPU queue
        loss, t = loop.loss_terms(x_local, eps_local, y_local, beta)
        check = loss
    if not group.enabled:
        return loss, check, len(xb) * t.double()
    # DDP averages the ranks' gradients; weighting each rank's batch mean by its share of the
    # batch (slices may differ by one row) makes that the gradient of the global batch mean.
    weight = len(x_local) * group.world_size / len(xb)
    return loss * weight, check, len(x_local) * t.double()


def loss_terms(model: nn.Module, vae: VAE, cfg: TrainConfig, x, eps, y, beta):
    """(loss, [loss, recon, kl, elbo] detached) of one batch with the noise eps; `model` is the
    VAE's sampling pass (distributed.Step, or it under DDP). What train.compile compiles."""
    s, _ = _sample(model, x, eps, y, cfg)
    weights = {"beta": beta, "free_bits": cfg.free_bits, "iwae": cfg.objective == "iwae"}
    t = sample_terms(x, s, vae.likelihood, **weights)
    return t.loss, torch.stack([t.loss, t.recon, t.kl, t.elbo]).detach()


def step_loss_terms(model: nn.Module, vae: VAE, cfg: TrainConfig):
    """loss_terms(x, eps, y, beta) of this model: as it is, or torch.compile'd in the mode of
    train.compile ('reduce-overhead' replays the step as CUDA graphs on a GPU). Static shapes:
    a full batch and the epoch's last, smaller one are two graphs, the same in every process,
    so a run resumed elsewhere computes with the same kernels."""
    fn = functools.partial(loss_terms, model, vae, cfg)
    if cfg.compile == "none":
        return fn
    return torch.compile(fn, mode=cfg.compile, dynamic=False)


def _sample(model, x, eps, y, cfg: TrainConfig):
    """(the LatentSample with float32 outputs for the loss, the z the decoder and prior read)."""
    bf16 = cfg.precision == "bf16"  # the model's matrix products in bfloat16 (autocast)
    with torch.autocast(x.device.type, torch.bfloat16) if bf16 else contextlib.nullcontext():
        s = model(x, eps, y)
    return (s.float() if bf16 else s), s.z


def _dreg(loop, x, eps, y, beta):
    """The DReG surrogate (loss, loss to check, terms): the gradient reaching z is scaled by
    the normalized weights, through a hook."""
    tcfg, lik = loop.cfg, loop.vae.likelihood
    s, z = _sample(loop.model, x, eps, y, tcfg)  # DReG scales the gradient reaching that z
    loss, w, log_px_z = dreg_surrogate(x, s, lik)
    z.register_hook(lambda g: g * w.unsqueeze(-1).to(g.dtype))  # z's path: w~^2 in all
    with torch.no_grad():  # the terms are figures here, from the surrogate's log p(x|z)
        weights = {"beta": beta, "free_bits": tcfg.free_bits, "iwae": True}
        t = sample_terms(x, s, lik, **weights, log_px_z=log_px_z)
    return loss, t.loss, torch.stack([t.loss, t.recon, t.kl, t.elbo]).detach()


def _no_examples(loop, x, eps, y):
    """0, and a zero gradient for every weight (a learned sigma too, used outside forward)."""
    s, _ = _sample(loop.model, x, eps, y, loop.cfg)
    zero = s.logits.sum() + s.mu.sum() + s.logvar.sum()
    zero = zero + sum(0 * p.sum() for p in loop.vae.parameters())
    return zero, zero, loop.sums.new_zeros(4)
