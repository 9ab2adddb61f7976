"""The training loop: Adam on the (beta-)ELBO, data held as tensors on the training device.

No file I/O and no MLflow here: each finished epoch is handed to `on_epoch_end`, which the
stage script uses for logging and checkpoints.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vaepipe.config import TrainConfig
from vaepipe.elbo import elbo_terms
from vaepipe.metrics import evaluate_elbo
from vaepipe.model import VAE


@dataclass
class EpochStats:
    epoch: int  # 1-based
    train: dict[str, float]  # loss, recon, kl, elbo: means over the epoch's examples
    val: dict[str, float]  # recon, kl, elbo on the validation set
    beta: float
    lr: float
    seconds: float
    kl_per_dim: list[float] = field(default_factory=list)  # validation KL per latent dim

    def metrics(self) -> dict[str, float]:
        """Flat MLflow metric names (DESIGN.md)."""
        out = {f"train/{k}": v for k, v in self.train.items()}
        out.update({f"val/{k}": v for k, v in self.val.items()})
        out.update({"beta": self.beta, "lr": self.lr, "epoch_seconds": self.seconds})
        return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from vaepipe.errors import ConfigError

        raise ConfigError("param 'train.device' = 'cuda' but torch sees no CUDA device here")
    return torch.device(name)


def set_threads(threads: int) -> int:
    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    return n


def binarize(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One Bernoulli draw per pixel with p = intensity (the dynamic-binarization standard)."""
    return torch.bernoulli(x, generator=generator)


def fit(
    vae: VAE,
    x_train: torch.Tensor,
    x_val: torch.Tensor,
    cfg: TrainConfig,
    binarization: str,
    on_epoch_end: Callable[[EpochStats], None] | None = None,
    progress: bool = True,
) -> list[EpochStats]:
    """Train `vae` on float images in [0, 1] ([N, C, H, W], already on the training device).

    binarization: 'dynamic' draws new binary pixels each epoch, 'static' draws them once,
    'none' trains on the intensities (Gaussian likelihood).
    """
    from tqdm.auto import tqdm

    device = x_train.device
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    val_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    if binarization != "none":
        x_val = binarize(x_val, val_gen)  # fixed draw: val figures comparable across epochs
    if binarization == "static":
        x_train = binarize(x_train, gen)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    n = len(x_train)
    history: list[EpochStats] = []
    bar = tqdm(range(1, cfg.epochs + 1), desc="train", unit="epoch", disable=not progress)
    for epoch in bar:
        t0 = time.perf_counter()
        vae.train()
        perm = torch.randperm(n, generator=gen, device=device)
        sums = torch.zeros(4, device=device, dtype=torch.float64)
        for i in range(0, n, cfg.batch_size):
            xb = x_train[perm[i : i + cfg.batch_size]]
            if binarization == "dynamic":
                xb = binarize(xb, gen)
            logits, mu, logvar = vae(xb)
            t = elbo_terms(
                xb, logits, mu, logvar, vae.cfg.likelihood, vae.cfg.gaussian_sigma, cfg.beta
            )
            opt.zero_grad(set_to_none=True)
            t.loss.backward()
            opt.step()
            sums += len(xb) * torch.stack([t.loss, t.recon, t.kl, t.elbo]).detach().double()
        loss, recon, kl, elbo = (sums / n).tolist()
        val, kl_d = evaluate_elbo(vae, x_val, seed=cfg.seed)
        stats = EpochStats(
            epoch=epoch,
            train={"loss": loss, "recon": recon, "kl": kl, "elbo": elbo},
            val=val,
            beta=cfg.beta,
            lr=opt.param_groups[0]["lr"],
            seconds=time.perf_counter() - t0,
            kl_per_dim=kl_d.tolist(),
        )
        history.append(stats)
        bar.set_postfix(train_elbo=f"{elbo:.2f}", val_elbo=f"{val['elbo']:.2f}")
        if on_epoch_end is not None:
            on_epoch_end(stats)
    return history
